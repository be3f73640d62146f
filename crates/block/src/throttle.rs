//! I/O throttling: QEMU's throttle groups (leaky buckets for bytes and
//! operations per second, total or per direction, with bursts), shared by
//! the `throttle` filter nodes that name them.

use std::sync::Mutex;
use std::time::Duration;

use qapi::Object;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// QEMU's largest rate or burst value.
const VALUE_MAX: i64 = 1_000_000_000_000_000;

/// What a bucket limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    BpsTotal,
    BpsRead,
    BpsWrite,
    IopsTotal,
    IopsRead,
    IopsWrite,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::BpsTotal,
        Kind::BpsRead,
        Kind::BpsWrite,
        Kind::IopsTotal,
        Kind::IopsRead,
        Kind::IopsWrite,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::BpsTotal => "bps-total",
            Kind::BpsRead => "bps-read",
            Kind::BpsWrite => "bps-write",
            Kind::IopsTotal => "iops-total",
            Kind::IopsRead => "iops-read",
            Kind::IopsWrite => "iops-write",
        }
    }

    /// Whether a read (`write == false`) or a write counts here.
    fn counts(self, write: bool) -> bool {
        match self {
            Kind::BpsTotal | Kind::IopsTotal => true,
            Kind::BpsRead | Kind::IopsRead => !write,
            Kind::BpsWrite | Kind::IopsWrite => write,
        }
    }

    fn is_iops(self) -> bool {
        matches!(self, Kind::IopsTotal | Kind::IopsRead | Kind::IopsWrite)
    }
}

/// One limit: an average rate, and optionally a burst rate that may be
/// sustained for `max_length` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limit {
    /// Units (bytes or operations) per second; 0 for no limit.
    pub avg: u64,
    /// Burst rate; 0 for none (a tenth of a second's worth may go at once).
    pub max: u64,
    /// Seconds a burst may last.
    pub max_length: u64,
}

/// QEMU's `ThrottleLimits`: every limit of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleLimits {
    limits: [Limit; 6],
    /// Operations larger than this count as several (`iops-size`).
    pub iops_size: u64,
}

impl Default for ThrottleLimits {
    fn default() -> ThrottleLimits {
        ThrottleLimits {
            limits: [Limit {
                avg: 0,
                max: 0,
                max_length: 1,
            }; 6],
            iops_size: 0,
        }
    }
}

impl ThrottleLimits {
    /// Reads QAPI's `ThrottleLimits` members (`bps-total`,
    /// `bps-total-max`, `bps-total-max-length`, …, `iops-size`), each with
    /// `prefix` before its name (`x-` for the throttle-group object's
    /// legacy properties), and checks them with QEMU's rules and words.
    pub fn read(obj: &mut Object, prefix: &str) -> Result<ThrottleLimits> {
        let mut out = ThrottleLimits::default();
        let mut raw = [(0i64, 0i64, 1i64); 6];
        for kind in [
            Kind::IopsTotal,
            Kind::IopsRead,
            Kind::IopsWrite,
            Kind::BpsTotal,
            Kind::BpsRead,
            Kind::BpsWrite,
        ] {
            let name = format!("{prefix}{}", kind.name());
            let avg = obj.opt_i64(&name)?.unwrap_or(0);
            let max = obj.opt_i64(&format!("{name}-max"))?.unwrap_or(0);
            let length = obj.opt_i64(&format!("{name}-max-length"))?.unwrap_or(1);
            raw[kind as usize] = (avg, max, length);
        }
        out.iops_size = obj
            .opt_i64(&format!("{prefix}iops-size"))?
            .unwrap_or(0)
            .max(0) as u64;
        let invalid = |m: &str| Err(Error::Throttle(m.to_owned()));
        let set = |k: Kind| raw[k as usize].0 != 0 || raw[k as usize].1 != 0;
        for (total, read, write) in [
            (Kind::BpsTotal, Kind::BpsRead, Kind::BpsWrite),
            (Kind::IopsTotal, Kind::IopsRead, Kind::IopsWrite),
        ] {
            if set(total) && (set(read) || set(write)) {
                return invalid(
                    "bps/iops/max total values and read/write values cannot be used at the same time",
                );
            }
        }
        for kind in Kind::ALL {
            let (avg, max, length) = raw[kind as usize];
            if !(0..=VALUE_MAX).contains(&avg) || !(0..=VALUE_MAX).contains(&max) {
                return invalid("bps/iops/max values must be within [0, 1000000000000000]");
            }
            if length == 0 {
                return invalid("the burst length cannot be 0");
            }
            if length > 1 && max == 0 {
                return invalid("burst length set without burst rate");
            }
            if max != 0 && avg == 0 {
                return invalid("bps_max/iops_max require corresponding bps/iops values");
            }
            if max != 0 && max < avg {
                return invalid("bps_max/iops_max cannot be lower than bps/iops");
            }
            out.limits[kind as usize] = Limit {
                avg: avg as u64,
                max: max as u64,
                max_length: length.max(1) as u64,
            };
        }
        Ok(out)
    }

    /// Whether nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.limits.iter().all(|l| l.avg == 0)
    }
}

/// A bucket's fill: units not yet leaked at the average and at the burst
/// rate.
#[derive(Debug, Clone, Copy, Default)]
struct Level {
    level: f64,
    burst: f64,
}

#[derive(Debug)]
struct State {
    limits: ThrottleLimits,
    levels: [Level; 6],
    last: Instant,
}

