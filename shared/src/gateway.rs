//! The authorize use case shared by proxy and middleware mode: resolve the token,
//! apply the client's failed-attempt limit, then one atomic check-and-count.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::domain::{
    audit_expires_at, elapsed_ms, now_us, rfc3339_ms, ApiKey, AuditRecord, DecisionKind, Mode,
    Reason, Site,
};
use crate::ids;
use crate::limits::{PlanLimits, Verdict};
use crate::seal::SealingKey;
use crate::store::{already_durable, CountRequest, Counted, Durable, Store, StoreError};

/// A site as the hot path needs it, with its signing secrets opened.
pub struct SiteView {
    pub site: Site,
    /// Current secret, then the previous one while its overlap lasts.
    secrets: Vec<(Zeroizing<String>, Option<u64>)>,
}

impl SiteView {
    pub fn open(site: Site, key: &SealingKey) -> Result<Self, GatewayError> {
        let mut secrets = vec![(
            key.open(&site.signing_secret_sealed, &site.site_id)
                .map_err(|e| GatewayError::Internal(e.to_string()))?,
            None,
        )];
        if let (Some(prev), Some(until)) = (&site.previous_secret_sealed, site.previous_valid_until)
        {
            secrets.push((
                key.open(prev, &site.site_id)
                    .map_err(|e| GatewayError::Internal(e.to_string()))?,
                Some(until),
            ));
        }
        Ok(Self { site, secrets })
    }

    /// Secrets that sign at `now_s`, newest first.
    pub fn signing_secrets(&self, now_s: u64) -> Vec<&str> {
        self.secrets
            .iter()
            .filter(|(_, until)| until.is_none_or(|u| now_s < u))
            .map(|(s, _)| s.as_str())
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The outcome of one authorize decision, with what the rate-limit headers need.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Option<Reason>,
    /// 403 instead of 401 for a valid token of another site.
    pub wrong_site: bool,
    pub token_id: Option<String>,
    pub plan: Option<String>,
    pub limits: Option<PlanLimits>,
    pub remaining_minute: u64,
    pub remaining_quota: u64,
    pub reset_minute: u64,
    pub reset_quota: u64,
    pub retry_after: Option<u64>,
}

impl Decision {
    fn deny(reason: Reason) -> Self {
        Self {
            reason: Some(reason),
            ..Default::default()
        }
    }

    /// The HTTP status proxy mode answers a denial with.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self.reason {
            None => S::OK,
            Some(Reason::MissingToken) => S::UNAUTHORIZED,
            Some(Reason::InvalidToken) if self.wrong_site => S::FORBIDDEN,
            Some(Reason::InvalidToken) => S::UNAUTHORIZED,
            Some(Reason::TokenRevoked) => S::FORBIDDEN,
            Some(_) => S::TOO_MANY_REQUESTS,
        }
    }
}

/// A bounded map whose entries are served for at most `ttl`.
struct TtlCache<K, V> {
    ttl: Duration,
    map: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> TtlCache<K, V> {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::default(),
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        let map = self.map.lock().unwrap();
        let (value, at) = map.get(key)?;
        (at.elapsed() < self.ttl).then(|| value.clone())
    }

    fn put(&self, key: K, value: V) {
        let mut map = self.map.lock().unwrap();
        if map.len() >= MAX_CACHED {
            map.clear();
        }
        map.insert(key, (value, Instant::now()));
    }

    fn retain(&self, keep: impl Fn(&K) -> bool) {
        self.map.lock().unwrap().retain(|k, _| keep(k));
    }
}

/// What a token's hash finds: its id and site, which never change, and its plan,
/// which a dashboard change may (so it is cached for `ttl`, as plans are).
#[derive(Clone)]
struct TokenRef {
    token_id: String,
    site_id: String,
    plan_id: String,
}

const MAX_CACHED: usize = 100_000;

/// A plan's name and limits.
type PlanInfo = (String, PlanLimits);

