//! The dashboard API (`/api/*` but health): sites, plans, tokens, API keys,
//! signing-secret rotation, webhook settings, logs, quota events, the admin audit
//! trail. Every route needs a Cognito-style JWT; site owners see only their sites.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::StatusCode;
use payfence_core::auth::{AuthError, Principal, Role};
use payfence_core::domain::{
    audit_kept_since_ms, now_ms, rfc3339_ms, AdminEvent, ApiKey, AuditFilter, AuditRecord,
    DecisionKind, Mode, Page, Plan, Reason, Site, Token,
};
use payfence_core::http::{
    bearer, json, per_second_limit, request_context, ApiError, ApiJson, ApiPath, LogFields,
    MAX_JSON_BODY_BYTES,
};
use payfence_core::limits::{self, period_end_unix, period_of, TokenUsage};
use payfence_core::origin::validate_origin_url;
use payfence_core::store::{parse_admin_cursor, parse_event_cursor};
use payfence_core::{ids, AppState};
use serde::Deserialize;
use serde_json::{json, Value};

pub fn router(state: AppState) -> Router {
    let site = |p: &str| format!("/api/sites/{{site_id}}{p}");
    let api = Router::new()
        .route("/api/sites", post(create_site).get(list_sites))
        .route(
            &site(""),
            get(get_site).patch(update_site).delete(delete_site),
        )
        .route(&site("/signing-secret/rotate"), post(rotate_secret))
        .route(&site("/webhook"), get(get_webhook).put(put_webhook))
        .route(&site("/plans"), post(create_plan).get(list_plans))
        .route(
            &site("/plans/{plan_id}"),
            get(get_plan).patch(update_plan).delete(delete_plan),
        )
        .route(&site("/tokens"), post(create_token).get(list_tokens))
        .route(
            &site("/tokens/{token_id}"),
            get(get_token).patch(update_token).delete(revoke_token),
        )
        .route(&site("/api-keys"), post(create_key).get(list_keys))
        .route(
            &site("/api-keys/{key_id}"),
            get(get_key).patch(update_key).delete(revoke_key),
        )
        .route(&site("/logs"), get(query_logs))
        .route(&site("/logs/export"), get(export_logs))
        .route(&site("/events"), get(list_events))
        .route(&site("/usage"), get(site_usage))
        .route("/api/me/tokens", get(my_tokens))
        .route("/api/audit-trail", get(audit_trail))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES))
        .layer(from_fn_with_state(state.clone(), authenticate));
    let api = match state.config.dashboard_origins.as_slice() {
        [] => api,
        origins => api.layer(cors(origins)),
    };
    api.with_state(state).layer(from_fn(request_context))
}

