//! Limits arithmetic: pure, no I/O. Both stores apply exactly these rules inside
//! their atomic check-and-count, so the embedded store and DynamoDB agree.
//!
//! * Per-token rate: a sliding-window counter over 60 s. The previous calendar
//!   minute's count is weighted by the part of it still inside the window:
//!   `used = floor(previous * (60 000 - elapsed_ms) / 60 000) + current`, and a
//!   request is allowed while `used < requests_per_minute`. A client that spent its
//!   whole budget at the end of one minute gets it back gradually over the next, so
//!   there is no double burst at a minute boundary.
//! * Monthly quota: a counter per UTC calendar month; allowed while `used < quota`.
//! * Site rate: a counter per UTC second over all tokens of a site.
//! * Failed-token attempts per client: the same sliding window as the token rate.
//!   A client is an IPv4 address or an IPv6 /64 (see [`client_of`]).
//!
//! Only allowed requests are counted.

use chrono::{Datelike, TimeZone, Utc};
use serde::{Deserialize, Serialize};

pub const MINUTE_MS: u64 = 60_000;
pub const MIN_REQUESTS_PER_MINUTE: u64 = 10;
pub const MAX_REQUESTS_PER_MINUTE: u64 = 10_000;
pub const DEFAULT_SITE_REQUESTS_PER_SECOND: u64 = 1_000;
pub const DEFAULT_FAILED_ATTEMPTS_PER_MINUTE: u64 = 30;

/// The client an address counts for in per-client limits: an IPv4 address itself
/// (also written IPv4-mapped, `::ffff:a.b.c.d`), an IPv6 address its /64, the
/// smallest block a site is normally given; one host can pick any address in it, so
/// counting single IPv6 addresses would give it 2^64 budgets.
pub fn client_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// Sliding-window counter of requests over the last 60 s.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlidingWindow {
    /// Calendar minute (`unix_ms / 60 000`) that `current` counts.
    pub minute: u64,
    pub current: u64,
    pub previous: u64,
}

impl SlidingWindow {
    /// The window as seen at `now_ms` (rolled forward; a clock that went back keeps
    /// the newer window).
    pub fn at(self, now_ms: u64) -> Self {
        let m = now_ms / MINUTE_MS;
        if m <= self.minute {
            self
        } else if m == self.minute + 1 {
            Self {
                minute: m,
                current: 0,
                previous: self.current,
            }
        } else {
            Self {
                minute: m,
                current: 0,
                previous: 0,
            }
        }
    }

    /// Weighted number of requests in the 60 s up to `now_ms`.
    pub fn used(self, now_ms: u64) -> u64 {
        let w = self.at(now_ms);
        let elapsed = now_ms
            .saturating_sub(w.minute * MINUTE_MS)
            .min(MINUTE_MS - 1);
        w.previous * (MINUTE_MS - elapsed) / MINUTE_MS + w.current
    }

    pub fn allows(self, limit: u64, now_ms: u64) -> bool {
        self.used(now_ms) < limit
    }

    /// Count one request at `now_ms`.
    pub fn record(self, now_ms: u64) -> Self {
        let mut w = self.at(now_ms);
        w.current += 1;
        w
    }

    /// Whole seconds from `now_ms` until one more request would be allowed.
    pub fn retry_after_secs(self, limit: u64, now_ms: u64) -> u64 {
        (1..=121)
            .find(|s| self.allows(limit, now_ms + s * 1000))
            .unwrap_or(121)
    }

    /// Unix second at which the window holds no counted request any more.
    pub fn reset_unix(self, now_ms: u64) -> u64 {
        let w = self.at(now_ms);
        if w.current > 0 {
            (w.minute + 2) * 60
        } else if w.previous > 0 {
            (w.minute + 1) * 60
        } else {
            now_ms / 1000
        }
    }
}

/// `yyyymm` of the UTC calendar month containing `now_ms`.
pub fn period_of(now_ms: u64) -> u32 {
    let t = Utc
        .timestamp_millis_opt(now_ms as i64)
        .single()
        .unwrap_or_default();
    t.year() as u32 * 100 + t.month()
}