/// A throttle group: the limits and the buckets every member node draws
/// from. Requests are admitted one at a time, in arrival order.
#[derive(Debug)]
pub struct ThrottleGroup {
    name: String,
    state: Mutex<State>,
    queue: tokio::sync::Mutex<()>,
}

impl ThrottleGroup {
    /// A group called `name` with `limits`.
    pub fn new(name: &str, limits: ThrottleLimits) -> ThrottleGroup {
        ThrottleGroup {
            name: name.to_owned(),
            state: Mutex::new(State {
                limits,
                levels: [Level::default(); 6],
                last: Instant::now(),
            }),
            queue: tokio::sync::Mutex::new(()),
        }
    }

    /// The group's name (its object id).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current limits.
    pub fn limits(&self) -> ThrottleLimits {
        self.lock().limits.clone()
    }

    /// Replaces the limits (`qom-set`); the buckets keep their fill.
    pub fn set_limits(&self, limits: ThrottleLimits) {
        self.lock().limits = limits;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a request of `bytes` (a write if `write`) may go, and
    /// accounts for it. As in QEMU, admission looks at the buckets before
    /// the request is added: one large request passes at once and makes
    /// the next ones wait.
    pub async fn admit(&self, write: bool, bytes: u64) {
        let _turn = self.queue.lock().await;
        loop {
            let wait = {
                let mut s = self.lock();
                let now = Instant::now();
                let elapsed = now.duration_since(s.last).as_secs_f64();
                s.last = now;
                let mut wait = 0f64;
                for kind in Kind::ALL {
                    let limit = s.limits.limits[kind as usize];
                    let level = &mut s.levels[kind as usize];
                    level.level = (level.level - limit.avg as f64 * elapsed).max(0.0);
                    level.burst = (level.burst - limit.max as f64 * elapsed).max(0.0);
                    if limit.avg == 0 || !kind.counts(write) {
                        continue;
                    }
                    // The bucket holds a burst's worth, or a tenth of a
                    // second's without a burst rate.
                    let (rate, size) = if limit.max == 0 {
                        (limit.avg as f64, limit.avg as f64 / 10.0)
                    } else {
                        (limit.avg as f64, (limit.max * limit.max_length) as f64)
                    };
                    if level.level > size {
                        wait = wait.max((level.level - size) / rate);
                    }
                    // Bursts go no faster than the burst rate.
                    if limit.max != 0 && level.burst > limit.max as f64 / 10.0 {
                        wait = wait.max((level.burst - limit.max as f64 / 10.0) / limit.max as f64);
                    }
                }
                if wait == 0.0 {
                    let iops_size = s.limits.iops_size;
                    let ops = if iops_size > 0 && bytes > iops_size {
                        bytes as f64 / iops_size as f64
                    } else {
                        1.0
                    };
                    for kind in Kind::ALL {
                        if s.limits.limits[kind as usize].avg == 0 || !kind.counts(write) {
                            continue;
                        }
                        let units = if kind.is_iops() { ops } else { bytes as f64 };
                        let level = &mut s.levels[kind as usize];
                        level.level += units;
                        level.burst += units;
                    }
                }
                wait
            };
            if wait == 0.0 {
                return;
            }
            tokio::time::sleep(Duration::from_secs_f64(wait.min(60.0))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits(v: serde_json::Value) -> Result<ThrottleLimits> {
        ThrottleLimits::read(&mut Object::json(&v).unwrap(), "")
    }

    #[test]
    fn checks_are_qemus() {
        let err = |v| limits(v).unwrap_err().to_string();
        assert_eq!(
            err(json!({"bps-total": 1, "bps-read": 1})),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        assert_eq!(
            err(json!({"iops-read-max": 10})),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        assert_eq!(
            err(json!({"bps-write": 10, "bps-write-max": 5})),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
        assert_eq!(
            err(json!({"bps-total": -1})),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            err(json!({"bps-total": 1, "bps-total-max-length": 0})),
            "the burst length cannot be 0"
        );
        assert_eq!(
            err(json!({"bps-total": 1, "bps-total-max-length": 5})),
            "burst length set without burst rate"
        );
        assert!(limits(json!({})).unwrap().is_unlimited());
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_per_second_hold_on_average() {
        let group = ThrottleGroup::new("g", limits(json!({"bps-total": 1_000_000})).unwrap());
        let start = tokio::time::Instant::now();
        for _ in 0..40 {
            group.admit(false, 100_000).await;
        }
        // 4 MB at 1 MB/s, less the 0.1 s bucket and the last request's
        // overdraft: between 3.7 and 4 seconds.
        let took = start.elapsed().as_secs_f64();
        assert!((3.6..=4.0).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_and_directions() {
        // 10 ops/s on average, bursts of 100 ops/s for 2 s: 200 ops first
        // go at the burst rate (about 2 s), the rest at 10/s.
        let group = ThrottleGroup::new(
            "g",
            limits(json!({"iops-write": 10, "iops-write-max": 100, "iops-write-max-length": 2}))
                .unwrap(),
        );
        let start = tokio::time::Instant::now();
        for _ in 0..180 {
            group.admit(true, 512).await;
        }
        let burst = start.elapsed().as_secs_f64();
        assert!((1.0..=2.5).contains(&burst), "{burst}");
        // Reads are not limited by a write limit.
        let t = tokio::time::Instant::now();
        for _ in 0..1000 {
            group.admit(false, 512).await;
        }
        assert_eq!(t.elapsed().as_secs_f64(), 0.0);
    }
}
