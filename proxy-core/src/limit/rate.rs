//! Rates and nginx's `limit_req` arithmetic, as pure functions of (previous state, now).
//!
//! nginx keeps, per key, the *excess* in milli-requests and the time of the last accounted
//! request in milliseconds. A request arriving `ms` after the last one sees
//! `excess = max(0, previous - rate·ms/1000 + 1000)` (rate in milli-requests per second,
//! integer division as nginx does it); it is rejected when that passes the burst
//! (`burst·1000`), otherwise accounted and delayed by `(excess - delay)·1000 / rate` ms
//! when the excess is above the `delay` threshold. A key seen for the first time starts
//! at excess 0. Nothing here reads a clock, so property tests drive it directly.

use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::str::FromStr;

/// A request rate, as nginx's `rate=` takes it: requests per second or per minute.
///
/// Like nginx it is kept as an integer number of milli-requests per second, so
/// `5r/m` is 83 (not 83.33): the same rounding nginx applies, hence the same decisions.
///
/// ```
/// use proxy_core::limit::Rate;
/// let r: Rate = "5r/m".parse().unwrap();
/// assert_eq!(r.milli_per_second(), 83);
/// assert_eq!(r.to_string(), "5r/m");
/// assert_eq!("100r/s".parse::<Rate>().unwrap().milli_per_second(), 100_000);
/// assert!("0r/s".parse::<Rate>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    count: NonZeroU32,
    per_minute: bool,
    milli: NonZeroU64,
}

impl Rate {
    /// `n` requests per second (`rate=Nr/s`).
    pub fn per_second(n: NonZeroU32) -> Rate {
        let milli = u64::from(n.get()) * 1000;
        Rate {
            count: n,
            per_minute: false,
            milli: NonZeroU64::new(milli).unwrap_or(NonZeroU64::MIN),
        }
    }

    /// `n` requests per minute (`rate=Nr/m`).
    pub fn per_minute(n: NonZeroU32) -> Rate {
        // n >= 1 gives at least 1000 / 60 = 16; the fallback cannot be taken.
        let milli = u64::from(n.get()) * 1000 / 60;
        Rate {
            count: n,
            per_minute: true,
            milli: NonZeroU64::new(milli).unwrap_or(NonZeroU64::MIN),
        }
    }

    /// The rate in milli-requests per second, as nginx computes it (`5r/m` is 83).
    pub fn milli_per_second(self) -> u64 {
        self.milli.get()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = if self.per_minute { "m" } else { "s" };
        write!(f, "{}r/{unit}", self.count)
    }
}

/// A rate string that is not `<N>r/s` or `<N>r/m` with `N` from 1 to 4294967295.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseRateError(());

impl fmt::Display for ParseRateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid rate: expected `<N>r/s` or `<N>r/m` with N >= 1")
    }
}

impl std::error::Error for ParseRateError {}

impl FromStr for Rate {
    type Err = ParseRateError;

    fn from_str(s: &str) -> Result<Rate, ParseRateError> {
        let (digits, per_minute) = if let Some(d) = s.strip_suffix("r/s") {
            (d, false)
        } else if let Some(d) = s.strip_suffix("r/m") {
            (d, true)
        } else {
            return Err(ParseRateError(()));
        };
        // Digits only: `u32::from_str` would also take a leading `+`.
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseRateError(()));
        }
        let n = digits
            .parse::<u32>()
            .ok()
            .and_then(NonZeroU32::new)
            .ok_or(ParseRateError(()))?;
        Ok(if per_minute {
            Rate::per_minute(n)
        } else {
            Rate::per_second(n)
        })
    }
}

/// What a zone remembers about one key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct State {
    /// Excess in milli-requests.
    pub(crate) excess: u64,
    /// When the last request was accounted, in ms since the zone's epoch.
    pub(crate) last: u64,
}

/// The excess a request arriving at `now` (ms) would have (nginx's lookup).
pub(crate) fn excess(prev: Option<State>, now: u64, rate: Rate) -> u64 {
    match prev {
        None => 0,
        Some(s) => {
            // Another thread may have accounted a later `now` first: count no time then,
            // as nginx does for a clock that steps back a little.
            let ms = now.saturating_sub(s.last);
            let decay = rate.milli_per_second().saturating_mul(ms) / 1000;
            (s.excess.saturating_add(1000)).saturating_sub(decay)
        }
    }
}

/// The state after accounting a request with `excess` at `now`.
pub(crate) fn account(prev: Option<State>, now: u64, excess: u64) -> State {
    let last = match prev {
        // nginx moves `last` only when some time passed, so truncated decay is not lost
        // twice and a stale `now` never moves it back.
        Some(s) if now <= s.last => s.last,
        _ => now,
    };
    State { excess, last }
}

/// How long (ms) to hold an admitted request: `(excess - delay)·1000 / rate` above the
/// `delay` threshold (milli-requests), else nothing.
pub(crate) fn delay_ms(excess: u64, delay: u64, rate: Rate) -> u64 {
    if excess <= delay {
        0
    } else {
        (excess - delay).saturating_mul(1000) / rate.milli_per_second()
    }
}

