//! Arrival curves (`[[arrivals]]`): how many users arrive, from when, and in what shape, and
//! their expansion into arrival times.
//!
//! Each shape is a density over its window, defined without randomness; the expansion splits
//! the curve's total mass into `users` equal slices and places one arrival at a seeded random
//! point inside each slice (stratified sampling through the inverse of the cumulative
//! distribution). So the count is exact, the times are sorted and inside the window, and the
//! same seed gives the same times.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::checks::Checks;
use super::source::{KeyPath, deserialize_variant, tag_of};
use super::us_from_s;

/// The most users one curve may bring (and all curves together).
pub const USERS_MAX: u64 = 10_000_000;
/// The most steps in a `steps` curve.
const STEPS_MAX: usize = 1_000;
/// A spike's tail is cut where its rate has fallen to 1 % of the peak: `ln(100)` time constants
/// after the peak.
const SPIKE_TAIL_TIME_CONSTANTS: f64 = 4.605_170_185_988_091;

/// How users arrive over one window of the run, tagged by `shape`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "kebab-case")]
pub enum ArrivalCurve {
    /// A ticket opening: the rate rises linearly to its peak over `ramp_s`, then decays
    /// exponentially with time constant `decay_s`.
    Spike(Spike),
    /// The rate grows linearly from zero over `duration_s`.
    Ramp(Ramp),
    /// A constant rate over `duration_s`.
    Constant(Constant),
    /// A piecewise-constant rate.
    Steps(Steps),
}

/// `shape = "spike"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spike {
    /// How many users arrive.
    pub users: u64,
    /// When the curve starts, in seconds from the start of the run.
    #[serde(default)]
    pub start_s: f64,
    /// Rise time from zero to the peak rate; 0 makes the peak instantaneous.
    pub ramp_s: f64,
    /// Time constant of the decay after the peak.
    #[serde(default = "default_decay_s")]
    pub decay_s: f64,
}

/// `shape = "ramp"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ramp {
    /// How many users arrive.
    pub users: u64,
    /// When the curve starts, in seconds from the start of the run.
    #[serde(default)]
    pub start_s: f64,
    /// How long the rate grows.
    pub duration_s: f64,
}

/// `shape = "constant"`: give either `users` or `rate_per_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constant {
    /// How many users arrive in total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<u64>,
    /// Users per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_s: Option<f64>,
    /// When the curve starts, in seconds from the start of the run.
    #[serde(default)]
    pub start_s: f64,
    /// How long the curve lasts.
    pub duration_s: f64,
}

/// `shape = "steps"`: rates that change at given times. With `users`, the rates only give the
/// shape and are scaled so that exactly `users` arrive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Steps {
    /// How many users arrive in total; without it, the integral of the rates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<u64>,
    /// When the curve starts, in seconds from the start of the run.
    #[serde(default)]
    pub start_s: f64,
    /// How long the curve lasts; the last step lasts until then.
    pub duration_s: f64,
    /// The rate from `at_s` (relative to `start_s`) until the next step; zero before the first.
    pub steps: Vec<Step>,
}

/// One step of a `steps` curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// When the step begins, in seconds from the curve's `start_s`.
    pub at_s: f64,
    /// Users per second from then on.
    pub rate_per_s: f64,
}

fn default_decay_s() -> f64 {
    30.0
}

impl ArrivalCurve {
    /// How many users this curve brings.
    pub fn users(&self) -> u64 {
        match self {
            ArrivalCurve::Spike(spike) => spike.users,
            ArrivalCurve::Ramp(ramp) => ramp.users,
            ArrivalCurve::Constant(constant) => constant
                .users
                .unwrap_or_else(|| count_from_mass(constant.rate_per_s.unwrap_or(0.0) * constant.duration_s)),
            ArrivalCurve::Steps(steps) => steps.users.unwrap_or_else(|| count_from_mass(steps.mass())),
        }
    }

    /// When the curve starts, in seconds from the start of the run.
    pub fn start_s(&self) -> f64 {
        match self {
            ArrivalCurve::Spike(spike) => spike.start_s,
            ArrivalCurve::Ramp(ramp) => ramp.start_s,
            ArrivalCurve::Constant(constant) => constant.start_s,
            ArrivalCurve::Steps(steps) => steps.start_s,
        }
    }