/// CORS for a dashboard SPA served from another origin: preflights from the
/// configured origins are answered before authentication (they carry no JWT), and
/// answers to those origins say they may read them. Other origins get no CORS
/// headers, so browsers keep their pages out.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use http::header::{AUTHORIZATION, CONTENT_DISPOSITION, RETRY_AFTER};
    use http::Method;
    let origins = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect::<Vec<_>>();
    tower_http::cors::CorsLayer::new()
        .allow_origin(tower_http::cors::AllowOrigin::list(origins))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([AUTHORIZATION, CONTENT_TYPE])
        .expose_headers([
            RETRY_AFTER,
            CONTENT_DISPOSITION,
            http::HeaderName::from_static("x-payfence-request-id"),
            http::HeaderName::from_static("x-ratelimit-limit"),
            http::HeaderName::from_static("x-ratelimit-remaining"),
            http::HeaderName::from_static("x-ratelimit-reset"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

/// Verify the JWT, apply the per-user rate limit, and put the [`Principal`] in
/// the request for handlers. The request's log line names the site it is about.
async fn authenticate(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let site_id = req
        .uri()
        .path()
        .strip_prefix("/api/sites/")
        .and_then(|rest| rest.split('/').next())
        .filter(|id| ids::is_id(id, "site_"))
        .map(str::to_owned);
    let mut res = authenticated(st, req, next).await;
    if site_id.is_some() {
        res.extensions_mut()
            .get_or_insert_default::<LogFields>()
            .site_id = site_id;
    }
    res
}

async fn authenticated(st: AppState, mut req: Request, next: Next) -> Response {
    let Some(verifier) = st.jwt.clone() else {
        return ApiError::Internal("dashboard started without a JWT verifier".into())
            .into_response();
    };
    let principal = match bearer(req.headers()) {
        None => Err(AuthError::Missing),
        Some(t) => verifier.verify(&t).await,
    };
    let principal = match principal {
        Ok(p) => p,
        Err(AuthError::NoRole) => {
            return ApiError::Forbidden(AuthError::NoRole.to_string()).into_response()
        }
        Err(AuthError::KeysUnavailable(e)) => return ApiError::Unavailable(e).into_response(),
        Err(e) => return ApiError::Unauthorized(e.to_string()).into_response(),
    };
    let key = format!("dashboard:{}", principal.sub);
    req.extensions_mut().insert(principal);
    let limit = st.config.dashboard_requests_per_second;
    per_second_limit(&st.limiter, &key, limit, next.run(req)).await
}

type P = Extension<Principal>;
type ApiResult = Result<Response, ApiError>;

fn not_found(what: &str) -> ApiError {
    ApiError::NotFound(format!("no such {what}"))
}

/// The site if the principal may manage it: owners their own, admins any;
/// another owner's site is 404 (its existence is not revealed).
async fn managed_site(st: &AppState, p: &Principal, site_id: &str) -> Result<Site, ApiError> {
    if p.role == Role::Consumer {
        return Err(ApiError::Forbidden("consumers cannot manage sites".into()));
    }
    if !ids::is_id(site_id, "site_") {
        return Err(not_found("site"));
    }
    match st.store().get_site(site_id).await? {
        Some(s) if p.role == Role::Admin || s.owner == p.sub => Ok(s),
        _ => Err(not_found("site")),
    }
}

/// Record a change to `site` (or to something of it, `target`) in the admin trail.
async fn trail(
    st: &AppState,
    p: &Principal,
    action: &str,
    site: &Site,
    target: Option<&str>,
) -> Result<(), ApiError> {
    let site_id = site.site_id.as_str();
    let now = now_ms();
    st.store()
        .record_admin(&AdminEvent {
            id: ids::event_id(),
            ts_ms: now,
            timestamp: rfc3339_ms(now),
            actor: p.sub.clone(),
            role: p.role.as_str().into(),
            action: action.into(),
            site_id: Some(site_id.into()),
            target: target.map(Into::into),
            owner: Some(site.owner.clone()),
        })
        .await?;
    // `target_id`: a field named `target` would repeat the JSON line's own `target` key.
    tracing::info!(target: "payfence::admin", actor = %p.sub, action, site_id, target_id = target, "admin change");
    Ok(())
}

fn site_view(s: &Site) -> Value {
    json!({
        "site_id": s.site_id,
        "name": s.name,
        "owner": s.owner,
        "origin_url": s.origin_url,
        "proxy_path": format!("/p/{}", s.site_id),
        "site_requests_per_second": s.site_requests_per_second,
        "replay_window_seconds": s.replay_window_seconds,
        "failed_attempts_per_minute": s.failed_attempts_per_minute,
        "secret_query_params": s.secret_query_params,
        "webhook_url": s.webhook_url,
        "previous_secret_valid_until": s.previous_valid_until,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    })
}

/// The most sites one user may own, plans one site may have, and unrevoked API keys
/// one site may hold: far above real use, and a bound on the lists that come whole
/// (`GET /api/sites`, `…/plans`, `…/api-keys`). Counted before a creation, so
/// creations made at the same moment can together pass a limit.
const MAX_SITES_PER_OWNER: usize = 100;
const MAX_PLANS_PER_SITE: usize = 100;
const MAX_ACTIVE_KEYS_PER_SITE: usize = 20;

/// `409` once `count` has reached `max`: "{holder} {count} {what}, the most
/// allowed: {fix} one first".
fn room_for(holder: &str, count: usize, what: &str, max: usize, fix: &str) -> Result<(), ApiError> {
    if count < max {
        return Ok(());
    }
    Err(ApiError::Conflict(format!(
        "{holder} {count} {what}, the most allowed: {fix} one first"
    )))
}

fn check_range(field: &str, v: u64, min: u64, max: u64) -> Result<u64, ApiError> {
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            field,
            format!("must be between {min} and {max}"),
        ))
    }
}

fn check_name(field: &str, v: &str, max: usize) -> Result<String, ApiError> {
    let v = v.trim();
    if v.is_empty() || v.chars().count() > max || v.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {max} characters, without control characters"),
        ));
    }
    Ok(v.to_owned())
}

fn check_origin(st: &AppState, v: &str) -> Result<String, ApiError> {
    validate_origin_url(v, st.config.allow_http_origins)
        .map_err(|e| ApiError::invalid("origin_url", e))
}