/// How long (ms, rounded up) until a request rejected with `excess` above `burst` would be
/// admitted, if nothing else arrives.
pub(crate) fn retry_after_ms(excess: u64, burst: u64, rate: Rate) -> u64 {
    let over = excess.saturating_sub(burst).saturating_mul(1000);
    over.div_ceil(rate.milli_per_second())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    /// Runs one key through a sequence of arrivals; returns (arrival, Some(delay)) for
    /// admitted requests and (arrival, None) for rejected ones.
    fn run(arrivals: &[u64], r: Rate, burst: u64, delay: u64) -> Vec<(u64, Option<u64>)> {
        let mut state = None;
        arrivals
            .iter()
            .map(|&now| {
                let e = excess(state, now, r);
                if e > burst {
                    (now, None)
                } else {
                    state = Some(account(state, now, e));
                    (now, Some(delay_ms(e, delay, r)))
                }
            })
            .collect()
    }

    #[test]
    fn parses_strictly() {
        assert_eq!(rate("1r/s").milli_per_second(), 1000);
        assert_eq!(rate("1r/m").milli_per_second(), 16);
        for bad in [
            "",
            "r/s",
            "5",
            "5r",
            "5r/h",
            "+5r/s",
            "-5r/s",
            " 5r/s",
            "5 r/s",
            "0r/m",
            "4294967296r/s",
            "5R/S",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
        assert_eq!(rate("4294967295r/s").to_string(), "4294967295r/s");
    }

    #[test]
    fn nginx_golden_nodelay_5_per_minute_burst_10() {
        let r = rate("5r/m");
        let burst = 10_000;
        let mut t = vec![0; 12];
        t.extend([11_999, 12_000, 12_048, 12_049]);
        let out = run(&t, r, burst, u64::MAX);
        assert!(out[..11].iter().all(|(_, d)| d.is_some()));
        assert_eq!(out[11].1, None, "12th at once is rejected");
        // 83 milli-requests/s: after 12 000 ms only 996 have decayed; nginx still says no.
        assert_eq!(out[12].1, None);
        assert_eq!(out[13].1, None);
        assert_eq!(out[14].1, None);
        assert_eq!(
            out[15].1,
            Some(0),
            "admitted once a whole request has decayed"
        );
        assert_eq!(retry_after_ms(11_000, burst, r), 12_049);
    }

    #[test]
    fn nginx_golden_delay_spacing() {
        let r = rate("1r/s");
        let out = run(&[0; 7], r, 5_000, 0);
        let delays: Vec<_> = out.iter().map(|(_, d)| *d).collect();
        assert_eq!(
            delays,
            [
                Some(0),
                Some(1000),
                Some(2000),
                Some(3000),
                Some(4000),
                Some(5000),
                None
            ]
        );
        let out = run(&[0; 7], r, 5_000, 2_000);
        let delays: Vec<_> = out.iter().map(|(_, d)| *d).collect();
        assert_eq!(
            delays,
            [
                Some(0),
                Some(0),
                Some(0),
                Some(1000),
                Some(2000),
                Some(3000),
                None
            ]
        );
    }

    #[test]
    fn idle_key_starts_over_and_time_running_back_is_harmless() {
        let r = rate("10r/s");
        let s = State {
            excess: 5_000,
            last: 1_000,
        };
        assert_eq!(excess(Some(s), 1_000_000, r), 0);
        assert_eq!(excess(Some(s), 10, r), 6_000);
        assert_eq!(account(Some(s), 10, 6_000).last, 1_000);
        assert_eq!(excess(Some(s), u64::MAX, r), 0);
    }

    fn arrivals() -> impl Strategy<Value = Vec<u64>> {
        prop::collection::vec(0u64..3_000, 1..200).prop_map(|gaps| {
            gaps.iter()
                .scan(0u64, |t, g| {
                    *t += g;
                    Some(*t)
                })
                .collect()
        })
    }

    fn any_rate() -> impl Strategy<Value = Rate> {
        (1u32..2_000, any::<bool>()).prop_map(|(n, m)| {
            let n = NonZeroU32::new(n).unwrap();
            if m {
                Rate::per_minute(n)
            } else {
                Rate::per_second(n)
            }
        })
    }

    proptest! {
        #[test]
        fn rate_parser_never_panics(s in ".{0,24}") {
            let _ = s.parse::<Rate>();
        }

        #[test]
        fn rate_roundtrips(r in any_rate()) {
            prop_assert_eq!(r.to_string().parse::<Rate>().unwrap(), r);
        }

        /// With nodelay, the admitted requests in any window of t ms never exceed
        /// rate·t + burst + 1.
        #[test]
        fn nodelay_window_bound(t in arrivals(), r in any_rate(), burst in 0u64..20) {
            let out = run(&t, r, burst * 1000, u64::MAX);
            let admitted: Vec<u64> = out.iter().filter(|(_, d)| d.is_some()).map(|(a, _)| *a).collect();
            for i in 0..admitted.len() {
                for j in i..admitted.len() {
                    let n = (j - i + 1) as u128;
                    let window = u128::from(admitted[j] - admitted[i]);
                    // n <= rate_milli·window/1e6 + burst + 1, kept in integers.
                    let lhs = n * 1_000_000;
                    let rhs = u128::from(r.milli_per_second()) * window
                        + u128::from(burst + 1) * 1_000_000;
                    prop_assert!(lhs <= rhs, "{} admitted in {} ms", n, window);
                }
            }
            prop_assert!(out[0].1.is_some(), "the first request is always admitted");
        }

        /// With delays, no delay exceeds burst/rate and requests leave in arrival order.
        #[test]
        fn delays_bounded_and_ordered(
            t in arrivals(), r in any_rate(), burst in 0u64..20, delay in 0u64..5,
        ) {
            let out = run(&t, r, burst * 1000, delay.min(burst) * 1000);
            let max = burst * 1000 * 1000 / r.milli_per_second();
            let mut last_departure = 0;
            for (arrival, d) in out {
                if let Some(d) = d {
                    prop_assert!(d <= max, "delay {} > {}", d, max);
                    prop_assert!(arrival + d >= last_departure, "overtaken");
                    last_departure = arrival + d;
                }
            }
        }
    }
}
