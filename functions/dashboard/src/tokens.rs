//! Consumer tokens: issue, list (a site's, filtered; a consumer's own), read with
//! usage, update, revoke.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::Extension;
use http::StatusCode;
use payfence_core::domain::{now_ms, Page, Plan, Token};
use payfence_core::http::{json, ApiError, ApiJson, ApiPath};
use payfence_core::limits::{period_end_unix, period_of, TokenUsage};
use payfence_core::{ids, AppState};
use serde::Deserialize;
use serde_json::{json, Value};

use super::input::{check_name, name_or_none, not_null, params, parse_cursor, parse_limit};
use super::plans::body_plan;
use super::{managed_site, not_found, trail, ApiResult, P};

/// The site's tokens after the id `after` (from the first when `None`), handed to
/// `each` a page of at most 1,000 at a time in token-id order, so that memory stays
/// bounded however many tokens the site has; up to `budget` tokens in all. The
/// cursor to go on from, or `None` once every token was read.
pub(super) async fn each_token_page<F, Fut>(
    st: &AppState,
    site_id: &str,
    mut after: Option<String>,
    budget: usize,
    mut each: F,
) -> Result<Option<String>, ApiError>
where
    F: FnMut(Vec<Token>) -> Fut,
    Fut: std::future::Future<Output = Result<(), ApiError>>,
{
    let mut read = 0;
    loop {
        let page = (st.store())
            .list_tokens_page(site_id, 1000.min(budget - read), after.as_deref())
            .await?;
        read += page.items.len();
        each(page.items).await?;
        match page.next_cursor {
            Some(c) if read < budget => after = Some(c),
            next => return Ok(next),
        }
    }
}

fn token_view(t: &Token) -> Value {
    json!({
        "token_id": t.token_id, "site_id": t.site_id, "plan_id": t.plan_id, "label": t.label,
        "consumer": t.consumer, "created_at": t.created_at, "revoked_at": t.revoked_at,
        "status": if t.revoked_at.is_some() { "revoked" } else { "active" },
    })
}

async fn token_with_usage(st: &AppState, t: &Token) -> Result<Value, ApiError> {
    let plan = st.store().get_plan(&t.site_id, &t.plan_id).await?;
    let usage = st.store().token_usage(&t.token_id).await?;
    Ok(usage_view(t, &usage, plan.as_ref()))
}

/// Tokens with their usage (read for all of them at once), in order; `plans` holds
/// the plans they are on.
async fn tokens_with_usage(
    st: &AppState,
    tokens: &[Token],
    plans: &[Plan],
) -> Result<Vec<Value>, ApiError> {
    let ids: Vec<String> = tokens.iter().map(|t| t.token_id.clone()).collect();
    let usages = st.store().token_usages(&ids).await?;
    let plan_of =
        |t: &Token| (plans.iter()).find(|p| p.site_id == t.site_id && p.plan_id == t.plan_id);
    Ok(tokens
        .iter()
        .zip(&usages)
        .map(|(t, u)| usage_view(t, u, plan_of(t)))
        .collect())
}