fn check_params(v: Vec<String>) -> Result<Vec<String>, ApiError> {
    if v.len() > 32
        || v.iter()
            .any(|p| p.is_empty() || p.len() > 64 || p.contains(['&', '=', '?']))
    {
        return Err(ApiError::invalid(
            "secret_query_params",
            "up to 32 parameter names, each 1-64 characters without & = ?",
        ));
    }
    Ok(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSite {
    name: String,
    origin_url: String,
    site_requests_per_second: Option<u64>,
    replay_window_seconds: Option<u64>,
    failed_attempts_per_minute: Option<u64>,
    secret_query_params: Option<Vec<String>>,
}

async fn create_site(
    State(st): State<AppState>,
    Extension(p): P,
    ApiJson(b): ApiJson<CreateSite>,
) -> ApiResult {
    if p.role == Role::Consumer {
        return Err(ApiError::Forbidden("consumers cannot create sites".into()));
    }
    let (mut site, secret) = Site::new(&p.sub, "", "", st.gateway.sealing(), now_ms() / 1000);
    // Required here and optional in an update, the fields are checked the same way.
    UpdateSite {
        name: Some(b.name),
        origin_url: Some(b.origin_url),
        site_requests_per_second: b.site_requests_per_second,
        replay_window_seconds: b.replay_window_seconds,
        failed_attempts_per_minute: b.failed_attempts_per_minute,
        secret_query_params: b.secret_query_params,
    }
    .apply(&st, &mut site)?;
    let owned = (st.store())
        .list_sites_page(Some(&p.sub), MAX_SITES_PER_OWNER, None)
        .await?
        .items
        .len();
    room_for("you own", owned, "sites", MAX_SITES_PER_OWNER, "delete")?;
    st.store().create_site(&site).await?;
    trail(&st, &p, "site.create", &site, None).await?;
    let mut v = site_view(&site);
    v["signing_secret"] = json!(secret);
    Ok(json(StatusCode::CREATED, &v))
}

/// A page of the user's sites (an admin's: every site), in site-id order (`limit`
/// 1-1000, default 100, so an owner's, at most 100, come in one); `next_cursor`
/// continues it.
async fn list_sites(
    State(st): State<AppState>,
    Extension(p): P,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let owner = match p.role {
        Role::Admin => None,
        Role::SiteOwner => Some(p.sub.as_str()),
        Role::Consumer => return Err(ApiError::Forbidden("consumers cannot list sites".into())),
    };
    let q = params(q, &["limit", "cursor"])?;
    let limit = parse_limit(&q)?;
    let after = parse_cursor(&q, |c| ids::is_id(c, "site_").then_some(c))?;
    let page = st.store().list_sites_page(owner, limit, after).await?;
    Ok(json(
        StatusCode::OK,
        &json!({
            "items": page.items.iter().map(site_view).collect::<Vec<_>>(),
            "next_cursor": page.next_cursor,
        }),
    ))
}

async fn get_site(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    Ok(json(StatusCode::OK, &site_view(&site)))
}

/// PATCH bodies: a field left out keeps its value; none of them takes `null`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateSite {
    #[serde(default, deserialize_with = "not_null")]
    name: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    origin_url: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    site_requests_per_second: Option<u64>,
    #[serde(default, deserialize_with = "not_null")]
    replay_window_seconds: Option<u64>,
    #[serde(default, deserialize_with = "not_null")]
    failed_attempts_per_minute: Option<u64>,
    #[serde(default, deserialize_with = "not_null")]
    secret_query_params: Option<Vec<String>>,
}

/// A PATCH field that is either left out (`None`) or given a value: `null` would
/// otherwise read as "left out" and change nothing without a word.
fn not_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    match Option::<T>::deserialize(d)? {
        Some(v) => Ok(Some(v)),
        None => Err(serde::de::Error::custom(
            "must not be null: leave the field out to keep its value",
        )),
    }
}

impl UpdateSite {
    /// Check the fields given and set them on `site`.
    fn apply(self, st: &AppState, site: &mut Site) -> Result<(), ApiError> {
        if let Some(v) = self.name {
            site.name = check_name("name", &v, 100)?;
        }
        if let Some(v) = self.origin_url {
            site.origin_url = check_origin(st, &v)?;
        }
        if let Some(v) = self.site_requests_per_second {
            site.site_requests_per_second = check_range("site_requests_per_second", v, 1, 100_000)?;
        }
        if let Some(v) = self.replay_window_seconds {
            site.replay_window_seconds = check_range("replay_window_seconds", v, 30, 3600)?;
        }
        if let Some(v) = self.failed_attempts_per_minute {
            site.failed_attempts_per_minute =
                check_range("failed_attempts_per_minute", v, 1, 10_000)?;
        }
        if let Some(v) = self.secret_query_params {
            site.secret_query_params = check_params(v)?;
        }
        Ok(())
    }
}

async fn update_site(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    ApiJson(b): ApiJson<UpdateSite>,
) -> ApiResult {
    let mut site = managed_site(&st, &p, &site_id).await?;
    b.apply(&st, &mut site)?;
    site.updated_at = now_ms() / 1000;
    st.store().update_site(&site).await?;
    st.gateway.invalidate_site(&site_id);
    trail(&st, &p, "site.update", &site, None).await?;
    Ok(json(StatusCode::OK, &site_view(&site)))
}