    /// How long the curve lasts; every arrival is in `start_s..=start_s + window_s`.
    pub fn window_s(&self) -> f64 {
        match self {
            ArrivalCurve::Spike(spike) => spike.ramp_s + spike.decay_s * SPIKE_TAIL_TIME_CONSTANTS,
            ArrivalCurve::Ramp(Ramp { duration_s, .. })
            | ArrivalCurve::Constant(Constant { duration_s, .. })
            | ArrivalCurve::Steps(Steps { duration_s, .. }) => *duration_s,
        }
    }

    /// The arrival times of this curve's users, in simulated microseconds since the start of
    /// the run, sorted; `seed` drives the jitter inside each slice, nothing else.
    pub fn arrival_times_us(&self, seed: u64) -> Vec<u64> {
        let users = self.users().min(USERS_MAX);
        let start_us = us_from_s(self.start_s());
        let window_s = self.window_s();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut times = Vec::with_capacity(usize::try_from(users).unwrap_or(0));
        let mut previous_offset_s = 0.0_f64;
        for index in 0..users {
            let jitter: f64 = rng.random();
            let quantile = (index as f64 + jitter) / users as f64;
            // Monotone in exact arithmetic; the running maximum keeps rounding from unsorting.
            let offset_s = self.offset_at_quantile(quantile).clamp(0.0, window_s).max(previous_offset_s);
            previous_offset_s = offset_s;
            times.push(start_us + us_from_s(offset_s));
        }
        times
    }

    /// The inverse of the curve's cumulative distribution: the offset from `start_s` by which
    /// a fraction `quantile` of the users has arrived.
    fn offset_at_quantile(&self, quantile: f64) -> f64 {
        match self {
            ArrivalCurve::Spike(spike) => spike.offset_at_quantile(quantile),
            ArrivalCurve::Ramp(ramp) => ramp.duration_s * quantile.sqrt(),
            ArrivalCurve::Constant(constant) => constant.duration_s * quantile,
            ArrivalCurve::Steps(steps) => steps.offset_at_quantile(quantile),
        }
    }

    /// Checks the curve at `path` against the run's duration.
    pub(crate) fn check(&self, checks: &mut Checks, path: &KeyPath, duration_s: f64) {
        checks.time_in_run(path.key("start_s"), self.start_s(), duration_s);
        match self {
            ArrivalCurve::Spike(spike) => {
                checks.in_range(path.key("users"), spike.users, 1..=USERS_MAX);
                checks.non_negative(path.key("ramp_s"), spike.ramp_s);
                checks.positive(path.key("decay_s"), spike.decay_s);
            }
            ArrivalCurve::Ramp(ramp) => {
                checks.in_range(path.key("users"), ramp.users, 1..=USERS_MAX);
                checks.positive(path.key("duration_s"), ramp.duration_s);
            }
            ArrivalCurve::Constant(constant) => constant.check(checks, path),
            ArrivalCurve::Steps(steps) => steps.check(checks, path),
        }
        let end_s = self.start_s() + self.window_s();
        if end_s.is_finite() && end_s > duration_s {
            let (key, how) = match self {
                ArrivalCurve::Spike(_) => ("decay_s", "start_s + ramp_s + 4.6 × decay_s"),
                _ => ("duration_s", "start_s + duration_s"),
            };
            checks.fail(
                path.key(key),
                format!("the curve ends at {end_s:.1} s ({how}), after the run's duration_s = {duration_s}"),
            );
        }
    }
}

impl Spike {
    fn offset_at_quantile(&self, quantile: f64) -> f64 {
        let rise_mass = self.ramp_s / 2.0;
        let tail_mass = self.decay_s * (1.0 - (-SPIKE_TAIL_TIME_CONSTANTS).exp());
        let mass = quantile * (rise_mass + tail_mass);
        if mass < rise_mass {
            // Rising edge: rate t / ramp_s, cumulative t² / (2 ramp_s).
            (2.0 * self.ramp_s * mass).sqrt()
        } else {
            // Tail: rate exp(-(t - ramp_s) / decay_s), cumulative decay_s (1 - exp(..)).
            let fraction = ((mass - rise_mass) / self.decay_s).min(1.0);
            self.ramp_s - self.decay_s * (1.0 - fraction).ln()
        }
    }
}

impl Constant {
    fn check(&self, checks: &mut Checks, path: &KeyPath) {
        checks.positive(path.key("duration_s"), self.duration_s);
        match (self.users, self.rate_per_s) {
            (Some(_), Some(_)) => {
                checks.fail(path.key("rate_per_s"), "give either `users` or `rate_per_s`, not both");
            }
            (None, None) => checks.fail(path.key("users"), "give either `users` or `rate_per_s`"),
            (Some(users), None) => checks.in_range(path.key("users"), users, 1..=USERS_MAX),
            (None, Some(rate_per_s)) => {
                checks.positive(path.key("rate_per_s"), rate_per_s);
                let users = count_from_mass(rate_per_s * self.duration_s);
                if rate_per_s > 0.0 && !(1..=USERS_MAX).contains(&users) {
                    checks.fail(
                        path.key("rate_per_s"),
                        format!("brings {users} users over duration_s; must be in 1..={USERS_MAX}"),
                    );
                }
            }
        }
    }
}

