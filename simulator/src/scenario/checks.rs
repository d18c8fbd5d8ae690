//! The small vocabulary semantic checks are written in: each check names the key it is about
//! and says what was expected and what was found, as `must be > 0 (got 0)`.

use std::fmt::Display;
use std::ops::RangeInclusive;

use super::source::{KeyPath, Problem};

/// Collects the problems found in a scenario.
#[derive(Debug, Default)]
pub(crate) struct Checks {
    problems: Vec<Problem>,
}

impl Checks {
    pub(crate) fn into_problems(self) -> Vec<Problem> {
        self.problems
    }

    /// Records a problem at `path`.
    pub(crate) fn fail(&mut self, path: KeyPath, message: impl Into<String>) {
        self.problems.push(Problem { path, message: message.into() });
    }

    /// `value` must be a finite number greater than zero.
    pub(crate) fn positive(&mut self, path: KeyPath, value: f64) {
        if !(value.is_finite() && value > 0.0) {
            self.fail(path, format!("must be > 0 (got {value})"));
        }
    }

    /// `value` must be a finite number, zero or more.
    pub(crate) fn non_negative(&mut self, path: KeyPath, value: f64) {
        if !(value.is_finite() && value >= 0.0) {
            self.fail(path, format!("must be >= 0 (got {value})"));
        }
    }

    /// A count: more than zero and at most `max`.
    pub(crate) fn count(&mut self, path: KeyPath, value: u64, max: u64) {
        if value == 0 {
            self.fail(path, "must be > 0 (got 0)");
        } else if value > max {
            self.fail(path, format!("must be at most {max} (got {value})"));
        }
    }

    /// `value` must lie in `range`; the message names the range, as the engine's bounds do.
    pub(crate) fn in_range<T: PartialOrd + Display>(&mut self, path: KeyPath, value: T, range: RangeInclusive<T>) {
        if !range.contains(&value) {
            self.fail(path, format!("must be in {}..={} (got {value})", range.start(), range.end()));
        }
    }

    /// `value` must be a finite number in `range`.
    pub(crate) fn in_range_f64(&mut self, path: KeyPath, value: f64, range: RangeInclusive<f64>) {
        if !(value.is_finite() && range.contains(&value)) {
            self.fail(path, format!("must be in {}..={} (got {value})", range.start(), range.end()));
        }
    }

    /// `at_s` must be a time within the run: `0..=duration_s`.
    pub(crate) fn time_in_run(&mut self, path: KeyPath, at_s: f64, duration_s: f64) {
        if !(at_s.is_finite() && at_s >= 0.0) {
            self.fail(path, format!("must be >= 0 (got {at_s})"));
        } else if at_s > duration_s {
            self.fail(path, format!("must be within the run, at most duration_s = {duration_s} (got {at_s})"));
        }
    }

    /// A window `[start_s, end_s]` within the run: the end is checked against the start (named
    /// `start_key`) and against the run's duration.
    pub(crate) fn window_in_run(
        &mut self,
        start: (KeyPath, f64),
        end: (KeyPath, f64),
        start_key: &str,
        duration_s: f64,
    ) {
        let (start_path, start_s) = start;
        let (end_path, end_s) = end;
        self.time_in_run(start_path, start_s, duration_s);
        if end_s.is_finite() && start_s.is_finite() && end_s <= start_s {
            self.fail(end_path, format!("must be after {start_key} = {start_s} (got {end_s})"));
        } else {
            self.time_in_run(end_path, end_s, duration_s);
        }
    }

    /// `value` must not be empty or only blanks.
    pub(crate) fn not_blank(&mut self, path: KeyPath, value: &str) {
        if value.trim().is_empty() {
            self.fail(path, "must not be empty");
        }
    }

    /// A list must have between one and `max` items.
    pub(crate) fn list_length(&mut self, path: KeyPath, length: usize, max: usize) {
        if length == 0 {
            self.fail(path, "must not be empty");
        } else if length > max {
            self.fail(path, format!("must have at most {max} entries (got {length})"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(checks: Checks) -> Vec<String> {
        checks.into_problems().into_iter().map(|problem| format!("{}: {}", problem.path, problem.message)).collect()
    }

    #[test]
    fn checks_name_the_key_the_expectation_and_the_value() {
        let mut checks = Checks::default();
        checks.positive(KeyPath::root().key("a"), 0.0);
        checks.positive(KeyPath::root().key("ok"), 0.5);
        checks.in_range(KeyPath::root().key("b"), 17_u32, 1..=16);
        checks.window_in_run(
            (KeyPath::root().key("at_s"), 30.0),
            (KeyPath::root().key("heal_at_s"), 20.0),
            "at_s",
            60.0,
        );
        checks.time_in_run(KeyPath::root().key("c"), 61.0, 60.0);
        checks.positive(KeyPath::root().key("d"), f64::NAN);
        assert_eq!(
            messages(checks),
            [
                "a: must be > 0 (got 0)",
                "b: must be in 1..=16 (got 17)",
                "heal_at_s: must be after at_s = 30 (got 20)",
                "c: must be within the run, at most duration_s = 60 (got 61)",
                "d: must be > 0 (got NaN)",
            ]
        );
    }
}