/// Delete a site: revoke its tokens and API keys, delete its plans, then the site
/// itself; in that order, so a failure part-way leaves the site in place, with what
/// was revoked so far, for a retry. Its audit records stay until they expire.
async fn delete_site(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
) -> ApiResult {
    use futures_util::{StreamExt, TryStreamExt};
    let site = managed_site(&st, &p, &site_id).await?;
    let (store, now) = (st.store(), now_ms() / 1000);
    each_token_page(&st, &site_id, None, usize::MAX, |tokens| async {
        let active = tokens.into_iter().filter(|t| t.revoked_at.is_none());
        futures_util::stream::iter(active)
            .map(|t| {
                let (store, site_id) = (store.clone(), site_id.clone());
                async move { store.revoke_token(&site_id, &t.token_id, now).await }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    })
    .await?;
    for key in store.list_keys(&site_id).await? {
        if key.revoked_at.is_none() {
            store.revoke_key(&site_id, &key.key_id, now).await?;
            st.gateway.invalidate_key(&key.key_hash);
        }
    }
    for plan in store.list_plans(&site_id).await? {
        store.delete_plan(&site_id, &plan.plan_id).await?;
    }
    if !store.delete_site(&site_id).await? {
        return Err(not_found("site"));
    }
    st.gateway.invalidate_site(&site_id);
    trail(&st, &p, "site.delete", &site, None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The site's tokens after the id `after` (from the first when `None`), handed to
/// `each` a page of at most 1,000 at a time in token-id order, so that memory stays
/// bounded however many tokens the site has; up to `budget` tokens in all. The
/// cursor to go on from, or `None` once every token was read.
async fn each_token_page<F, Fut>(
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

/// An optional JSON object body: an empty (or all-blank) one is `T::default()`.
fn optional_json<T: Default + serde::de::DeserializeOwned>(
    body: Result<bytes::Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    payfence_core::http::parse_json(&body)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Rotate {
    overlap_seconds: Option<u64>,
}

async fn rotate_secret(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    body: Result<bytes::Bytes, BytesRejection>,
) -> ApiResult {
    let mut site = managed_site(&st, &p, &site_id).await?;
    // Empty means the default overlap.
    let b: Rotate = optional_json(body)?;
    let overlap = check_range(
        "overlap_seconds",
        b.overlap_seconds.unwrap_or(st.config.rotation_overlap_secs),
        0,
        7 * 86_400,
    )?;
    let now = now_ms() / 1000;
    let secret = ids::signing_secret();
    site.previous_secret_sealed = Some(std::mem::replace(
        &mut site.signing_secret_sealed,
        st.gateway.sealing().seal(&secret, &site_id),
    ));
    site.previous_valid_until = Some(now + overlap);
    site.updated_at = now;
    st.store().update_site(&site).await?;
    st.gateway.invalidate_site(&site_id);
    trail(&st, &p, "site.rotate_signing_secret", &site, None).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"signing_secret": secret, "previous_valid_until": site.previous_valid_until}),
    ))
}

async fn get_webhook(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"url": site.webhook_url, "has_secret": site.webhook_secret_sealed.is_some()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutWebhook {
    /// Required, `null` to remove the webhook: a body that leaves it out (say
    /// `{"rotate_secret": true}`) must not remove it by omission.
    #[serde(deserialize_with = "required")]
    url: Option<String>,
    #[serde(default)]
    rotate_secret: bool,
}

/// A nullable field that must be present (serde takes a missing `Option` as `None`).
fn required<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::deserialize(d)
}

/// Set (or clear, with `url: null`) the quota-warning webhook URL. A signing
/// secret is generated the first time, or on `rotate_secret`, and shown once.
async fn put_webhook(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    ApiJson(b): ApiJson<PutWebhook>,
) -> ApiResult {
    let mut site = managed_site(&st, &p, &site_id).await?;
    site.webhook_url = match b.url {
        Some(u) => Some(
            validate_origin_url(&u, st.config.allow_http_origins)
                .map_err(|e| ApiError::invalid("url", e))?,
        ),
        None => None,
    };
    let mut shown = None;
    if site.webhook_url.is_some() && (site.webhook_secret_sealed.is_none() || b.rotate_secret) {
        let secret = ids::webhook_secret();
        site.webhook_secret_sealed = Some(st.gateway.sealing().seal(&secret, &site_id));
        shown = Some(secret);
    }
    site.updated_at = now_ms() / 1000;
    st.store().update_site(&site).await?;
    st.gateway.invalidate_site(&site_id);
    trail(&st, &p, "site.webhook", &site, None).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"url": site.webhook_url, "secret": shown}),
    ))
}

fn plan_view(pl: &Plan) -> Value {
    json!({
        "plan_id": pl.plan_id, "site_id": pl.site_id, "name": pl.name,
        "requests_per_minute": pl.requests_per_minute, "monthly_quota": pl.monthly_quota,
        "created_at": pl.created_at, "updated_at": pl.updated_at,
    })
}

fn check_plan_name(v: &str) -> Result<String, ApiError> {
    let v = v.trim();
    if v.is_empty()
        || v.len() > 64
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" _.-".contains(&b))
    {
        return Err(ApiError::invalid(
            "name",
            "must be 1 to 64 characters: letters, digits, space, _ . -",
        ));
    }
    Ok(v.to_owned())
}

fn check_rpm(v: u64) -> Result<u64, ApiError> {
    check_range(
        "requests_per_minute",
        v,
        limits::MIN_REQUESTS_PER_MINUTE,
        limits::MAX_REQUESTS_PER_MINUTE,
    )
}