/// The token's view with its `plan`'s name and `usage`: this month's and this
/// minute's use against `plan`.
fn usage_view(t: &Token, usage: &TokenUsage, plan: Option<&Plan>) -> Value {
    let now = now_ms();
    let quota = usage.quota.at(now);
    let mut v = token_view(t);
    v["plan"] = json!(plan.map(|p| &p.name));
    v["usage"] = json!({
        "period": period_of(now),
        "used": quota.used,
        "monthly_quota": plan.map(|p| p.monthly_quota),
        "remaining": plan.map(|p| p.monthly_quota.saturating_sub(quota.used)),
        "resets_at": period_end_unix(period_of(now)),
        "last_minute": usage.window.used(now),
        "requests_per_minute": plan.map(|p| p.requests_per_minute),
    });
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateToken {
    plan_id: String,
    label: Option<String>,
    /// `sub` of the consumer user who may see this token's usage.
    consumer: Option<String>,
}

pub(super) async fn create_token(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    ApiJson(b): ApiJson<CreateToken>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    body_plan(&st, &site_id, &b.plan_id).await?;
    let secret = ids::consumer_token();
    let token = Token {
        token_id: ids::token_id(),
        site_id: site_id.clone(),
        plan_id: b.plan_id,
        token_hash: ids::hash_secret(&secret),
        label: b.label.map(|l| check_name("label", &l, 100)).transpose()?,
        consumer: b
            .consumer
            .map(|c| check_name("consumer", &c, 128))
            .transpose()?,
        created_at: now_ms() / 1000,
        revoked_at: None,
    };
    st.store().create_token(&token).await?;
    trail(&st, &p, "token.create", &site, Some(&token.token_id)).await?;
    let mut v = token_view(&token);
    v["token"] = json!(secret);
    Ok(json(StatusCode::CREATED, &v))
}

/// A token list's cursor: the last token id of the page before.
pub(super) fn token_cursor(c: &str) -> Option<&str> {
    ids::is_id(c, "tok_").then_some(c)
}

/// What a site's token list may be narrowed to: `plan_id`, `status` (`active` or
/// `revoked`) and `consumer`, each matched exactly.
struct TokenFilter {
    plan_id: Option<String>,
    revoked: Option<bool>,
    consumer: Option<String>,
}

impl TokenFilter {
    fn parse(q: &HashMap<String, String>) -> Result<Self, ApiError> {
        let plan_id = q.get("plan_id").cloned();
        if plan_id.as_deref().is_some_and(|p| !ids::is_id(p, "plan_")) {
            return Err(ApiError::invalid("plan_id", "not a plan id (plan_…)"));
        }
        let revoked = match q.get("status").map(String::as_str) {
            None => None,
            Some("active") => Some(false),
            Some("revoked") => Some(true),
            Some(_) => return Err(ApiError::invalid("status", "must be active or revoked")),
        };
        let consumer = q.get("consumer").cloned();
        Ok(Self {
            plan_id,
            revoked,
            consumer,
        })
    }

    fn is_none(&self) -> bool {
        self.plan_id.is_none() && self.revoked.is_none() && self.consumer.is_none()
    }

    fn keeps(&self, t: &Token) -> bool {
        self.plan_id.as_ref().is_none_or(|p| *p == t.plan_id)
            && self.revoked.is_none_or(|r| r == t.revoked_at.is_some())
            && (self.consumer.as_ref()).is_none_or(|c| t.consumer.as_ref() == Some(c))
    }
}

/// The most tokens one filtered page of a site's tokens reads: past that the page
/// ends, short of its `limit` (even empty), with a cursor to go on from.
const FILTER_READ_BUDGET: usize = 10_000;

/// A page of up to `limit` tokens that `keep`, from the pages `page(after, size)`
/// gives (a site's or a consumer's tokens, in id order, up to `size` a page),
/// starting after `after`: the first of `first` tokens, then of 1,000. It ends
/// early, with a cursor, once `budget` tokens have been read.
async fn filtered_page<F, Fut>(
    mut page: F,
    keep: impl Fn(&Token) -> bool,
    (limit, first): (usize, usize),
    mut after: Option<String>,
    budget: usize,
) -> Result<Page<Token>, ApiError>
where
    F: FnMut(Option<String>, usize) -> Fut,
    Fut: std::future::Future<Output = Result<Page<Token>, ApiError>>,
{
    let (mut items, mut read) = (Vec::new(), 0);
    loop {
        let size = if read == 0 { first } else { 1000 };
        let Page {
            items: tokens,
            next_cursor,
        } = page(after, size).await?;
        read += tokens.len();
        let mut tokens = tokens.into_iter();
        for t in tokens.by_ref() {
            if keep(&t) {
                items.push(t);
                if items.len() == limit {
                    break;
                }
            }
        }
        if items.len() == limit {
            let more = tokens.next().is_some() || next_cursor.is_some();
            let next_cursor = (items.last()).filter(|_| more).map(|t| t.token_id.clone());
            return Ok(Page { items, next_cursor });
        }
        match next_cursor {
            Some(c) if read < budget => after = Some(c),
            next_cursor => return Ok(Page { items, next_cursor }),
        }
    }
}

/// A page of the site's tokens (`limit` 1-1000, default 100), in token-id order,
/// those that pass the [`TokenFilter`] given; `next_cursor` continues it.
pub(super) async fn list_tokens(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let q = params(q, &["limit", "cursor", "plan_id", "status", "consumer"])?;
    let limit = parse_limit(&q)?;
    let after = parse_cursor(&q, token_cursor)?;
    let filter = TokenFilter::parse(&q)?;
    let read = |after: Option<String>, size| {
        let (st, site_id) = (&st, &site_id);
        async move {
            let page = st.store().list_tokens_page(site_id, size, after.as_deref());
            Ok::<_, ApiError>(page.await?)
        }
    };
    let now_s = now_ms() / 1000;
    let keep = |t: &Token| t.kept_at(now_s) && filter.keeps(t);
    // Unfiltered, the first `limit` tokens usually are the page.
    let first = if filter.is_none() { limit } else { 1000 };
    let after = after.map(Into::into);
    let page = filtered_page(read, keep, (limit, first), after, FILTER_READ_BUDGET).await?;
    let plans = st.store().list_plans(&site_id).await?;
    let items = tokens_with_usage(&st, &page.items, &plans).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"items": items, "next_cursor": page.next_cursor}),
    ))
}