/// The gateway: caches and the decision logic over a store.
pub struct Gateway {
    store: Arc<dyn Store>,
    sealing: SealingKey,
    sites: TtlCache<String, Arc<SiteView>>,
    plans: TtlCache<(String, String), PlanInfo>,
    /// API key hash -> key (positive answers only).
    keys: TtlCache<String, ApiKey>,
    /// Token hash -> token (positive answers only).
    tokens: TtlCache<String, TokenRef>,
    /// (site, client hash) -> blocked until (unix ms), learned from failed attempts.
    blocked: Mutex<HashMap<(String, String), u64>>,
}

impl Gateway {
    pub fn new(store: Arc<dyn Store>, sealing: SealingKey, ttl: Duration) -> Self {
        Self {
            store,
            sealing,
            sites: TtlCache::new(ttl),
            plans: TtlCache::new(ttl),
            keys: TtlCache::new(ttl),
            tokens: TtlCache::new(ttl),
            blocked: Mutex::default(),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn sealing(&self) -> &SealingKey {
        &self.sealing
    }

    /// Forget cached site and plan data (after a change made in this process).
    pub fn invalidate_site(&self, site_id: &str) {
        self.sites.retain(|s| s != site_id);
        self.plans.retain(|(s, _)| s != site_id);
    }

    /// Forget a cached token (after changing it in this process).
    pub fn invalidate_token(&self, token_hash: &str) {
        self.tokens.retain(|h| h != token_hash);
    }

    /// Forget a cached API key (after revoking it in this process).
    pub fn invalidate_key(&self, key_hash: &str) {
        self.keys.retain(|h| h != key_hash);
    }

    /// The active API key with this secret, from cache (at most `ttl` old) or the store.
    pub async fn api_key(&self, secret: &str) -> Result<Option<ApiKey>, GatewayError> {
        let hash = ids::hash_secret(secret);
        if let Some(k) = self.keys.get(&hash) {
            return Ok(Some(k));
        }
        let Some(k) = self.store.key_by_hash(&hash).await? else {
            return Ok(None);
        };
        if k.revoked_at.is_some() {
            return Ok(None);
        }
        self.keys.put(hash, k.clone());
        Ok(Some(k))
    }

    /// The site, from cache (at most `ttl` old) or the store.
    pub async fn site(&self, site_id: &str) -> Result<Option<Arc<SiteView>>, GatewayError> {
        if let Some(view) = self.sites.get(&site_id.to_owned()) {
            return Ok(Some(view));
        }
        let Some(site) = self.store.get_site(site_id).await? else {
            return Ok(None);
        };
        let view = Arc::new(SiteView::open(site, &self.sealing)?);
        self.sites.put(site_id.to_owned(), view.clone());
        Ok(Some(view))
    }

    async fn plan(&self, site_id: &str, plan_id: &str) -> Result<Option<PlanInfo>, GatewayError> {
        let key = (site_id.to_owned(), plan_id.to_owned());
        if let Some(info) = self.plans.get(&key) {
            return Ok(Some(info));
        }
        let Some(plan) = self.store.get_plan(site_id, plan_id).await? else {
            return Ok(None);
        };
        let info = (plan.name.clone(), plan.limits());
        self.plans.put(key, info.clone());
        Ok(Some(info))
    }

    async fn resolve_token(&self, token: &str) -> Result<Option<TokenRef>, GatewayError> {
        let hash = ids::hash_secret(token);
        if let Some(t) = self.tokens.get(&hash) {
            return Ok(Some(t));
        }
        let Some(t) = self.store.token_by_hash(&hash).await? else {
            return Ok(None);
        };
        let r = TokenRef {
            token_id: t.token_id,
            site_id: t.site_id,
            plan_id: t.plan_id,
        };
        self.tokens.put(hash, r.clone());
        Ok(Some(r))
    }

    /// Decide one request for `site`. Writes exactly one audit record. The caller
    /// must await `durable` before it answers anyone (see [`crate::store::Counting`]).
    pub async fn authorize(&self, req: AuthorizeRequest<'_>) -> Result<Authorized, GatewayError> {
        let now_us = now_us();
        let now = now_us / 1000;
        let site = &req.site.site;
        let client = req.client_ip.map(|ip| self.sealing.client_hash(&ip));
        let audit = |decision: &Decision| AuditRecord {
            id: ids::log_id(now_us),
            timestamp: rfc3339_ms(now),
            ts_ms: now,
            site_id: site.site_id.clone(),
            token_id: decision.token_id.clone(),
            plan: decision.plan.clone(),
            method: req.method.to_owned(),
            path: audit_path(req.path_and_query, &site.secret_query_params),
            decision: if decision.allowed {
                DecisionKind::Allow
            } else {
                DecisionKind::Deny
            },
            reason: decision.reason,
            remaining: None,
            latency_ms: elapsed_ms(req.started),
            mode: req.mode,
            expires_at: audit_expires_at(now),
        };

        // A client over its failed-attempt limit is cut off until its window slides.
        if let Some(c) = &client {
            let key = (site.site_id.clone(), c.clone());
            let until = {
                let mut blocked = self.blocked.lock().unwrap();
                match blocked.get(&key).copied() {
                    Some(until) if until > now => Some(until),
                    Some(_) => {
                        blocked.remove(&key);
                        None
                    }
                    None => None,
                }
            };
            if let Some(until) = until {
                let mut d = Decision::deny(Reason::SiteRateLimited);
                d.retry_after = Some((until - now).div_ceil(1000));
                self.store.append_audit(audit(&d)).await?;
                return Ok(Authorized::now(d));
            }
        }

        let resolved = match req.token {
            None | Some("") => Err(Reason::MissingToken),
            Some(t) if !ids::is_token_shaped(t) => Err(Reason::InvalidToken),
            Some(t) => self.resolve_token(t).await?.ok_or(Reason::InvalidToken),
        };
        let token = match resolved {
            Ok(t) => t,
            Err(reason) => {
                let d = Decision::deny(reason);
                let attempts = self
                    .store
                    .record_failed_attempt(&site.site_id, client.as_deref(), audit(&d))
                    .await?;
                if let Some(c) = client {
                    if attempts >= site.failed_attempts_per_minute {
                        let mut blocked = self.blocked.lock().unwrap();
                        if blocked.len() >= MAX_CACHED {
                            blocked.clear();
                        }
                        blocked.insert((site.site_id.clone(), c), now + 60_000);
                    }
                }
                return Ok(Authorized::now(d));
            }
        };

        if token.site_id != site.site_id {
            let d = Decision {
                wrong_site: true,
                ..Decision::deny(Reason::InvalidToken)
            };
            self.store.append_audit(audit(&d)).await?;
            return Ok(Authorized::now(d));
        }

        let Some((plan_name, limits)) = self.plan(&site.site_id, &token.plan_id).await? else {
            // The token's plan is gone: treat the token as unusable.
            let d = Decision::deny(Reason::TokenRevoked);
            self.store.append_audit(audit(&d)).await?;
            return Ok(Authorized::now(d));
        };

        let mut decision = Decision {
            token_id: Some(token.token_id.clone()),
            plan: Some(plan_name.clone()),
            limits: Some(limits),
            ..Default::default()
        };
        let counting = self
            .store
            .count_request(CountRequest {
                site_id: site.site_id.clone(),
                token_id: token.token_id.clone(),
                plan_name,
                limits,
                site_requests_per_second: site.site_requests_per_second,
                now_ms: now,
                audit: audit(&decision),
            })
            .await?;
        match counting.counted {
            Counted::Revoked => {
                decision.reason = Some(Reason::TokenRevoked);
                decision.limits = None;
            }
            Counted::Evaluated(e) => {
                decision.allowed = e.verdict == Verdict::Allow;
                decision.reason = match e.verdict {
                    Verdict::Allow => None,
                    Verdict::SiteRateLimited => Some(Reason::SiteRateLimited),
                    Verdict::QuotaExceeded => Some(Reason::QuotaExceeded),
                    Verdict::RateLimited => Some(Reason::RateLimited),
                };
                decision.remaining_minute = e.remaining_minute;
                decision.remaining_quota = e.remaining_quota;
                decision.reset_minute = e.reset_minute_unix;
                decision.reset_quota = e.reset_quota_unix;
                decision.retry_after = e.retry_after_secs;
            }
        }
        Ok(Authorized {
            decision,
            durable: counting.durable,
        })
    }
}

/// A decision and the future that makes it durable.
pub struct Authorized {
    pub decision: Decision,
    pub durable: Durable,
}

impl Authorized {
    fn now(decision: Decision) -> Self {
        Self {
            decision,
            durable: already_durable(),
        }
    }
}

/// What the gateway knows of one request.
pub struct AuthorizeRequest<'a> {
    pub site: &'a SiteView,
    pub token: Option<&'a str>,
    pub method: &'a str,
    pub path_and_query: &'a str,
    pub client_ip: Option<IpAddr>,
    pub mode: Mode,
    pub started: Instant,
}

/// The path as recorded in audit: the query keeps its names, the values of
/// parameters the site marks secret become `***`, and a consumer token a client put
/// anywhere in it becomes `pf_live_***`.
pub fn audit_path(path_and_query: &str, secret_params: &[String]) -> String {
    mask_tokens(mask_secret_params(path_and_query, secret_params))
}

fn mask_tokens(path: String) -> String {
    const PREFIX: &str = ids::TOKEN_PREFIX;
    if !path.contains(PREFIX) {
        return path;
    }
    let mut out = String::with_capacity(path.len());
    let mut rest = path.as_str();
    while let Some(i) = rest.find(PREFIX) {
        out.push_str(&rest[..i + PREFIX.len()]);
        out.push_str("***");
        rest = &rest[i + PREFIX.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn mask_secret_params(path_and_query: &str, secret_params: &[String]) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_owned();
    };
    if secret_params.is_empty() {
        return path_and_query.to_owned();
    }
    let masked: Vec<String> = query
        .split('&')
        .map(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            // Compared as the origin's framework would read the name: percent- and
            // `+`-decoded; and, to mask rather than leak, ignoring ASCII case.
            let decoded: Cow<str> = if name.contains(['%', '+']) {
                url::form_urlencoded::parse(name.as_bytes())
                    .next()
                    .map_or("".into(), |(n, _)| n)
            } else {
                name.into()
            };
            let secret = secret_params
                .iter()
                .any(|s| s.eq_ignore_ascii_case(&decoded));
            if secret {
                format!("{name}=***")
            } else {
                pair.to_owned()
            }
        })
        .collect();
    format!("{path}?{}", masked.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_secret_query_values() {
        let secret = vec!["api_key".to_string()];
        assert_eq!(
            audit_path("/a?x=1&api_key=s3cr3t", &secret),
            "/a?x=1&api_key=***"
        );
        assert_eq!(
            audit_path("/a?api%5Fkey=s&API_KEY=s&api+key=s&api%5fkey2=x", &secret),
            "/a?api%5Fkey=***&API_KEY=***&api+key=s&api%5fkey2=x"
        );
        let spaced = vec!["api key".to_string()];
        assert_eq!(
            audit_path("/a?api+key=s&api%20key=s", &spaced),
            "/a?api+key=***&api%20key=***"
        );
        assert_eq!(audit_path("/a", &secret), "/a");
        assert_eq!(
            audit_path(
                "/t/pf_live_AbC-_9/x?q=pf_live_Zz&api_key=pf_live_1&pf_live_",
                &secret
            ),
            "/t/pf_live_***/x?q=pf_live_***&api_key=***&pf_live_***"
        );
        assert_eq!(audit_path("/pf_live_a%2F", &[]), "/pf_live_***%2F");
        assert_eq!(audit_path("/a?x=1", &[]), "/a?x=1");
    }
}