impl Steps {
    /// The integral of the rate over the curve: users per second times seconds.
    fn mass(&self) -> f64 {
        self.segments().map(|(begin_s, end_s, rate_per_s)| (end_s - begin_s) * rate_per_s).sum()
    }

    /// Each step as `(begin_s, end_s, rate_per_s)`, the last one ending at `duration_s`.
    fn segments(&self) -> impl Iterator<Item = (f64, f64, f64)> + '_ {
        self.steps.iter().enumerate().map(|(index, step)| {
            let end_s = self.steps.get(index + 1).map_or(self.duration_s, |next| next.at_s);
            (step.at_s, end_s.max(step.at_s), step.rate_per_s)
        })
    }

    fn offset_at_quantile(&self, quantile: f64) -> f64 {
        let mut remaining = quantile * self.mass();
        let mut last_end_s = 0.0;
        for (begin_s, end_s, rate_per_s) in self.segments() {
            let segment_mass = (end_s - begin_s) * rate_per_s;
            if segment_mass <= 0.0 {
                continue;
            }
            if remaining < segment_mass {
                return begin_s + remaining / rate_per_s;
            }
            remaining -= segment_mass;
            last_end_s = end_s;
        }
        last_end_s
    }

    fn check(&self, checks: &mut Checks, path: &KeyPath) {
        checks.positive(path.key("duration_s"), self.duration_s);
        checks.list_length(path.key("steps"), self.steps.len(), STEPS_MAX);
        let mut previous_at_s = None;
        for (index, step) in self.steps.iter().enumerate() {
            let step_path = path.key("steps").index(index);
            checks.non_negative(step_path.key("rate_per_s"), step.rate_per_s);
            if !(step.at_s.is_finite() && step.at_s >= 0.0 && step.at_s < self.duration_s) {
                checks.fail(
                    step_path.key("at_s"),
                    format!("must be in 0..duration_s = {} (got {})", self.duration_s, step.at_s),
                );
            } else if let Some(previous_at_s) = previous_at_s
                && step.at_s <= previous_at_s
            {
                checks.fail(
                    step_path.key("at_s"),
                    format!("steps must be in increasing order of at_s (got {} after {previous_at_s})", step.at_s),
                );
            }
            previous_at_s = Some(step.at_s);
        }
        match self.users {
            Some(users) => {
                checks.in_range(path.key("users"), users, 1..=USERS_MAX);
                if !self.steps.is_empty()
                    && !self.segments().any(|(begin_s, end_s, rate_per_s)| end_s > begin_s && rate_per_s > 0.0)
                {
                    checks.fail(path.key("steps"), "at least one step must have a rate > 0");
                }
            }
            None => {
                let users = count_from_mass(self.mass());
                if !self.steps.is_empty() && !(1..=USERS_MAX).contains(&users) {
                    checks
                        .fail(path.key("steps"), format!("the rates bring {users} users; must be in 1..={USERS_MAX}"));
                }
            }
        }
    }
}

/// The number of users a mass of `rate × time` brings, saturating on nonsense.
fn count_from_mass(mass: f64) -> u64 {
    if mass.is_finite() && mass > 0.0 { mass.round().min(u64::MAX as f64) as u64 } else { 0 }
}

