//! Domain records as stored. Secrets appear only hashed or sealed.

use serde::{Deserialize, Serialize};

use crate::limits::{
    PlanLimits, QuotaEventKind, DEFAULT_FAILED_ATTEMPTS_PER_MINUTE,
    DEFAULT_SITE_REQUESTS_PER_SECOND,
};
use crate::seal::SealingKey;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Site {
    pub site_id: String,
    /// `sub` of the site owner.
    pub owner: String,
    pub name: String,
    pub origin_url: String,
    pub site_requests_per_second: u64,
    pub replay_window_seconds: u64,
    /// Failed-token attempts allowed per client and minute.
    pub failed_attempts_per_minute: u64,
    /// Query parameter names whose values are masked in audit records.
    #[serde(default)]
    pub secret_query_params: Vec<String>,
    /// AES-256-GCM sealed signing secret (AAD: site id).
    pub signing_secret_sealed: String,
    #[serde(default)]
    pub previous_secret_sealed: Option<String>,
    /// Unix seconds until which the previous secret still signs.
    #[serde(default)]
    pub previous_valid_until: Option<u64>,
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub webhook_secret_sealed: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
    /// Counts the updates: an update made from a site as read applies only if nobody
    /// changed the site meanwhile (see `SiteStore::update_site`).
    #[serde(default)]
    pub revision: u64,
}

