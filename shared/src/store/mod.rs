//! Storage behind small, domain-shaped async traits. Two implementations: the
//! embedded store (local runs and tests) and DynamoDB (production).
//!
//! The hot path is [`UsageStore::count_request`]: one atomic check-and-count that
//! also checks revocation and writes the decision's audit record.

use async_trait::async_trait;

use crate::domain::{
    AdminEvent, ApiKey, AuditFilter, AuditRecord, DecisionKind, Page, Plan, QuotaEvent, Reason,
    Site, Token,
};
use crate::limits::{Evaluation, PlanLimits, QuotaEventKind, TokenUsage, Verdict};

pub mod dynamo;
pub mod embedded;
mod wal;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("already exists: {0}")]
    Conflict(String),
    #[error("changed meanwhile: {0}")]
    Changed(String),
    /// A record the write refers to (a token's plan) does not exist (any more).
    #[error("no such {0}")]
    Missing(String),
    #[error("not a cursor of this query")]
    InvalidCursor,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One request to count against a resolved token.
#[derive(Clone, Debug)]
pub struct CountRequest {
    pub site_id: String,
    pub token_id: String,
    pub plan_name: String,
    pub limits: PlanLimits,
    pub site_requests_per_second: u64,
    pub now_ms: u64,
    /// The decision's audit record; the store fills `decision`, `reason` and
    /// `remaining` and writes it with the count.
    pub audit: AuditRecord,
}

/// Resolves once a decision is durable. The store makes it durable whether or not
/// this is polled (a caller may await it last, after other work).
pub type Durable = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

/// A durable-now [`Durable`].
pub fn already_durable() -> Durable {
    Box::pin(std::future::ready(Ok(())))
}

/// The outcome of [`UsageStore::count_request`]: the decision as soon as it is
/// applied in the store's serialised order, and a future that resolves when it is
/// durable. Nobody may be told of the decision (no response sent) before `durable`
/// resolves; work that only depends on it (opening the origin request) may start.
pub struct Counting {
    pub counted: Counted,
    pub durable: Durable,
}

impl CountRequest {
    /// Record the store's outcome (decision, reason, remaining quota) on the audit record.
    pub fn record_outcome(&mut self, counted: &Counted) {
        let (decision, reason) = match counted {
            Counted::Revoked => (DecisionKind::Deny, Some(Reason::TokenRevoked)),
            Counted::Evaluated(eval) => {
                self.audit.remaining = Some(eval.remaining_quota);
                match eval.verdict {
                    Verdict::Allow => (DecisionKind::Allow, None),
                    Verdict::SiteRateLimited => (DecisionKind::Deny, Some(Reason::SiteRateLimited)),
                    Verdict::QuotaExceeded => (DecisionKind::Deny, Some(Reason::QuotaExceeded)),
                    Verdict::RateLimited => (DecisionKind::Deny, Some(Reason::RateLimited)),
                }
            }
        };
        self.audit.decision = decision;
        self.audit.reason = reason;
    }

