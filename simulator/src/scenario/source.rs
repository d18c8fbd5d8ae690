//! Where things are in a scenario's text: key paths (`venue.schedules[0].seats`), the spans of
//! keys in the parsed document, and the translation of `toml` errors into errors that name the
//! file, line, column and key.
//!
//! The document is parsed once into a [`DeTable`], which keeps the span of every key and value;
//! serde errors carry a byte span, and semantic checks carry a [`KeyPath`]: this module maps
//! either one to the other.

use std::fmt;
use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::ScenarioError;

/// One step of a [`KeyPath`]: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

/// The path from the document's root to a key, shown as `venue.schedules[0].sections[1].seats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyPath(Vec<Segment>);

impl KeyPath {
    /// The document's root (an empty path).
    pub(crate) fn root() -> Self {
        Self::default()
    }

    /// This path extended by the table key `key`.
    pub(crate) fn key(&self, key: &str) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(key.to_owned()));
        Self(segments)
    }

    /// This path extended by the array index `index`.
    pub(crate) fn index(&self, index: usize) -> Self {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        Self(segments)
    }

    pub(crate) fn segments(&self) -> &[Segment] {
        &self.0
    }

    fn last_key(&self) -> Option<&str> {
        match self.0.last() {
            Some(Segment::Key(key)) => Some(key),
            _ => None,
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (position, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if position > 0 {
                        f.write_str(".")?;
                    }
                    if is_bare_key(key) {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether `key` can be written without quotes in TOML.
fn is_bare_key(key: &str) -> bool {
    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A semantic problem found after parsing: what is wrong, and at which key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Problem {
    pub(crate) path: KeyPath,
    pub(crate) message: String,
}

/// A scenario's text, parsed into spanned tables, with the name of the file it came from.
pub(crate) struct Source<'text> {
    file: &'text str,
    text: &'text str,
    root: Spanned<DeTable<'text>>,
}

impl<'text> Source<'text> {
    /// Parses `text` as TOML; a syntax error names the file, line and column.
    pub(crate) fn parse(text: &'text str, file: &'text str) -> Result<Self, ScenarioError> {
        match DeTable::parse(text) {
            Ok(root) => Ok(Self { file, text, root }),
            Err(error) => {
                let offset = error.span().map_or(0, |span| span.start);
                Err(Self::error_at(file, text, offset, None, clean_message(error.message())))
            }
        }
    }

    /// Deserializes the document into `T`; a type error, a missing key or an unknown key names
    /// the file, line, column and key path.
    pub(crate) fn deserialize<T: DeserializeOwned>(&self, refine: Refiner) -> Result<T, ScenarioError> {
        let deserializer = toml::de::Deserializer::from(self.root.clone());
        T::deserialize(deserializer).map_err(|error| self.deserialize_error(&error, refine))
    }

    /// The error for `problem`, located at its key (or the nearest enclosing key that exists).
    pub(crate) fn problem_error(&self, problem: &Problem) -> ScenarioError {
        let offset = self.locate(&problem.path).map_or(0, |(span, _exact)| span.start);
        Self::error_at(self.file, self.text, offset, Some(&problem.path), problem.message.clone())
    }

    /// The offset at which `problem` would be reported, to report the first one in the file.
    pub(crate) fn problem_offset(&self, problem: &Problem) -> usize {
        self.locate(&problem.path).map_or(0, |(span, _exact)| span.start)
    }

    /// The spanned value at `path`, if the document has it.
    pub(crate) fn value_at(&self, path: &KeyPath) -> Option<&Spanned<DeValue<'text>>> {
        let mut current: Option<&Spanned<DeValue<'text>>> = None;
        for segment in path.segments() {
            let next = match (segment, current.map(Spanned::get_ref)) {
                (Segment::Key(name), None) => table_entry(self.root.get_ref(), name).map(|(_key, value)| value),
                (Segment::Key(name), Some(DeValue::Table(table))) => {
                    table_entry(table, name).map(|(_key, value)| value)
                }
                (Segment::Index(index), Some(DeValue::Array(items))) => items.get(*index),
                _ => None,
            }?;
            current = Some(next);
        }
        current
    }

    /// The start offsets of the keys under `path` flattened into dotted names (`a.b.c`), for
    /// sections such as `[slo]` whose keys are names rather than fields.
    pub(crate) fn flattened_key_offsets(&self, path: &KeyPath) -> Vec<(String, usize)> {
        let mut offsets = Vec::new();
        if let Some(value) = self.value_at(path)
            && let DeValue::Table(table) = value.get_ref()
        {
            flatten_keys(table, "", &mut offsets);
        }
        offsets
    }

    /// The span of the key (or array element) at `path`, or of the nearest enclosing one that
    /// exists; `true` when the whole path exists.
    fn locate(&self, path: &KeyPath) -> Option<(Range<usize>, bool)> {
        let mut table = Some(self.root.get_ref());
        let mut array: Option<&toml::de::DeArray<'text>> = None;
        let mut best: Option<Range<usize>> = None;
        for segment in path.segments() {
            let (span, value) = match segment {
                Segment::Key(name) => match table.and_then(|table| table_entry(table, name)) {
                    Some((key, value)) => (key.span(), value),
                    None => return best.map(|span| (span, false)),
                },
                Segment::Index(index) => match array.and_then(|items| items.get(*index)) {
                    Some(value) => (value.span(), value),
                    None => return best.map(|span| (span, false)),
                },
            };
            best = Some(span);
            (table, array) = match value.get_ref() {
                DeValue::Table(inner) => (Some(inner), None),
                DeValue::Array(items) => (None, Some(items)),
                _ => (None, None),
            };
        }
        best.map(|span| (span, true))
    }

    /// The deepest key path whose key or value span contains `offset`.
    fn path_at(&self, offset: usize) -> KeyPath {
        let mut best = KeyPath::root();
        search_table(self.root.get_ref(), &KeyPath::root(), offset, &mut best);
        best
    }

    /// The deepest table whose span is exactly `span`: serde reports a missing key at the
    /// table that lacks it. The root when none is (its span is empty).
    fn table_path_with_span(&self, span: &Range<usize>) -> KeyPath {
        let mut best = KeyPath::root();
        search_tables(self.root.get_ref(), &KeyPath::root(), span, &mut best);
        best
    }

    fn deserialize_error(&self, error: &toml::de::Error, refine: Refiner) -> ScenarioError {
        let span = error.span().unwrap_or(0..0);
        let offset = span.start;
        // A key's span may contain the offset of a table that lacks a key (the document's root
        // starts where its first key does), so a missing key is looked up by table.
        let path = if error.message().starts_with("missing field `") {
            self.table_path_with_span(&span)
        } else {
            self.path_at(offset)
        };
        // Errors inside internally tagged enums are reported by serde at the enclosing table,
        // because serde buffers the table before it knows the variant. Deserializing the
        // variant's own struct from the spanned value again puts the error at its key.
        if let Some(value) = self.value_at(&path)
            && let Some(refined) = refine(&path, value)
            && refined.span() != error.span()
        {
            return self.deserialize_error(&refined, never_refine);
        }
        let message = clean_message(error.message());
        // A missing or unknown key is reported at that key when it exists (serde may have
        // pointed at the enclosing table); any other error at the span `toml` gave, which is
        // the offending value.
        let (path, offset) = match field_named(&message) {
            Some(field) => {
                let path = if path.last_key() == Some(field) { path } else { path.key(field) };
                let offset = match self.locate(&path) {
                    Some((span, true)) => span.start,
                    _ => offset,
                };
                (path, offset)
            }
            None => (path, offset),
        };
        Self::error_at(self.file, self.text, offset, Some(&path), message)
    }

    fn error_at(file: &str, text: &str, offset: usize, path: Option<&KeyPath>, message: String) -> ScenarioError {
        let (line, column) = line_column(text, offset);
        ScenarioError::Invalid {
            file: file.to_owned(),
            line,
            column,
            key: path.filter(|path| !path.segments().is_empty()).map(ToString::to_string),
            message,
        }
    }
}

/// Given the path serde's error pointed at and the value there, deserializes that value again
/// in a way that yields a more precise error, if the path is one it knows (a tagged enum).
pub(crate) type Refiner = fn(&KeyPath, &Spanned<DeValue<'_>>) -> Option<toml::de::Error>;

fn never_refine(_path: &KeyPath, _value: &Spanned<DeValue<'_>>) -> Option<toml::de::Error> {
    None
}

/// Deserializes the variant struct `T` of an internally tagged enum from `value`, a table that
/// still holds the tag key `tag`: the tag is dropped and the rest deserialized with its spans.
pub(crate) fn deserialize_variant<T: DeserializeOwned>(
    value: &Spanned<DeValue<'_>>,
    tag: &str,
) -> Option<toml::de::Error> {
    let span = value.span();
    let DeValue::Table(table) = value.get_ref() else {
        return None;
    };
    let mut table = table.clone();
    table.remove(tag);
    T::deserialize(ValueDeserializer::from(Spanned::new(span, DeValue::Table(table)))).err()
}

/// The string value of `key` in the table `value`, such as an enum's tag.
pub(crate) fn tag_of<'value>(value: &'value Spanned<DeValue<'_>>, key: &str) -> Option<&'value str> {
    let DeValue::Table(table) = value.get_ref() else {
        return None;
    };
    table_entry(table, key).and_then(|(_key, value)| value.get_ref().as_str())
}

fn table_entry<'table, 'text>(
    table: &'table DeTable<'text>,
    name: &str,
) -> Option<(&'table Spanned<toml::de::DeString<'text>>, &'table Spanned<DeValue<'text>>)> {
    table.get_key_value(name)
}

fn search_table(table: &DeTable<'_>, path: &KeyPath, offset: usize, best: &mut KeyPath) {
    for (key, value) in table.iter() {
        let path = path.key(key.get_ref());
        if contains(&key.span(), offset) {
            consider(&path, best);
        }
        search_value(value, &path, offset, best);
    }
}

fn search_value(value: &Spanned<DeValue<'_>>, path: &KeyPath, offset: usize, best: &mut KeyPath) {
    if contains(&value.span(), offset) {
        consider(path, best);
    }
    match value.get_ref() {
        DeValue::Table(table) => search_table(table, path, offset, best),
        DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                search_value(item, &path.index(index), offset, best);
            }
        }
        _ => {}
    }
}

fn search_tables(table: &DeTable<'_>, path: &KeyPath, span: &Range<usize>, best: &mut KeyPath) {
    for (key, value) in table.iter() {
        search_table_values(value, &path.key(key.get_ref()), span, best);
    }
}

fn search_table_values(value: &Spanned<DeValue<'_>>, path: &KeyPath, span: &Range<usize>, best: &mut KeyPath) {
    match value.get_ref() {
        DeValue::Table(table) => {
            if value.span() == *span {
                consider(path, best);
            }
            search_tables(table, path, span, best);
        }
        DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                search_table_values(item, &path.index(index), span, best);
            }
        }
        _ => {}
    }
}