impl Site {
    /// A new site with the documented defaults (1,000 requests a second, a 300 s
    /// replay window, 30 failed attempts a minute, no secret query parameters) and a
    /// fresh signing secret, sealed; the secret is returned beside it, to be shown once.
    pub fn new(
        owner: &str,
        name: &str,
        origin_url: &str,
        sealing: &SealingKey,
        now: u64,
    ) -> (Site, String) {
        let site_id = crate::ids::site_id();
        let secret = crate::ids::signing_secret();
        let site = Site {
            signing_secret_sealed: sealing.seal(&secret, &site_id),
            site_id,
            owner: owner.into(),
            name: name.into(),
            origin_url: origin_url.into(),
            site_requests_per_second: DEFAULT_SITE_REQUESTS_PER_SECOND,
            replay_window_seconds: payfence_signing::DEFAULT_REPLAY_WINDOW_SECS,
            failed_attempts_per_minute: DEFAULT_FAILED_ATTEMPTS_PER_MINUTE,
            secret_query_params: vec![],
            previous_secret_sealed: None,
            previous_valid_until: None,
            webhook_url: None,
            webhook_secret_sealed: None,
            created_at: now,
            updated_at: now,
            revision: 0,
        };
        (site, secret)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Plan {
    pub plan_id: String,
    pub site_id: String,
    pub name: String,
    pub requests_per_minute: u64,
    pub monthly_quota: u64,
    pub created_at: u64,
    pub updated_at: u64,
    /// Counts the updates, as `Site::revision` does.
    #[serde(default)]
    pub revision: u64,
}

impl Plan {
    /// A new plan of `site_id`, with a fresh id, at revision 0.
    pub fn new(
        site_id: &str,
        name: &str,
        requests_per_minute: u64,
        monthly_quota: u64,
        now: u64,
    ) -> Plan {
        Plan {
            plan_id: crate::ids::plan_id(),
            site_id: site_id.into(),
            name: name.into(),
            requests_per_minute,
            monthly_quota,
            created_at: now,
            updated_at: now,
            revision: 0,
        }
    }

    pub fn limits(&self) -> PlanLimits {
        PlanLimits {
            requests_per_minute: self.requests_per_minute,
            monthly_quota: self.monthly_quota,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Token {
    pub token_id: String,
    pub site_id: String,
    pub plan_id: String,
    pub token_hash: String,
    #[serde(default)]
    pub label: Option<String>,
    /// `sub` of the consumer this token belongs to, if any.
    #[serde(default)]
    pub consumer: Option<String>,
    pub created_at: u64,
    #[serde(default)]
    pub revoked_at: Option<u64>,
}

impl Token {
    /// Whether the token is still kept at `now_s`: active, or revoked within
    /// [`REVOKED_KEPT_SECS`].
    pub fn kept_at(&self, now_s: u64) -> bool {
        kept(self.revoked_at, now_s)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiKey {
    pub key_id: String,
    pub site_id: String,
    pub key_hash: String,
    /// First characters of the key, to tell keys apart in listings.
    pub prefix: String,
    /// What the key is for, set by its owner.
    #[serde(default)]
    pub label: Option<String>,
    pub created_at: u64,
    #[serde(default)]
    pub revoked_at: Option<u64>,
}

/// How long a revoked token or API key stays listed and stored: as long as audit
/// records. Revocation is final, so it is only history; this bounds that history.
pub const REVOKED_KEPT_SECS: u64 = AUDIT_RETENTION_SECS;

/// Whether something revoked at `revoked_at` (if ever) is still kept at `now_s`.
fn kept(revoked_at: Option<u64>, now_s: u64) -> bool {
    revoked_at.is_none_or(|r| r.saturating_add(REVOKED_KEPT_SECS) > now_s)
}

impl ApiKey {
    /// Whether the key is still kept at `now_s`: active, or revoked within
    /// [`REVOKED_KEPT_SECS`].
    pub fn kept_at(&self, now_s: u64) -> bool {
        kept(self.revoked_at, now_s)
    }

    /// A new key of the site; the key itself is returned beside it, to be shown once.
    pub fn new(site_id: &str, label: Option<String>, now: u64) -> (ApiKey, String) {
        let secret = crate::ids::api_key();
        let key = ApiKey {
            key_id: crate::ids::key_id(),
            site_id: site_id.into(),
            key_hash: crate::ids::hash_secret(&secret),
            prefix: secret[..7].to_owned(),
            label,
            created_at: now,
            revoked_at: None,
        };
        (key, secret)
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Proxy,
    Middleware,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DecisionKind {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    MissingToken,
    InvalidToken,
    TokenRevoked,
    RateLimited,
    QuotaExceeded,
    SiteRateLimited,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MissingToken => "missing_token",
            Reason::InvalidToken => "invalid_token",
            Reason::TokenRevoked => "token_revoked",
            Reason::RateLimited => "rate_limited",
            Reason::QuotaExceeded => "quota_exceeded",
            Reason::SiteRateLimited => "site_rate_limited",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
    }
}

/// One metadata-only audit record per decision.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    pub id: String,
    /// RFC 3339, UTC, milliseconds.
    pub timestamp: String,
    /// Unix milliseconds (for ordering and filters).
    pub ts_ms: u64,
    pub site_id: String,
    pub token_id: Option<String>,
    pub plan: Option<String>,
    pub method: String,
    pub path: String,
    pub decision: DecisionKind,
    pub reason: Option<Reason>,
    /// Remaining monthly quota after this decision, when the token was resolved.
    pub remaining: Option<u64>,
    pub latency_ms: f64,
    pub mode: Mode,
    /// The unix second from which the record is gone ([`audit_expires_at`]).
    pub expires_at: u64,
}

/// A record of a denied proxy request at `ts_ms`, for tests.
#[cfg(test)]
pub(crate) fn test_record(site_id: &str, ts_ms: u64, path: &str) -> AuditRecord {
    AuditRecord {
        id: crate::ids::log_id(ts_ms * 1000),
        timestamp: rfc3339_ms(ts_ms),
        ts_ms,
        site_id: site_id.into(),
        token_id: None,
        plan: None,
        method: "GET".into(),
        path: path.into(),
        decision: DecisionKind::Deny,
        reason: Some(Reason::InvalidToken),
        remaining: None,
        latency_ms: 0.0,
        mode: Mode::Proxy,
        expires_at: audit_expires_at(ts_ms),
    }
}

/// How long an audit record is kept.
pub const AUDIT_RETENTION_SECS: u64 = 90 * 86_400;

/// `expires_at` of a record made at `ts_ms`: its second plus the retention.
pub fn audit_expires_at(ts_ms: u64) -> u64 {
    ts_ms / 1000 + AUDIT_RETENTION_SECS
}

/// The oldest `ts_ms` of a record still kept at `now_s`, i.e. whose `expires_at` is
/// after `now_s`. Records are ordered by time, so "expired" is "older than this".
pub fn audit_kept_since_ms(now_s: u64) -> u64 {
    (now_s + 1).saturating_sub(AUDIT_RETENTION_SECS) * 1000
}

/// Filters of the logs query (API.md "Audit log").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub token_id: Option<String>,
    pub plan: Option<String>,
    pub decision: Option<DecisionKind>,
    pub reason: Option<Reason>,
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    pub path_prefix: Option<String>,
    pub mode: Option<Mode>,
}

impl AuditFilter {
    pub fn matches(&self, r: &AuditRecord) -> bool {
        self.token_id
            .as_ref()
            .is_none_or(|t| r.token_id.as_ref() == Some(t))
            && self
                .plan
                .as_ref()
                .is_none_or(|p| r.plan.as_ref() == Some(p))
            && self.decision.is_none_or(|d| r.decision == d)
            && self.reason.is_none_or(|x| r.reason == Some(x))
            && self.from_ms.is_none_or(|f| r.ts_ms >= f)
            && self.to_ms.is_none_or(|t| r.ts_ms <= t)
            && self
                .path_prefix
                .as_ref()
                .is_none_or(|p| r.path.starts_with(p.as_str()))
            && self.mode.is_none_or(|m| r.mode == m)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// A quota event (80 % warning or exhaustion), recorded once per token and month.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuotaEvent {
    pub event_id: String,
    pub site_id: String,
    pub token_id: String,
    pub plan: String,
    pub kind: QuotaEventKind,
    pub used: u64,
    pub quota: u64,
    /// `yyyymm`
    pub period: u32,
    pub created_at: u64,
    /// `pending` until the webhook dispatcher delivers it.
    pub status: String,
}

/// One entry of the admin audit trail: who changed what, when.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminEvent {
    pub id: String,
    pub ts_ms: u64,
    pub timestamp: String,
    pub actor: String,
    pub role: String,
    pub action: String,
    pub site_id: Option<String>,
    pub target: Option<String>,
    /// The owner of the site changed, when the change was made: the site owner who
    /// sees it in their trail (also after the site is deleted).
    #[serde(default)]
    pub owner: Option<String>,
}

pub fn rfc3339_ms(ts_ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ts_ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Milliseconds since `since`, to the microsecond (`0.016`, not `0.016093999999999997`),
/// as audit records, health checks and request logs report durations.
pub fn elapsed_ms(since: std::time::Instant) -> f64 {
    since.elapsed().as_micros() as f64 / 1000.0
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    now_us() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoked_tokens_and_keys_are_kept_exactly_as_long_as_audit_records() {
        assert_eq!(REVOKED_KEPT_SECS, 90 * 24 * 3600);
        let (mut k, _) = ApiKey::new("site_0000000000000000", None, 5);
        assert!(k.kept_at(u64::MAX), "an active key is always kept");
        k.revoked_at = Some(100);
        assert!(k.kept_at(100 + REVOKED_KEPT_SECS - 1));
        assert!(!k.kept_at(100 + REVOKED_KEPT_SECS));
        k.revoked_at = Some(u64::MAX);
        assert!(k.kept_at(u64::MAX - 1), "no overflow");
        let mut t = Token {
            token_id: "tok_0000000000000000".into(),
            site_id: k.site_id,
            plan_id: "plan_0000000000000000".into(),
            token_hash: k.key_hash,
            label: None,
            consumer: None,
            created_at: 5,
            revoked_at: None,
        };
        assert!(t.kept_at(u64::MAX), "an active token is always kept");
        t.revoked_at = Some(100);
        assert!(t.kept_at(100 + REVOKED_KEPT_SECS - 1));
        assert!(!t.kept_at(100 + REVOKED_KEPT_SECS));
    }

    #[test]
    fn a_record_is_kept_exactly_while_its_expiry_is_ahead() {
        let now_s = 1_800_000_000;
        let edge = audit_kept_since_ms(now_s);
        for ts_ms in edge - 2_500..edge + 2_500 {
            assert_eq!(audit_expires_at(ts_ms) > now_s, ts_ms >= edge, "{ts_ms}");
        }
        assert_eq!(audit_kept_since_ms(AUDIT_RETENTION_SECS - 2), 0);
    }
}