async fn find_token(st: &AppState, site_id: &str, token_id: &str) -> Result<Token, ApiError> {
    if !ids::is_id(token_id, "tok_") {
        return Err(not_found("token"));
    }
    (st.store().get_token(site_id, token_id).await?)
        .filter(|t| t.kept_at(now_ms() / 1000))
        .ok_or_else(|| not_found("token"))
}

pub(super) async fn get_token(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath((site_id, token_id)): ApiPath<(String, String)>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let t = find_token(&st, &site_id, &token_id).await?;
    Ok(json(StatusCode::OK, &token_with_usage(&st, &t).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateToken {
    #[serde(default, deserialize_with = "not_null")]
    plan_id: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    label: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    consumer: Option<String>,
}

/// Move an active token to another plan of its site (its usage this month and
/// minute carries over, now against the new plan's limits), or change its label
/// or consumer (`""` removes them). The secret stays the same.
pub(super) async fn update_token(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath((site_id, token_id)): ApiPath<(String, String)>,
    ApiJson(b): ApiJson<UpdateToken>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    let was = find_token(&st, &site_id, &token_id).await?;
    if was.revoked_at.is_some() {
        return Err(ApiError::Conflict(
            "the token is revoked, which is final: issue a new one".into(),
        ));
    }
    let mut now = was.clone();
    if let Some(v) = b.label {
        now.label = name_or_none("label", &v, 100)?;
    }
    if let Some(v) = b.consumer {
        now.consumer = name_or_none("consumer", &v, 128)?;
    }
    if let Some(plan_id) = b.plan_id {
        body_plan(&st, &site_id, &plan_id).await?;
        now.plan_id = plan_id;
    }
    st.store().update_token(&was, &now).await?;
    st.gateway.invalidate_token(&now.token_hash);
    trail(&st, &p, "token.update", &site, Some(&token_id)).await?;
    Ok(json(StatusCode::OK, &token_with_usage(&st, &now).await?))
}

pub(super) async fn revoke_token(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath((site_id, token_id)): ApiPath<(String, String)>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    find_token(&st, &site_id, &token_id).await?;
    st.store()
        .revoke_token(&site_id, &token_id, now_ms() / 1000)
        .await?
        .ok_or_else(|| not_found("token"))?;
    trail(&st, &p, "token.revoke", &site, Some(&token_id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A page of a user's own tokens (those assigned to it; any role may ask), with
/// usage, in token-id order (`limit` 1-1000, default 100); `next_cursor` continues it.
pub(super) async fn my_tokens(
    State(st): State<AppState>,
    Extension(p): P,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    use futures_util::{StreamExt, TryStreamExt};
    let q = params(q, &["limit", "cursor"])?;
    let limit = parse_limit(&q)?;
    let after = parse_cursor(&q, token_cursor)?;
    let read = |after: Option<String>, size| {
        let (st, sub) = (&st, &p.sub);
        async move {
            let page = (st.store()).list_consumer_tokens_page(sub, size, after.as_deref());
            Ok::<_, ApiError>(page.await?)
        }
    };
    let now_s = now_ms() / 1000;
    let keep = |t: &Token| t.kept_at(now_s);
    let after = after.map(Into::into);
    let page = filtered_page(read, keep, (limit, limit), after, FILTER_READ_BUDGET).await?;
    // The tokens may be of several sites: read each plan they are on, once.
    let on: std::collections::BTreeSet<(String, String)> = (page.items.iter())
        .map(|t| (t.site_id.clone(), t.plan_id.clone()))
        .collect();
    let plans: Vec<Plan> = futures_util::stream::iter(on)
        .map(|(site_id, plan_id)| {
            let store = st.store().clone();
            async move { store.get_plan(&site_id, &plan_id).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?
        .into_iter()
        .flatten()
        .collect();
    let items = tokens_with_usage(&st, &page.items, &plans).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"items": items, "next_cursor": page.next_cursor}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(n: usize) -> Token {
        Token {
            token_id: format!("tok_{n:016x}"),
            site_id: "site_0000000000000001".into(),
            plan_id: format!("plan_{:016x}", n % 3),
            token_hash: String::new(),
            label: None,
            consumer: None,
            created_at: 1,
            revoked_at: None,
        }
    }

    /// Following a filtered list's cursors, `limit` at a time, through store pages of
    /// 4 tokens and a read budget of 8, yields every kept token once, in order, and
    /// never a page over `limit`; a page reads at most 2 store pages, and one cut
    /// short by the budget (even empty) carries a cursor.
    #[tokio::test]
    async fn a_filtered_list_reads_on_within_its_budget_and_misses_nothing() {
        let all: Vec<Token> = (0..25).map(token).collect();
        let reads = std::cell::Cell::new(0);
        let store_page = |after: Option<String>, _size| {
            reads.set(reads.get() + 1);
            let rest: Vec<Token> = (all.iter())
                .filter(|t| after.as_ref().is_none_or(|a| t.token_id > *a))
                .cloned()
                .collect();
            let more = rest.len() > 4;
            let items: Vec<Token> = rest.into_iter().take(4).collect();
            let next_cursor = (items.last()).filter(|_| more).map(|t| t.token_id.clone());
            std::future::ready(Ok(Page { items, next_cursor }))
        };
        for (plan, limit) in [(0, 1), (0, 2), (0, 9), (1, 3), (2, 100), (7, 2)] {
            let plan = format!("plan_{plan:016x}");
            let keep = |t: &Token| t.plan_id == plan;
            let wanted: Vec<&str> = (all.iter().filter(|t| keep(t)))
                .map(|t| t.token_id.as_str())
                .collect();
            let (mut seen, mut after, mut pages) = (Vec::new(), None, 0);
            loop {
                reads.set(0);
                let page = filtered_page(store_page, keep, (limit, 4), after, 8)
                    .await
                    .unwrap();
                assert!(page.items.len() <= limit && reads.get() <= 2);
                seen.extend(page.items.iter().map(|t| t.token_id.clone()));
                pages += 1;
                match page.next_cursor {
                    Some(c) => after = Some(c),
                    None => break,
                }
            }
            assert_eq!(seen, wanted, "{plan}, limit {limit}");
            if wanted.is_empty() {
                assert_eq!(
                    pages, 4,
                    "25 tokens, 8 a page, the last one ending the list"
                );
            }
        }
    }
}