fn consider(path: &KeyPath, best: &mut KeyPath) {
    if path.segments().len() > best.segments().len() {
        *best = path.clone();
    }
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.contains(&offset) || (span.is_empty() && span.start == offset)
}

fn flatten_keys(table: &DeTable<'_>, prefix: &str, offsets: &mut Vec<(String, usize)>) {
    for (key, value) in table.iter() {
        let name = if prefix.is_empty() { key.get_ref().to_string() } else { format!("{prefix}.{}", key.get_ref()) };
        match value.get_ref() {
            DeValue::Table(inner) => flatten_keys(inner, &name, offsets),
            _ => offsets.push((name, key.span().start)),
        }
    }
}

/// The field a serde message is about: "missing field `x`" or "unknown field `x`, ...".
fn field_named(message: &str) -> Option<&str> {
    ["missing field `", "unknown field `"].iter().find_map(|prefix| {
        let rest = message.strip_prefix(prefix)?;
        rest.split('`').next()
    })
}

fn clean_message(message: &str) -> String {
    message.trim_end().to_owned()
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_display_like_toml_keys() {
        let path = KeyPath::root().key("venue").key("schedules").index(0).key("sections").index(1).key("seats");
        assert_eq!(path.to_string(), "venue.schedules[0].sections[1].seats");
        assert_eq!(KeyPath::root().key("slo").key("latency.hold.p99_us").to_string(), r#"slo."latency.hold.p99_us""#);
        assert_eq!(KeyPath::root().index(2).to_string(), "[2]");
    }

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        // The `=` after "bé " is the 4th character although the 5th byte of the line.
        let equals = text.rfind('=').expect("has an equals sign");
        assert_eq!(line_column(text, equals), (2, 4));
        assert_eq!(line_column(text, text.len() + 10), (3, 1));
    }

    #[test]
    fn locate_finds_keys_inside_arrays_of_tables() {
        let text = "[[a]]\nx = 1\n[[a]]\nx = 2\ny = 3\n";
        let source = Source::parse(text, "t.toml").expect("valid TOML");
        let (span, exact) = source.locate(&KeyPath::root().key("a").index(1).key("y")).expect("exists");
        assert!(exact);
        assert_eq!(line_column(text, span.start), (5, 1));
        let (span, exact) = source.locate(&KeyPath::root().key("a").index(1).key("z")).expect("parent exists");
        assert!(!exact);
        assert_eq!(line_column(text, span.start), (3, 1));
    }

    #[test]
    fn path_at_finds_the_deepest_key() {
        let text = "[t]\nu = { v = 1, w = [1, 2] }\n";
        let source = Source::parse(text, "t.toml").expect("valid TOML");
        let offset = text.find("2]").expect("has 2");
        assert_eq!(source.path_at(offset).to_string(), "t.u.w[1]");
    }

    #[test]
    fn syntax_errors_name_file_line_and_column() {
        let error = Source::parse("a = 1\nb = = 2\n", "x.toml").err().expect("invalid TOML");
        let text = error.to_string();
        assert!(text.starts_with("x.toml:2:5: "), "{text}");
    }

    #[test]
    fn field_named_reads_serde_messages() {
        assert_eq!(field_named("missing field `seed`"), Some("seed"));
        assert_eq!(field_named("unknown field `sead`, expected one of `seed`"), Some("sead"));
        assert_eq!(field_named("invalid type: string"), None);
    }
}
