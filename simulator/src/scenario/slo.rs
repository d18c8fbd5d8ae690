//! `[slo]`: the thresholds the gate judges a run by, written as `metric = "op number"`.
//!
//! Metric names are dotted paths into the run result's score (`oversell`,
//! `latency.hold.p99_us`); they may be written as quoted keys (`"latency.hold.p99_us" = ...`)
//! or as nested tables (`[slo.latency.hold]` then `p99_us = ...`), which mean the same thing.

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The most thresholds one scenario may set.
const THRESHOLDS_MAX: usize = 1_000;

/// The thresholds of `[slo]`, in the order they appear in the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slo {
    /// One entry per metric.
    pub thresholds: Vec<SloThreshold>,
}

/// One threshold: `metric op value`, such as `latency.hold.p99_us < 50000`.
#[derive(Debug, Clone, PartialEq)]
pub struct SloThreshold {
    /// The dotted path of the metric in the run result's score.
    pub metric: String,
    /// How the measured value is compared.
    pub op: SloOp,
    /// The number it is compared with.
    pub value: f64,
}

/// A comparison in an SLO expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SloOp {
    /// `<`
    Less,
    /// `<=`
    LessOrEqual,
    /// `==`
    Equal,
    /// `>=`
    GreaterOrEqual,
    /// `>`
    Greater,
}

impl SloOp {
    /// The operator as written in scenario files.
    pub fn symbol(self) -> &'static str {
        match self {
            SloOp::Less => "<",
            SloOp::LessOrEqual => "<=",
            SloOp::Equal => "==",
            SloOp::GreaterOrEqual => ">=",
            SloOp::Greater => ">",
        }
    }

    /// Whether `actual op threshold` holds. NaN never holds.
    pub fn holds(self, actual: f64, threshold: f64) -> bool {
        match self {
            SloOp::Less => actual < threshold,
            SloOp::LessOrEqual => actual <= threshold,
            SloOp::Equal => actual == threshold,
            SloOp::GreaterOrEqual => actual >= threshold,
            SloOp::Greater => actual > threshold,
        }
    }
}

impl SloThreshold {
    /// Parses `expression` (such as `"< 50000"`) as the threshold for `metric`.
    pub fn parse(metric: &str, expression: &str) -> Result<Self, String> {
        check_metric(metric)?;
        let (op, value) = parse_expression(expression)?;
        Ok(Self { metric: metric.to_owned(), op, value })
    }

    /// Parses a whole threshold, k6-style: `latency.hold.p99_us < 50000`.
    pub fn parse_statement(text: &str) -> Result<Self, String> {
        let at = text.find(['<', '>', '=']).ok_or_else(|| {
            format!("invalid threshold {text:?}: expected a metric, an operator and a number, as in \"latency.hold.p99_us < 50000\"")
        })?;
        Self::parse(text[..at].trim(), &text[at..])
    }

    /// Whether a run whose metric measured `actual` meets this threshold.
    pub fn holds(&self, actual: f64) -> bool {
        self.op.holds(actual, self.value)
    }

    /// The expression as written in scenario files: `< 50000`.
    pub fn expression(&self) -> String {
        format!("{} {}", self.op.symbol(), self.value)
    }
}

impl fmt::Display for SloThreshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.metric, self.op.symbol(), self.value)
    }
}

impl Slo {
    /// Puts the thresholds in the order their keys appear in the file, given each metric's
    /// offset; metrics without one keep their place at the end.
    pub(crate) fn sort_by_offsets(&mut self, offsets: &[(String, usize)]) {
        let offset_of = |metric: &str| {
            offsets.iter().find(|(name, _offset)| name == metric).map_or(usize::MAX, |(_name, offset)| *offset)
        };
        self.thresholds.sort_by_key(|threshold| offset_of(&threshold.metric));
    }
}

const SYNTAX_HINT: &str = "expected an operator (<, <=, ==, >=, >) and a number, as in \"< 50000\"";