/// Unix second at which the month after `period` starts.
pub fn period_end_unix(period: u32) -> u64 {
    let (y, m) = ((period / 100) as i32, period % 100);
    let (ny, nm) = if m >= 12 { (y + 1, 1) } else { (y, m + 1) };
    Utc.with_ymd_and_hms(ny, nm, 1, 0, 0, 0)
        .single()
        .map(|t| t.timestamp() as u64)
        .unwrap_or(0)
}

/// Requests counted in one UTC calendar month.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuotaCounter {
    pub period: u32,
    pub used: u64,
}

impl QuotaCounter {
    pub fn at(self, now_ms: u64) -> Self {
        let p = period_of(now_ms);
        if p > self.period {
            Self { period: p, used: 0 }
        } else {
            self
        }
    }
}

/// Requests counted in one UTC second (site-level limit).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecondWindow {
    pub second: u64,
    pub count: u64,
}

impl SecondWindow {
    pub fn at(self, now_ms: u64) -> Self {
        let s = now_ms / 1000;
        if s > self.second {
            Self {
                second: s,
                count: 0,
            }
        } else {
            self
        }
    }
}

/// A plan's limits as the gateway applies them.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlanLimits {
    pub requests_per_minute: u64,
    pub monthly_quota: u64,
}

/// A token's counters.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenUsage {
    pub window: SlidingWindow,
    pub quota: QuotaCounter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    SiteRateLimited,
    QuotaExceeded,
    RateLimited,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaEventKind {
    /// Usage first reached 80 % of the monthly quota.
    Warning,
    /// Usage reached 100 % of the monthly quota.
    Exhausted,
}

impl QuotaEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaEventKind::Warning => "warning",
            QuotaEventKind::Exhausted => "exhausted",
        }
    }
}

/// ceil(80 % of quota).
pub fn warning_threshold(quota: u64) -> u64 {
    (quota * 4).div_ceil(5)
}

/// What one request does to a token's (and its site's) counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub verdict: Verdict,
    pub usage: TokenUsage,
    pub site: SecondWindow,
    pub remaining_minute: u64,
    pub remaining_quota: u64,
    pub reset_minute_unix: u64,
    pub reset_quota_unix: u64,
    pub retry_after_secs: Option<u64>,
    /// Quota events this request crossed (each crossed by exactly one request).
    pub events: Vec<QuotaEventKind>,
}