fn check_quota(v: u64) -> Result<u64, ApiError> {
    check_range("monthly_quota", v, 1, 1_000_000_000_000)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePlan {
    name: String,
    requests_per_minute: u64,
    monthly_quota: u64,
}

async fn create_plan(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    ApiJson(b): ApiJson<CreatePlan>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    let now = now_ms() / 1000;
    let plan = Plan {
        plan_id: ids::plan_id(),
        site_id: site_id.clone(),
        name: check_plan_name(&b.name)?,
        requests_per_minute: check_rpm(b.requests_per_minute)?,
        monthly_quota: check_quota(b.monthly_quota)?,
        created_at: now,
        updated_at: now,
        revision: 0,
    };
    let plans = st.store().list_plans(&site_id).await?.len();
    room_for(
        "this site has",
        plans,
        "plans",
        MAX_PLANS_PER_SITE,
        "delete",
    )?;
    st.store().create_plan(&plan).await?;
    trail(&st, &p, "plan.create", &site, Some(&plan.plan_id)).await?;
    Ok(json(StatusCode::CREATED, &plan_view(&plan)))
}

async fn list_plans(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let plans = st.store().list_plans(&site_id).await?;
    Ok(json(
        StatusCode::OK,
        &json!({"items": plans.iter().map(plan_view).collect::<Vec<_>>()}),
    ))
}

async fn find_plan(st: &AppState, site_id: &str, plan_id: &str) -> Result<Plan, ApiError> {
    if !ids::is_id(plan_id, "plan_") {
        return Err(not_found("plan"));
    }
    st.store()
        .get_plan(site_id, plan_id)
        .await?
        .ok_or_else(|| not_found("plan"))
}

/// Check the `plan_id` of a request body: a plan of the site, or `422`.
async fn body_plan(st: &AppState, site_id: &str, plan_id: &str) -> Result<(), ApiError> {
    match find_plan(st, site_id, plan_id).await {
        Err(ApiError::NotFound(_)) => {
            Err(ApiError::invalid("plan_id", "no such plan on this site"))
        }
        other => other.map(drop),
    }
}

async fn get_plan(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath((site_id, plan_id)): ApiPath<(String, String)>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    Ok(json(
        StatusCode::OK,
        &plan_view(&find_plan(&st, &site_id, &plan_id).await?),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdatePlan {
    #[serde(default, deserialize_with = "not_null")]
    name: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    requests_per_minute: Option<u64>,
    #[serde(default, deserialize_with = "not_null")]
    monthly_quota: Option<u64>,
}

async fn update_plan(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath((site_id, plan_id)): ApiPath<(String, String)>,
    ApiJson(b): ApiJson<UpdatePlan>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    let mut plan = find_plan(&st, &site_id, &plan_id).await?;
    if let Some(v) = b.name {
        plan.name = check_plan_name(&v)?;
    }
    if let Some(v) = b.requests_per_minute {
        plan.requests_per_minute = check_rpm(v)?;
    }
    if let Some(v) = b.monthly_quota {
        plan.monthly_quota = check_quota(v)?;
    }
    plan.updated_at = now_ms() / 1000;
    st.store().update_plan(&plan).await?;
    st.gateway.invalidate_site(&site_id);
    trail(&st, &p, "plan.update", &site, Some(&plan_id)).await?;
    Ok(json(StatusCode::OK, &plan_view(&plan)))
}

/// Delete a plan that no active token uses (revoke them first): deleting one under
/// active tokens would cut its customers off, which should be a decision of its own.
async fn delete_plan(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath((site_id, plan_id)): ApiPath<(String, String)>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    find_plan(&st, &site_id, &plan_id).await?;
    let mut active = 0;
    each_token_page(&st, &site_id, None, usize::MAX, |tokens| {
        active += (tokens.iter())
            .filter(|t| t.plan_id == plan_id && t.revoked_at.is_none())
            .count();
        async { Ok(()) }
    })
    .await?;
    if active > 0 {
        return Err(ApiError::Conflict(format!(
            "{active} active token(s) use this plan: move them to another plan or revoke them first"
        )));
    }
    if !st.store().delete_plan(&site_id, &plan_id).await? {
        return Err(not_found("plan"));
    }
    st.gateway.invalidate_site(&site_id);
    trail(&st, &p, "plan.delete", &site, Some(&plan_id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
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

/// The token's view with `usage`: this month's and this minute's use against `plan`.
fn usage_view(t: &Token, usage: &TokenUsage, plan: Option<&Plan>) -> Value {
    let now = now_ms();
    let quota = usage.quota.at(now);
    let mut v = token_view(t);
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

/// The most tokens one answer of a site's usage sums (also its default `limit`).
const USAGE_SUM_MAX: usize = 10_000;

/// This month's use of the site, by plan: `limit` tokens (default and at most
/// 10,000) at a time, in token-id order, summed; when more tokens follow,
/// `next_cursor` goes on from there and the answers' sums add up to the site's.
async fn site_usage(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let q = params(q, &["limit", "cursor"])?;
    let limit = limit_up_to(&q, USAGE_SUM_MAX, USAGE_SUM_MAX)?;
    let after = parse_cursor(&q, token_cursor)?.map(String::from);
    let mut tokens = Vec::new();
    let next_cursor = each_token_page(&st, &site_id, after, limit, |page| {
        tokens.extend(page);
        async { Ok(()) }
    })
    .await?;
    let ids: Vec<String> = tokens.iter().map(|t| t.token_id.clone()).collect();
    let usages = st.store().token_usages(&ids).await?;
    let now = now_ms();
    // Every plan of the site, and any plan a revoked token still names after its deletion.
    let plans = st.store().list_plans(&site_id).await?;
    let mut sums: Vec<PlanUse> = (plans.iter())
        .map(|p| PlanUse::new(&p.plan_id, Some(p)))
        .collect();
    for (t, u) in tokens.iter().zip(&usages) {
        let i = match sums.iter().position(|s| s.plan_id == t.plan_id) {
            Some(i) => i,
            None => {
                sums.push(PlanUse::new(&t.plan_id, None));
                sums.len() - 1
            }
        };
        sums[i].active_tokens += u64::from(t.revoked_at.is_none());
        sums[i].used += u.quota.at(now).used;
    }
    let period = period_of(now);
    Ok(json(
        StatusCode::OK,
        &json!({
            "period": period,
            "resets_at": period_end_unix(period),
            "tokens_read": tokens.len(),
            "active_tokens": sums.iter().map(|s| s.active_tokens).sum::<u64>(),
            "used": sums.iter().map(|s| s.used).sum::<u64>(),
            "plans": sums.iter().map(PlanUse::view).collect::<Vec<_>>(),
            "next_cursor": next_cursor,
        }),
    ))
}

/// One plan's line of a site's usage.
struct PlanUse<'a> {
    plan_id: String,
    plan: Option<&'a Plan>,
    active_tokens: u64,
    used: u64,
}

impl<'a> PlanUse<'a> {
    fn new(plan_id: &str, plan: Option<&'a Plan>) -> Self {
        Self {
            plan_id: plan_id.to_owned(),
            plan,
            active_tokens: 0,
            used: 0,
        }
    }

    fn view(&self) -> Value {
        json!({
            "plan_id": self.plan_id, "name": self.plan.map(|p| &p.name),
            "monthly_quota": self.plan.map(|p| p.monthly_quota),
            "active_tokens": self.active_tokens, "used": self.used,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    plan_id: String,
    label: Option<String>,
    /// `sub` of the consumer user who may see this token's usage.
    consumer: Option<String>,
}

async fn create_token(
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
fn token_cursor(c: &str) -> Option<&str> {
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

/// A page of up to `limit` tokens that `keep`, from the pages `page(after)` gives
/// (a site's tokens, in id order), starting after `after`; it ends early, with a
/// cursor, once `budget` tokens have been read.
async fn filtered_page<F, Fut>(
    mut page: F,
    keep: impl Fn(&Token) -> bool,
    limit: usize,
    mut after: Option<String>,
    budget: usize,
) -> Result<Page<Token>, ApiError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<Page<Token>, ApiError>>,
{
    let (mut items, mut read) = (Vec::new(), 0);
    loop {
        let Page {
            items: tokens,
            next_cursor,
        } = page(after).await?;
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
async fn list_tokens(
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
    let page = if filter.is_none() {
        st.store().list_tokens_page(&site_id, limit, after).await?
    } else {
        let read = |after: Option<String>| {
            let (st, site_id) = (&st, &site_id);
            async move {
                let page = st.store().list_tokens_page(site_id, 1000, after.as_deref());
                Ok::<_, ApiError>(page.await?)
            }
        };
        let keep = |t: &Token| filter.keeps(t);
        filtered_page(read, keep, limit, after.map(Into::into), FILTER_READ_BUDGET).await?
    };
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
    st.store()
        .get_token(site_id, token_id)
        .await?
        .ok_or_else(|| not_found("token"))
}

async fn get_token(
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
struct UpdateToken {
    #[serde(default, deserialize_with = "not_null")]
    plan_id: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    label: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    consumer: Option<String>,
}

/// A PATCH value that may be given empty to remove it: `None`, or checked as
/// `check_name` does.
fn name_or_none(field: &str, v: &str, max: usize) -> Result<Option<String>, ApiError> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    check_name(field, v, max).map(Some)
}

/// Move an active token to another plan of its site (its usage this month and
/// minute carries over, now against the new plan's limits), or change its label
/// or consumer (`""` removes them). The secret stays the same.
async fn update_token(
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

async fn revoke_token(
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

fn key_view(k: &ApiKey) -> Value {
    json!({
        "key_id": k.key_id, "prefix": k.prefix, "label": k.label,
        "created_at": k.created_at, "revoked_at": k.revoked_at,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    label: Option<String>,
}

/// Issue a site API key; the body is optional, `{"label"?}` names the key's user.
async fn create_key(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    body: Result<bytes::Bytes, BytesRejection>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    let b: CreateKey = optional_json(body)?;
    let label = b.label.map(|l| check_name("label", &l, 100)).transpose()?;
    let keys = st.store().list_keys(&site_id).await?;
    let active = keys.iter().filter(|k| k.revoked_at.is_none()).count();
    room_for(
        "this site has",
        active,
        "active API keys",
        MAX_ACTIVE_KEYS_PER_SITE,
        "revoke",
    )?;
    let (key, secret) = ApiKey::new(&site_id, label, now_ms() / 1000);
    st.store().create_key(&key).await?;
    trail(&st, &p, "api_key.create", &site, Some(&key.key_id)).await?;
    let mut v = key_view(&key);
    v["key"] = json!(secret);
    Ok(json(StatusCode::CREATED, &v))
}

async fn list_keys(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let mut keys = st.store().list_keys(&site_id).await?;
    // DynamoDB's TTL deletes an expired key up to two days late.
    keys.retain(|k| k.kept_at(now_ms() / 1000));
    Ok(json(
        StatusCode::OK,
        &json!({"items": keys.iter().map(key_view).collect::<Vec<_>>()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateKey {
    #[serde(default, deserialize_with = "not_null")]
    label: Option<String>,
}

/// A key of the site, active or revoked within the time revoked keys are kept.
async fn find_key(st: &AppState, site_id: &str, key_id: &str) -> Result<ApiKey, ApiError> {
    let now_s = now_ms() / 1000;
    (st.store().list_keys(site_id).await?.into_iter())
        .find(|k| k.key_id == key_id && k.kept_at(now_s))
        .ok_or_else(|| not_found("API key"))
}

async fn get_key(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath((site_id, key_id)): ApiPath<(String, String)>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let key = find_key(&st, &site_id, &key_id).await?;
    Ok(json(StatusCode::OK, &key_view(&key)))
}

/// Relabel an active API key (`""` removes the label); the key itself stays.
async fn update_key(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath((site_id, key_id)): ApiPath<(String, String)>,
    ApiJson(b): ApiJson<UpdateKey>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    let was = find_key(&st, &site_id, &key_id).await?;
    if was.revoked_at.is_some() {
        return Err(ApiError::Conflict(
            "the API key is revoked, which is final: create a new one".into(),
        ));
    }
    let mut now = was.clone();
    if let Some(v) = b.label {
        now.label = name_or_none("label", &v, 100)?;
    }
    st.store().update_key(&was, &now).await?;
    trail(&st, &p, "api_key.update", &site, Some(&key_id)).await?;
    Ok(json(StatusCode::OK, &key_view(&now)))
}

async fn revoke_key(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath((site_id, key_id)): ApiPath<(String, String)>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    if !ids::is_id(&key_id, "key_") {
        return Err(not_found("API key"));
    }
    let key = st
        .store()
        .revoke_key(&site_id, &key_id, now_ms() / 1000)
        .await?
        .ok_or_else(|| not_found("API key"))?;
    st.gateway.invalidate_key(&key.key_hash);
    trail(&st, &p, "api_key.revoke", &site, Some(&key_id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The query parameters of a list route, those with an empty value (`?cursor=`, as
/// in API.md's `logs?token_id=&plan=…`) left out as not given. A parameter the route
/// does not take is refused rather than ignored, so that a misspelt filter
/// (`?decison=deny`) is not read as "no filter".
fn params(
    mut q: HashMap<String, String>,
    known: &[&str],
) -> Result<HashMap<String, String>, ApiError> {
    q.retain(|_, v| !v.is_empty());
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid(
            k,
            format!(
                "unknown query parameter; this route takes {}",
                known.join(", ")
            ),
        )),
        None => Ok(q),
    }
}

/// The logs query's filters ([`parse_filter`]).
const FILTERS: [&str; 8] = [
    "token_id",
    "plan",
    "decision",
    "reason",
    "from",
    "to",
    "path_prefix",
    "mode",
];

/// `cursor`, if given, as `parse` reads it: a cursor of another list is a `422`.
fn parse_cursor<'q, T>(
    q: &'q HashMap<String, String>,
    parse: impl Fn(&'q str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    q.get("cursor")
        .map(|c| parse(c).ok_or_else(|| ApiError::invalid("cursor", "not a cursor from this list")))
        .transpose()
}

/// `limit`: 1–1000, default 100.
fn parse_limit(q: &HashMap<String, String>) -> Result<usize, ApiError> {
    limit_up_to(q, 1000, 100)
}

/// `limit`: 1–`max`, default `default`.
fn limit_up_to(q: &HashMap<String, String>, max: usize, default: usize) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(l) => (l.parse::<usize>().ok())
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| ApiError::invalid("limit", format!("must be between 1 and {max}"))),
    }
}

/// `from`/`to`: RFC 3339, or unix seconds.
fn parse_time(field: &str, v: &str) -> Result<u64, ApiError> {
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(secs.saturating_mul(1000));
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis().max(0) as u64)
        .map_err(|_| {
            ApiError::invalid(
                field,
                "must be RFC 3339 (2026-01-31T14:22:08Z) or unix seconds",
            )
        })
}

fn parse_filter(q: &HashMap<String, String>) -> Result<AuditFilter, ApiError> {
    let get = |k: &str| q.get(k).map(|s| s.as_str());
    let from_ms = get("from").map(|v| parse_time("from", v)).transpose()?;
    let to_ms = get("to").map(|v| parse_time("to", v)).transpose()?;
    if let (Some(from), Some(to)) = (from_ms, to_ms) {
        if from > to {
            // An empty answer would read as "nothing happened".
            return Err(ApiError::invalid("from", "must not be after to"));
        }
    }
    // Records past their retention are gone, even where the store has not deleted
    // them yet (DynamoDB's TTL takes up to two days, the local server purges hourly).
    let kept_since = audit_kept_since_ms(now_ms() / 1000);
    let from_ms = Some(from_ms.map_or(kept_since, |from| from.max(kept_since)));
    Ok(AuditFilter {
        token_id: get("token_id").map(Into::into),
        plan: get("plan").map(Into::into),
        decision: match get("decision") {
            None => None,
            Some("allow") => Some(DecisionKind::Allow),
            Some("deny") => Some(DecisionKind::Deny),
            Some(_) => return Err(ApiError::invalid("decision", "must be allow or deny")),
        },
        reason: get("reason")
            .map(|r| Reason::parse(r).ok_or_else(|| ApiError::invalid("reason", "unknown reason")))
            .transpose()?,
        from_ms,
        to_ms,
        path_prefix: get("path_prefix").map(Into::into),
        mode: match get("mode") {
            None => None,
            Some("proxy") => Some(Mode::Proxy),
            Some("middleware") => Some(Mode::Middleware),
            Some(_) => return Err(ApiError::invalid("mode", "must be proxy or middleware")),
        },
    })
}

async fn query_logs(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let q = params(q, &[&FILTERS[..], &["limit", "cursor"]].concat())?;
    let filter = parse_filter(&q)?;
    let limit = parse_limit(&q)?;
    let page = st
        .store()
        .query_audit(
            &site_id,
            &filter,
            limit,
            q.get("cursor").map(|c| c.as_str()),
        )
        .await?;
    Ok(json(StatusCode::OK, &page))
}

const CSV_COLUMNS: [&str; 12] = [
    "id",
    "timestamp",
    "site_id",
    "token_id",
    "plan",
    "method",
    "path",
    "decision",
    "reason",
    "remaining",
    "latency_ms",
    "mode",
];

fn csv_cell(v: &Value) -> String {
    let s = match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // Neutralise spreadsheet formulas; quote when needed.
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn csv_row(r: &AuditRecord) -> String {
    let v = serde_json::to_value(r).unwrap_or_default();
    let mut line = CSV_COLUMNS
        .iter()
        .map(|c| csv_cell(&v[*c]))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

/// Streams every matching record, newest first, page by page.
async fn export_logs(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let q = params(q, &[&FILTERS[..], &["format"]].concat())?;
    let filter = Arc::new(parse_filter(&q)?);
    let csv = match q.get("format").map(|s| s.as_str()) {
        None | Some("ndjson") => false,
        Some("csv") => true,
        Some(_) => return Err(ApiError::invalid("format", "must be ndjson or csv")),
    };
    let header = csv.then(|| format!("{}\n", CSV_COLUMNS.join(",")));
    let store = st.store().clone();
    // State: (cursor, first page, done).
    let stream = futures_util::stream::unfold(
        (None::<String>, header, false),
        move |(cursor, header, done)| {
            let store = store.clone();
            let filter = filter.clone();
            let site_id = site_id.clone();
            async move {
                if done {
                    return None;
                }
                let page = match store
                    .query_audit(&site_id, &filter, 500, cursor.as_deref())
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %e, "log export failed mid-stream");
                        return Some((
                            Err(std::io::Error::other("store unavailable")),
                            (None, None, true),
                        ));
                    }
                };
                let mut chunk = header.unwrap_or_default();
                for r in &page.items {
                    if csv {
                        chunk.push_str(&csv_row(r));
                    } else {
                        chunk.push_str(&serde_json::to_string(r).unwrap_or_default());
                        chunk.push('\n');
                    }
                }
                let done = page.next_cursor.is_none();
                Some((
                    Ok(bytes::Bytes::from(chunk)),
                    (page.next_cursor, None, done),
                ))
            }
        },
    );
    let mut res = Response::new(Body::from_stream(stream));
    let (ctype, ext) = if csv {
        ("text/csv; charset=utf-8", "csv")
    } else {
        ("application/x-ndjson", "ndjson")
    };
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"payfence-logs.{ext}\"")) {
        res.headers_mut()
            .insert(http::header::CONTENT_DISPOSITION, v);
    }
    Ok(res)
}

/// A page of the site's quota events (by token, then month); `next_cursor`
/// continues it.
async fn list_events(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let q = params(q, &["limit", "cursor"])?;
    let limit = parse_limit(&q)?;
    let after = parse_cursor(&q, parse_event_cursor)?;
    let page = st.store().list_events(&site_id, limit, after).await?;
    Ok(json(StatusCode::OK, &page))
}

/// A page of a user's own tokens (those assigned to it; any role may ask), with
/// usage, in token-id order (`limit` 1-1000, default 100); `next_cursor` continues it.
async fn my_tokens(
    State(st): State<AppState>,
    Extension(p): P,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    use futures_util::{StreamExt, TryStreamExt};
    let q = params(q, &["limit", "cursor"])?;
    let limit = parse_limit(&q)?;
    let after = parse_cursor(&q, token_cursor)?;
    let page = st
        .store()
        .list_consumer_tokens_page(&p.sub, limit, after)
        .await?;
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

/// The admin audit trail: admins see every change, owners the changes to their sites.
async fn audit_trail(
    State(st): State<AppState>,
    Extension(p): P,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let q = params(q, &["limit", "cursor"])?;
    let limit = parse_limit(&q)?;
    let before = parse_cursor(&q, parse_admin_cursor)?;
    let owner = match p.role {
        Role::Admin => None,
        Role::SiteOwner => Some(p.sub.as_str()),
        Role::Consumer => {
            return Err(ApiError::Forbidden(
                "consumers cannot read the audit trail".into(),
            ))
        }
    };
    let page = st.store().list_admin(limit, owner, before).await?;
    Ok(json(StatusCode::OK, &page))
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
        let store_page = |after: Option<String>| {
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
                let page = filtered_page(store_page, keep, limit, after, 8)
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