/// Parses `"op number"`; the number may use `_` between digits, as TOML numbers do.
fn parse_expression(expression: &str) -> Result<(SloOp, f64), String> {
    let invalid = || format!("invalid SLO expression {expression:?}: {SYNTAX_HINT}");
    let trimmed = expression.trim();
    // Two-character operators first, so `<=` is not read as `<` followed by `=...`.
    let operators = [
        ("<=", SloOp::LessOrEqual),
        (">=", SloOp::GreaterOrEqual),
        ("==", SloOp::Equal),
        ("<", SloOp::Less),
        (">", SloOp::Greater),
    ];
    let (op, rest) = operators
        .iter()
        .find_map(|(symbol, op)| trimmed.strip_prefix(symbol).map(|rest| (*op, rest.trim())))
        .ok_or_else(invalid)?;
    let number_ok = !rest.is_empty()
        && rest.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '+' | 'e' | 'E'))
        && !rest.starts_with('_')
        && !rest.ends_with('_')
        && !rest.contains("__");
    if !number_ok {
        return Err(invalid());
    }
    let value: f64 = rest.replace('_', "").parse().map_err(|_| invalid())?;
    if !value.is_finite() {
        return Err(invalid());
    }
    Ok((op, value))
}

/// A metric name is dotted segments of lowercase letters, digits, `_` and `-` (the checker's
/// invariants are kebab-case: `violations.no-double-sale`).
fn check_metric(metric: &str) -> Result<(), String> {
    let segment_ok = |segment: &str| {
        !segment.is_empty()
            && segment.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    };
    if metric.split('.').all(segment_ok) {
        Ok(())
    } else {
        Err(format!(
            "invalid SLO metric name {metric:?}: use dotted segments of a-z, 0-9, _ and -, as in \"latency.hold.p99_us\""
        ))
    }
}

impl Serialize for Slo {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.thresholds.len()))?;
        for threshold in &self.thresholds {
            map.serialize_entry(&threshold.metric, &threshold.expression())?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Slo {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut thresholds = Vec::new();
        deserializer.deserialize_map(SloTableVisitor { prefix: String::new(), thresholds: &mut thresholds })?;
        Ok(Slo { thresholds })
    }
}

/// Visits one table of `[slo]`, flattening nested tables into dotted metric names.
struct SloTableVisitor<'a> {
    prefix: String,
    thresholds: &'a mut Vec<SloThreshold>,
}

impl<'de> Visitor<'de> for SloTableVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a table of metric = \"op number\" entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<MetricKey>()? {
            let metric = if self.prefix.is_empty() { key.0 } else { format!("{}.{}", self.prefix, key.0) };
            map.next_value_seed(SloEntrySeed { metric, thresholds: self.thresholds })?;
            if self.thresholds.len() > THRESHOLDS_MAX {
                return Err(de::Error::custom(format!("at most {THRESHOLDS_MAX} SLO thresholds")));
            }
        }
        Ok(())
    }
}

/// A key of `[slo]`, checked to be a metric name (a quoted key may hold several segments).
struct MetricKey(String);

impl<'de> Deserialize<'de> for MetricKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let key = String::deserialize(deserializer)?;
        check_metric(&key).map_err(de::Error::custom)?;
        Ok(MetricKey(key))
    }
}

/// The value of one key of `[slo]`: an expression string, or a nested table of more metrics.
struct SloEntrySeed<'a> {
    metric: String,
    thresholds: &'a mut Vec<SloThreshold>,
}

