//! Repetition budgets, medians and the `@@bench` records the host collects.

use std::time::{Duration, Instant};

/// Median, minimum and maximum of repeated runs.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// The median (mean of the middle two for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many runs.
    pub n: usize,
}

impl Stats {
    /// Of `values` (at least one).
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
            n,
        }
    }
}

/// How often to repeat a measurement: at least `min` times, at most `max`
/// times, and no more once `time` has passed.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Fewest runs.
    pub min: usize,
    /// Most runs.
    pub max: usize,
    /// Time after which no new run starts (once `min` are done).
    pub time: Duration,
}

impl Budget {
    /// A budget of `min..=max` runs within `secs` seconds.
    pub fn new(min: usize, max: usize, secs: f64) -> Self {
        Self {
            min,
            max,
            time: Duration::from_secs_f64(secs),
        }
    }

    /// The same budget with the time scaled by `f` (`--quick`).
    pub fn scaled(self, f: f64) -> Self {
        Self {
            time: self.time.mul_f64(f),
            ..self
        }
    }

    /// Runs `f(i)` for `i = 0, 1, ...` until the budget is spent.
    pub fn repeat<E>(&self, mut f: impl FnMut(usize) -> Result<(), E>) -> Result<usize, E> {
        let start = Instant::now();
        let mut i = 0;
        while i < self.max && (i < self.min || start.elapsed() < self.time) {
            f(i)?;
            i += 1;
        }
        Ok(i)
    }
}

/// Nanoseconds since `t`, as `f64`.
pub fn ns_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e9
}

/// Prints one result for the host: `@@bench {json}`. `group` names the
/// table, `series` the line in it, `op` the operation, `x` the size in
/// bytes or the count; `unit` is `ns`, `ratio` or `bytes`.
pub fn emit(group: &str, series: &str, op: &str, x: u64, unit: &str, s: &Stats) {
    let v = serde_json::json!({
        "group": group,
        "series": series,
        "op": op,
        "x": x,
        "unit": unit,
        "median": finite(s.median),
        "min": finite(s.min),
        "max": finite(s.max),
        "n": s.n,
    });
    directive(&format!("@@bench {v}"));
}

/// Prints a free-form fact about the run (`@@bench {"group":"meta",...}`).
pub fn emit_meta(key: &str, value: &str) {
    let v = serde_json::json!({ "group": "meta", "key": key, "value": value });
    directive(&format!("@@bench {v}"));
}

fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::Value::Null
    }
}

/// Writes a line to stdout and flushes it.
pub fn directive(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        let s = Stats::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Stats::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }

    #[test]
    fn budget_counts() {
        let b = Budget::new(2, 5, 0.0);
        let mut n = 0;
        assert_eq!(
            b.repeat::<()>(|_| {
                n += 1;
                Ok(())
            }),
            Ok(2)
        );
        assert_eq!(n, 2);
    }
}