/// Decide one request and return the counters to store (unchanged when denied).
pub fn evaluate(
    usage: TokenUsage,
    site: SecondWindow,
    limits: PlanLimits,
    site_requests_per_second: u64,
    now_ms: u64,
) -> Evaluation {
    let window = usage.window.at(now_ms);
    let quota = usage.quota.at(now_ms);
    let site = site.at(now_ms);
    let rpm = limits.requests_per_minute;
    let reset_quota_unix = period_end_unix(quota.period);
    let now_s = now_ms / 1000;

    let verdict = if site.count >= site_requests_per_second {
        Verdict::SiteRateLimited
    } else if quota.used >= limits.monthly_quota {
        Verdict::QuotaExceeded
    } else if !window.allows(rpm, now_ms) {
        Verdict::RateLimited
    } else {
        Verdict::Allow
    };

    match verdict {
        Verdict::Allow => {
            let window = window.record(now_ms);
            let quota = QuotaCounter {
                period: quota.period,
                used: quota.used + 1,
            };
            let mut events = Vec::new();
            if quota.used == warning_threshold(limits.monthly_quota) {
                events.push(QuotaEventKind::Warning);
            }
            if quota.used == limits.monthly_quota {
                events.push(QuotaEventKind::Exhausted);
            }
            Evaluation {
                verdict,
                usage: TokenUsage { window, quota },
                site: SecondWindow {
                    second: site.second,
                    count: site.count + 1,
                },
                remaining_minute: rpm.saturating_sub(window.used(now_ms)),
                remaining_quota: limits.monthly_quota.saturating_sub(quota.used),
                reset_minute_unix: window.reset_unix(now_ms),
                reset_quota_unix,
                retry_after_secs: None,
                events,
            }
        }
        denied => {
            let retry = match denied {
                Verdict::SiteRateLimited => 1,
                Verdict::QuotaExceeded => reset_quota_unix.saturating_sub(now_s).max(1),
                _ => window.retry_after_secs(rpm, now_ms),
            };
            Evaluation {
                verdict,
                usage: TokenUsage { window, quota },
                site,
                remaining_minute: rpm.saturating_sub(window.used(now_ms)),
                remaining_quota: limits.monthly_quota.saturating_sub(quota.used),
                reset_minute_unix: window.reset_unix(now_ms),
                reset_quota_unix,
                retry_after_secs: Some(retry),
                events: Vec::new(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_an_ipv4_address_or_an_ipv6_64() {
        let c = |ip: &str| client_of(ip.parse().unwrap()).to_string();
        assert_eq!(c("203.0.113.9"), "203.0.113.9");
        assert_eq!(c("::ffff:203.0.113.9"), "203.0.113.9");
        assert_eq!(c("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(c("2001:db8:1:2::1"), c("2001:db8:1:2:ffff::9"));
        assert_ne!(c("2001:db8:1:2::1"), c("2001:db8:1:3::1"));
    }
    use proptest::prelude::*;

    const T0: u64 = 1_700_000_040_000; // a whole minute boundary
    const LIM: PlanLimits = PlanLimits {
        requests_per_minute: 60,
        monthly_quota: 1_000_000,
    };

    fn run(times: &[u64], limits: PlanLimits) -> Vec<(u64, bool)> {
        let mut u = TokenUsage::default();
        let mut s = SecondWindow::default();
        times
            .iter()
            .map(|&t| {
                let e = evaluate(u, s, limits, u64::MAX, t);
                u = e.usage;
                s = e.site;
                (t, e.verdict == Verdict::Allow)
            })
            .collect()
    }

    #[test]
    fn burst_is_cut_at_the_limit() {
        assert_eq!(T0 % MINUTE_MS, 0);
        let r = run(&[T0 + 5; 200], LIM);
        assert_eq!(r.iter().filter(|x| x.1).count(), 60);
    }

    #[test]
    fn no_double_burst_at_minute_boundary() {
        // 60 at the last millisecond of a minute, then a burst right after the boundary.
        let mut times = vec![T0 - 1; 60];
        times.extend(vec![T0 + 1; 60]);
        let r = run(&times, LIM);
        assert_eq!(r.iter().filter(|x| x.1).count(), 61);
    }

    #[test]
    fn retry_after_is_when_it_allows_again() {
        let mut u = TokenUsage::default();
        for _ in 0..60 {
            u = evaluate(u, SecondWindow::default(), LIM, 1000, T0).usage;
        }
        let e = evaluate(u, SecondWindow::default(), LIM, 1000, T0);
        assert_eq!(e.verdict, Verdict::RateLimited);
        let wait = e.retry_after_secs.unwrap();
        assert_eq!(
            wait, 61,
            "next minute starts in 60 s, and 1 s in it frees one slot"
        );
        let later = evaluate(u, SecondWindow::default(), LIM, 1000, T0 + wait * 1000);
        assert_eq!(later.verdict, Verdict::Allow);
        let earlier = evaluate(
            u,
            SecondWindow::default(),
            LIM,
            1000,
            T0 + (wait - 1) * 1000,
        );
        assert_eq!(earlier.verdict, Verdict::RateLimited);
    }

    #[test]
    fn quota_months_and_events() {
        let limits = PlanLimits {
            requests_per_minute: 10_000,
            monthly_quota: 10,
        };
        let mut u = TokenUsage::default();
        let mut events = Vec::new();
        let mut allowed = 0;
        for i in 0..15 {
            let e = evaluate(u, SecondWindow::default(), limits, 1000, T0 + i);
            if e.verdict == Verdict::Allow {
                allowed += 1;
            } else {
                assert_eq!(e.verdict, Verdict::QuotaExceeded);
                assert!(e.retry_after_secs.unwrap() > 0);
            }
            events.extend(e.events.iter().map(|k| (e.usage.quota.used, *k)));
            u = e.usage;
        }
        assert_eq!(allowed, 10);
        assert_eq!(
            events,
            vec![
                (8, QuotaEventKind::Warning),
                (10, QuotaEventKind::Exhausted)
            ]
        );
        // Next month starts fresh.
        let next = period_end_unix(period_of(T0)) * 1000;
        let e = evaluate(u, SecondWindow::default(), limits, 1000, next);
        assert_eq!(e.verdict, Verdict::Allow);
        assert_eq!(e.remaining_quota, 9);
    }

    #[test]
    fn months() {
        assert_eq!(period_of(0), 197001);
        assert_eq!(period_end_unix(197001), 31 * 86400);
        assert_eq!(period_end_unix(202312), 1_704_067_200); // 2024-01-01
        assert_eq!(warning_threshold(100), 80);
        assert_eq!(warning_threshold(101), 81);
        assert_eq!(warning_threshold(1), 1);
    }

    #[test]
    fn site_limit_per_second() {
        let mut s = SecondWindow::default();
        let mut allowed = 0;
        for i in 0..10 {
            let e = evaluate(TokenUsage::default(), s, LIM, 5, T0 + i);
            if e.verdict == Verdict::Allow {
                allowed += 1;
            } else {
                assert_eq!(e.verdict, Verdict::SiteRateLimited);
            }
            s = e.site;
        }
        assert_eq!(allowed, 5);
        assert_eq!(
            evaluate(TokenUsage::default(), s, LIM, 5, T0 + 1000).verdict,
            Verdict::Allow
        );
    }

    proptest! {
        /// Within one calendar minute never more than the limit; across a boundary,
        /// any span [b - d1, b + d2] holds at most limit + limit*d2/60 s + 1.
        #[test]
        fn sliding_window_bounds(limit in 10u64..200, gaps in proptest::collection::vec(0u64..3_000, 1..600)) {
            let limits = PlanLimits { requests_per_minute: limit, monthly_quota: u64::MAX / 8 };
            let mut t = T0;
            let times: Vec<u64> = gaps.iter().map(|g| { t += g; t }).collect();
            let allowed: Vec<u64> = run(&times, limits).into_iter().filter(|x| x.1).map(|x| x.0).collect();
            let mut per_minute = std::collections::HashMap::new();
            for a in &allowed { *per_minute.entry(a / MINUTE_MS).or_insert(0u64) += 1; }
            prop_assert!(per_minute.values().all(|&c| c <= limit));
            for b in (T0 / MINUTE_MS + 1..=t / MINUTE_MS).map(|m| m * MINUTE_MS) {
                for d2 in [1u64, 1_000, 10_000, 30_000] {
                    let n = allowed.iter().filter(|&&a| a + MINUTE_MS > b && a < b + d2).count() as u64;
                    prop_assert!(n <= limit + limit * d2 / MINUTE_MS + 1, "b={b} d2={d2} n={n}");
                }
            }
        }

        /// The quota is never overshot and remaining counts down to zero.
        #[test]
        fn quota_never_overshot(quota in 1u64..300, n in 1usize..600) {
            let limits = PlanLimits { requests_per_minute: 10_000, monthly_quota: quota };
            let times: Vec<u64> = (0..n as u64).map(|i| T0 + i * 10).collect();
            let allowed = run(&times, limits).iter().filter(|x| x.1).count() as u64;
            prop_assert_eq!(allowed, quota.min(n as u64));
        }

        /// Retry-After is exact: allowed at that second, not one second before.
        #[test]
        fn retry_after_exact(limit in 10u64..100, prev in 0u64..150, cur in 0u64..150, offset in 0u64..MINUTE_MS) {
            let now = T0 + offset;
            let w = SlidingWindow { minute: now / MINUTE_MS, current: cur, previous: prev };
            if !w.allows(limit, now) {
                let s = w.retry_after_secs(limit, now);
                prop_assert!(w.allows(limit, now + s * 1000));
                prop_assert!(!w.allows(limit, now + (s - 1) * 1000));
            }
        }
    }
}