impl<'de> de::DeserializeSeed<'de> for SloEntrySeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SloEntrySeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an SLO expression such as \"< 50000\", or a table of them")
    }

    fn visit_str<E: de::Error>(self, expression: &str) -> Result<(), E> {
        let (op, value) = parse_expression(expression).map_err(E::custom)?;
        self.thresholds.push(SloThreshold { metric: self.metric, op, value });
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        SloTableVisitor { prefix: self.metric, thresholds: self.thresholds }.visit_map(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(expression: &str, expected: Result<(SloOp, f64), &str>) {
        assert_eq!(parse_expression(expression), expected.map_err(str::to_owned), "{expression:?}");
    }

    #[test]
    fn expressions_parse_into_an_operator_and_a_number() {
        check("== 0", Ok((SloOp::Equal, 0.0)));
        check("<50000", Ok((SloOp::Less, 50_000.0)));
        check(" <= 50_000 ", Ok((SloOp::LessOrEqual, 50_000.0)));
        check(">= 0.95", Ok((SloOp::GreaterOrEqual, 0.95)));
        check("> -1e3", Ok((SloOp::Greater, -1_000.0)));
    }

    #[test]
    fn bad_expressions_say_what_is_expected() {
        let hint = "expected an operator (<, <=, ==, >=, >) and a number, as in \"< 50000\"";
        for bad in ["50", "=< 5", "< ", "< fifty", "!= 3", "< inf", "< NaN", "< 5 ms", "< _5", "<< 5"] {
            assert_eq!(parse_expression(bad), Err(format!("invalid SLO expression {bad:?}: {hint}")));
        }
    }

    #[test]
    fn operators_compare_as_written() {
        assert!(SloOp::Equal.holds(0.0, 0.0));
        assert!(!SloOp::Equal.holds(1.0, 0.0));
        assert!(SloOp::Less.holds(49_999.0, 50_000.0));
        assert!(!SloOp::Less.holds(50_000.0, 50_000.0));
        assert!(SloOp::LessOrEqual.holds(50_000.0, 50_000.0));
        assert!(SloOp::Greater.holds(101.0, 100.0));
        assert!(SloOp::GreaterOrEqual.holds(100.0, 100.0));
        assert!(!SloOp::GreaterOrEqual.holds(f64::NAN, 100.0));
    }

    #[test]
    fn nested_tables_and_quoted_keys_name_the_same_metric() {
        #[derive(Deserialize)]
        struct Wrapper {
            slo: Slo,
        }
        let text = "[slo]\noversell = \"== 0\"\n\"latency.hold.p99_us\" = \"< 50000\"\n[slo.goodput]\nconfirm_per_s = \"> 100\"\n";
        let wrapper: Wrapper = toml::from_str(text).expect("valid SLO table");
        let mut metrics: Vec<String> = wrapper.slo.thresholds.iter().map(ToString::to_string).collect();
        metrics.sort();
        assert_eq!(metrics, ["goodput.confirm_per_s > 100", "latency.hold.p99_us < 50000", "oversell == 0"]);
    }

    #[test]
    fn whole_thresholds_parse_k6_style() {
        let parsed = |text: &str| SloThreshold::parse_statement(text).map(|threshold| threshold.to_string());
        assert_eq!(parsed("oversell == 0"), Ok("oversell == 0".to_owned()));
        assert_eq!(parsed(" latency.hold.p99_us<50_000 "), Ok("latency.hold.p99_us < 50000".to_owned()));
        assert_eq!(parsed("goodput.confirm_per_s >= 100.5"), Ok("goodput.confirm_per_s >= 100.5".to_owned()));
        assert!(parsed("oversell").is_err_and(|error| error.starts_with("invalid threshold \"oversell\"")));
        assert!(parsed("< 5").is_err_and(|error| error.starts_with("invalid SLO metric name \"\"")));
        assert!(parsed("oversell == zero").is_err_and(|error| error.starts_with("invalid SLO expression")));
    }

    #[test]
    fn metric_names_are_lowercase_dotted_segments() {
        assert!(SloThreshold::parse("latency.hold.p99_us", "< 1").is_ok());
        assert!(SloThreshold::parse("violations.no-double-sale", "== 0").is_ok());
        assert_eq!(
            SloThreshold::parse("Latency..p99", "< 1"),
            Err("invalid SLO metric name \"Latency..p99\": use dotted segments of a-z, 0-9, _ and -, as in \
                 \"latency.hold.p99_us\""
                .to_owned())
        );
    }
}