/// Re-deserializes `[[arrivals]]` entries by shape, so errors inside them point at their key.
pub(crate) fn refine_arrival(path: &KeyPath, value: &toml::Spanned<toml::de::DeValue<'_>>) -> Option<toml::de::Error> {
    use super::source::Segment;
    let [Segment::Key(section), Segment::Index(_)] = path.segments() else {
        return None;
    };
    if section != "arrivals" {
        return None;
    }
    match tag_of(value, "shape")? {
        "spike" => deserialize_variant::<Spike>(value, "shape"),
        "ramp" => deserialize_variant::<Ramp>(value, "shape"),
        "constant" => deserialize_variant::<Constant>(value, "shape"),
        "steps" => deserialize_variant::<Steps>(value, "shape"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spike(users: u64) -> ArrivalCurve {
        ArrivalCurve::Spike(Spike { users, start_s: 10.0, ramp_s: 2.0, decay_s: 8.0 })
    }

    #[test]
    fn expansion_brings_exactly_the_users_sorted_and_inside_the_window() {
        let curves = [
            spike(5_000),
            ArrivalCurve::Ramp(Ramp { users: 999, start_s: 0.0, duration_s: 30.0 }),
            ArrivalCurve::Constant(Constant { users: None, rate_per_s: Some(12.5), start_s: 5.0, duration_s: 40.0 }),
            ArrivalCurve::Steps(Steps {
                users: None,
                start_s: 1.0,
                duration_s: 30.0,
                steps: vec![
                    Step { at_s: 5.0, rate_per_s: 10.0 },
                    Step { at_s: 10.0, rate_per_s: 0.0 },
                    Step { at_s: 20.0, rate_per_s: 30.0 },
                ],
            }),
        ];
        let expected_users = [5_000, 999, 500, 350];
        for (curve, expected) in curves.iter().zip(expected_users) {
            let times = curve.arrival_times_us(7);
            assert_eq!(times.len() as u64, expected, "{curve:?}");
            assert!(times.is_sorted(), "{curve:?}");
            let start_us = us_from_s(curve.start_s());
            let end_us = us_from_s(curve.start_s() + curve.window_s());
            assert!(times.iter().all(|&time| (start_us..=end_us).contains(&time)), "{curve:?}");
        }
    }

    #[test]
    fn steps_put_nobody_where_the_rate_is_zero() {
        let curve = ArrivalCurve::Steps(Steps {
            users: Some(1_000),
            start_s: 0.0,
            duration_s: 30.0,
            steps: vec![
                Step { at_s: 5.0, rate_per_s: 10.0 },
                Step { at_s: 10.0, rate_per_s: 0.0 },
                Step { at_s: 20.0, rate_per_s: 30.0 },
            ],
        });
        let times = curve.arrival_times_us(1);
        assert_eq!(times.len(), 1_000);
        let in_gap = times.iter().filter(|&&time| (us_from_s(0.0)..us_from_s(5.0)).contains(&time)).count()
            + times.iter().filter(|&&time| (us_from_s(10.0) + 1..us_from_s(20.0)).contains(&time)).count();
        assert_eq!(in_gap, 0);
        // 50 of 350 units of mass are in the first step: 1/7 of the users.
        let first_step = times.iter().filter(|&&time| time <= us_from_s(10.0)).count();
        assert!((140..=146).contains(&first_step), "{first_step}");
    }

    #[test]
    fn spike_is_front_loaded() {
        let curve = spike(10_000);
        let times = curve.arrival_times_us(3);
        let peak_us = us_from_s(12.0);
        let early = times.iter().filter(|&&time| time <= peak_us + us_from_s(8.0)).count();
        // Rise (1 of 8.92 units of mass) plus one time constant of the tail (63 % of 7.92).
        assert!((6_700..=6_800).contains(&early), "{early}");
        let quarter_us = us_from_s(10.0 + curve.window_s() / 4.0);
        let last_half_us = us_from_s(10.0 + curve.window_s() / 2.0);
        let first_quarter = times.iter().filter(|&&time| time < quarter_us).count();
        let last_half = times.iter().filter(|&&time| time >= last_half_us).count();
        assert!(first_quarter > 5 * last_half, "{first_quarter} vs {last_half}");
    }

    #[test]
    fn instantaneous_spike_starts_at_the_peak() {
        let curve = ArrivalCurve::Spike(Spike { users: 100, start_s: 0.0, ramp_s: 0.0, decay_s: 1.0 });
        let times = curve.arrival_times_us(9);
        assert_eq!(times.len(), 100);
        assert!(times[0] < 20_000, "{}", times[0]);
    }

    #[test]
    fn same_seed_same_times_other_seed_other_times() {
        let curve = spike(1_000);
        assert_eq!(curve.arrival_times_us(42), curve.arrival_times_us(42));
        assert_ne!(curve.arrival_times_us(42), curve.arrival_times_us(43));
    }

    #[test]
    fn a_curve_that_outlasts_the_run_is_reported_at_its_length_key() {
        let mut checks = Checks::default();
        spike(10).check(&mut checks, &KeyPath::root().key("arrivals").index(0), 30.0);
        let problems = checks.into_problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path.to_string(), "arrivals[0].decay_s");
        assert_eq!(
            problems[0].message,
            "the curve ends at 48.8 s (start_s + ramp_s + 4.6 × decay_s), after the run's duration_s = 30"
        );
    }
}
