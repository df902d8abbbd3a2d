//! The dashboard API (`/api/*` but health): sites, plans, tokens, API keys,
//! signing-secret rotation, webhook settings, logs, quota events, the admin audit
//! trail. Every route needs a Cognito-style JWT; site owners see only their sites.

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use http::header::{HeaderValue, CONTENT_TYPE};
use payfence_core::auth::{AuthError, Principal, Role};
use payfence_core::domain::{now_ms, rfc3339_ms, AdminEvent, Site};
use payfence_core::http::{
    bearer, per_second_limit, request_context, ApiError, LogFields, MAX_JSON_BODY_BYTES,
};
use payfence_core::{ids, AppState};

mod input;
mod keys;
mod logs;
mod plans;
mod sites;
mod tokens;
mod usage;

use keys::{create_key, get_key, list_keys, revoke_key, update_key};
use logs::{audit_trail, export_logs, list_events, query_logs};
use plans::{create_plan, delete_plan, get_plan, list_plans, update_plan};
use sites::{
    create_site, delete_site, get_site, get_webhook, list_sites, put_webhook, rotate_secret,
    update_site,
};
use tokens::{create_token, get_token, list_tokens, my_tokens, revoke_token, update_token};
use usage::site_usage;

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