    /// The event recorded when this allowed request crossed a quota threshold.
    pub fn quota_event(&self, eval: &Evaluation, kind: QuotaEventKind) -> QuotaEvent {
        QuotaEvent {
            event_id: crate::ids::event_id(),
            site_id: self.site_id.clone(),
            token_id: self.token_id.clone(),
            plan: self.plan_name.clone(),
            kind,
            used: eval.usage.quota.used,
            quota: self.limits.monthly_quota,
            period: eval.usage.quota.period,
            created_at: self.now_ms / 1000,
            status: "pending".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Counted {
    /// The token is revoked (or gone): nothing was counted.
    Revoked,
    /// The limits were evaluated; counters changed only if allowed.
    Evaluated(Evaluation),
}

#[async_trait]
pub trait SiteStore: Send + Sync {
    async fn create_site(&self, site: &Site) -> Result<()>;
    /// Store `site`, read at `site.revision` and changed, as revision
    /// `site.revision + 1`, if the stored site is still at `site.revision`;
    /// otherwise `Changed` (another update came first: read it again). So concurrent
    /// updates (a rotation and a settings change) cannot undo each other.
    async fn update_site(&self, site: &Site) -> Result<()>;
    /// Delete the site record and its quota events, the events first (so a failure
    /// leaves the site for a retry); `false` if there was no site record. (Its
    /// tokens, keys and plans are the caller's to revoke or delete first.)
    async fn delete_site(&self, site_id: &str) -> Result<bool>;
    async fn get_site(&self, site_id: &str) -> Result<Option<Site>>;
    /// A page of the owner's sites (every site for `None`), in site-id order, from
    /// after the site id `after`: at most `limit`, with the cursor to go on from.
    async fn list_sites_page(
        &self,
        owner: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<Site>>;
}

/// What [`PlanStore::delete_plan`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanDeletion {
    Deleted,
    NotFound,
    /// Not deleted: this many active tokens use the plan.
    InUse(u64),
}

#[async_trait]
pub trait PlanStore: Send + Sync {
    async fn create_plan(&self, plan: &Plan) -> Result<()>;
    /// Store `plan` over the stored one if that is still at `plan.revision`, as
    /// `SiteStore::update_site` does.
    async fn update_plan(&self, plan: &Plan) -> Result<()>;
    /// Delete the plan if no active token uses it, atomically with the token writes
    /// (a token issued or moved onto it meanwhile either comes first and keeps it,
    /// or is refused with `Missing("plan")`).
    async fn delete_plan(&self, site_id: &str, plan_id: &str) -> Result<PlanDeletion>;
    async fn get_plan(&self, site_id: &str, plan_id: &str) -> Result<Option<Plan>>;
    async fn list_plans(&self, site_id: &str) -> Result<Vec<Plan>>;
}

#[async_trait]
pub trait TokenStore: Send + Sync {
    /// Store a new token; `Missing("plan")` if its plan does not exist.
    async fn create_token(&self, token: &Token) -> Result<()>;
    async fn get_token(&self, site_id: &str, token_id: &str) -> Result<Option<Token>>;
    async fn token_by_hash(&self, token_hash: &str) -> Result<Option<Token>>;
    /// Up to `limit` of the site's tokens in token-id order, after the token `after`
    /// (the previous page's `next_cursor`, which is the last token id of that page
    /// while more may follow).
    async fn list_tokens_page(
        &self,
        site_id: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<Token>>;
    /// Up to `limit` of the tokens assigned to `consumer`, on any site, in token-id
    /// order, after the token `after`, paged as `list_tokens_page`.
    async fn list_consumer_tokens_page(
        &self,
        consumer: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<Token>>;
    /// Store `now` (the same token with another plan, label or consumer) if the
    /// stored token is still `was`; otherwise `Changed` (it was revoked, changed or
    /// deleted meanwhile: read it again); `Missing("plan")` if it moves to a plan
    /// that does not exist.
    async fn update_token(&self, was: &Token, now: &Token) -> Result<()>;
    /// Revoke; returns the token as it is now, or `None` if there is no such token.
    async fn revoke_token(&self, site_id: &str, token_id: &str, now: u64) -> Result<Option<Token>>;
}

#[async_trait]
pub trait KeyStore: Send + Sync {
    async fn create_key(&self, key: &ApiKey) -> Result<()>;
    async fn key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKey>>;
    async fn list_keys(&self, site_id: &str) -> Result<Vec<ApiKey>>;
    async fn revoke_key(&self, site_id: &str, key_id: &str, now: u64) -> Result<Option<ApiKey>>;
    /// Store `now` (the same key with another label) if the stored key is still
    /// `was`; otherwise `Changed` (revoked, changed or deleted meanwhile), as
    /// `TokenStore::update_token` does.
    async fn update_key(&self, was: &ApiKey, now: &ApiKey) -> Result<()>;
}

#[async_trait]
pub trait UsageStore: Send + Sync {
    /// Atomically: check the token is not revoked, evaluate site rate, quota and
    /// token rate, count the request if allowed, record crossed quota events once,
    /// and write the audit record.
    async fn count_request(&self, req: CountRequest) -> Result<Counting>;
    /// A request whose token did not resolve: count a failed attempt for the client
    /// (if known) and write the audit record. Returns the client's failed attempts
    /// in the last minute, this one included (0 when the client is unknown).
    async fn record_failed_attempt(
        &self,
        site_id: &str,
        client: Option<&str>,
        audit: AuditRecord,
    ) -> Result<u64>;
    async fn token_usage(&self, token_id: &str) -> Result<TokenUsage>;
    /// The usage of each of `token_ids`, in their order (for listings): one read
    /// per token unless the store can do better.
    async fn token_usages(&self, token_ids: &[String]) -> Result<Vec<TokenUsage>> {
        let mut out = Vec::with_capacity(token_ids.len());
        for id in token_ids {
            out.push(self.token_usage(id).await?);
        }
        Ok(out)
    }
}

#[async_trait]
pub trait AuditStore: Send + Sync {
    async fn append_audit(&self, record: AuditRecord) -> Result<()>;
    /// Newest first. `cursor` is an opaque value from a previous page.
    async fn query_audit(
        &self,
        site_id: &str,
        filter: &AuditFilter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<AuditRecord>>;
    /// Delete records whose retention ended before `now_s`; returns how many. Also
    /// drops other state that has expired by then (the failed-attempt counters of
    /// clients quiet for a minute), where the store has no TTL of its own.
    async fn purge_expired(&self, now_s: u64) -> Result<u64>;
}

#[async_trait]
pub trait EventStore: Send + Sync {
    /// A page of a site's quota events, ordered by token id, then month, then kind;
    /// after the event `after` (`(token_id, yyyymm, kind)`) when given. `next_cursor`
    /// is the last item's key as [`event_cursor`] writes it, when more follow.
    async fn list_events(
        &self,
        site_id: &str,
        limit: usize,
        after: Option<(&str, u32, &str)>,
    ) -> Result<Page<QuotaEvent>>;
}

/// The quota events' page cursor: `{token_id}.{yyyymm}.{kind}` of the last event shown.
pub fn event_cursor(e: &QuotaEvent) -> String {
    format!("{}.{}.{}", e.token_id, e.period, e.kind.as_str())
}

/// The `(token_id, yyyymm, kind)` of a cursor [`event_cursor`] wrote.
pub fn parse_event_cursor(c: &str) -> Option<(&str, u32, &str)> {
    let mut parts = c.split('.');
    let (token_id, period, kind) = (parts.next()?, parts.next()?, parts.next()?);
    let valid = parts.next().is_none()
        && crate::ids::is_id(token_id, "tok_")
        && period.len() == 6
        && period.bytes().all(|b| b.is_ascii_digit())
        && matches!(kind, "warning" | "exhausted");
    valid.then_some((token_id, period.parse().ok()?, kind))
}

/// The page of the first `limit` of `items`, read up to `limit + 1` to know whether
/// more follow; when they do, `next_cursor` is `cursor` of the last item shown.
fn page_of<T>(mut items: Vec<T>, limit: usize, cursor: impl Fn(&T) -> String) -> Page<T> {
    let more = items.len() > limit;
    items.truncate(limit);
    let next_cursor = items.last().filter(|_| more).map(cursor);
    Page { items, next_cursor }
}

/// The admin trail's page cursor: `{ts_ms:013}.{id}` of the last event shown.
pub fn admin_cursor(e: &AdminEvent) -> String {
    format!("{:013}.{}", e.ts_ms, e.id)
}

/// The `(ts_ms, id)` of a cursor [`admin_cursor`] wrote.
pub fn parse_admin_cursor(c: &str) -> Option<(u64, &str)> {
    let (ts, id) = c.split_once('.')?;
    if ts.len() != 13 || !ts.bytes().all(|b| b.is_ascii_digit()) || !crate::ids::is_id(id, "evt_") {
        return None;
    }
    Some((ts.parse().ok()?, id))
}

#[async_trait]
pub trait AdminTrail: Send + Sync {
    async fn record_admin(&self, event: &AdminEvent) -> Result<()>;
    /// Newest first; only the changes to sites of `owner` when given; only those
    /// older than `before` (an event's `(ts_ms, id)`) when given. `next_cursor` is the
    /// last item's `(ts_ms, id)` as [`admin_cursor`] writes it, when more follow.
    async fn list_admin(
        &self,
        limit: usize,
        owner: Option<&str>,
        before: Option<(u64, &str)>,
    ) -> Result<Page<AdminEvent>>;
}

#[async_trait]
pub trait Store:
    SiteStore + PlanStore + TokenStore + KeyStore + UsageStore + AuditStore + EventStore + AdminTrail
{
    /// A cheap real round trip to the store, for health checks.
    async fn ping(&self) -> Result<()>;

    /// Wait (boundedly) until the writes this process made off the request path
    /// (audit records) are stored. A Lambda function calls it after each answer,
    /// before asking for the next event: Lambda freezes the environment between
    /// events and may end it without warning.
    async fn settle(&self) {}
}

/// Every page of a logs query, from the first until `next_cursor` is `None`: the
/// `ts_ms` of each record in order, and how many pages it took. For tests.
#[cfg(test)]
pub(crate) async fn all_pages<F, Fut>(limit: usize, mut page: F) -> (Vec<u64>, usize)
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<Page<AuditRecord>>>,
{
    let (mut seen, mut cursor, mut pages) = (Vec::new(), None, 0);
    loop {
        let page = page(cursor).await.unwrap();
        assert!(page.items.len() <= limit);
        seen.extend(page.items.iter().map(|r| r.ts_ms));
        pages += 1;
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return (seen, pages),
        }
    }
}
