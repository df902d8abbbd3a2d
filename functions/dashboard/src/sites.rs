//! Sites: create, list, read, update, delete; signing-secret rotation; the
//! quota-warning webhook settings.

use std::collections::HashMap;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::Extension;
use http::StatusCode;
use payfence_core::auth::Role;
use payfence_core::domain::{now_ms, Site};
use payfence_core::http::{json, ApiError, ApiJson, ApiPath};
use payfence_core::origin::validate_origin_url;
use payfence_core::store::PlanDeletion;
use payfence_core::{ids, AppState};
use serde::Deserialize;
use serde_json::{json, Value};

use super::input::{
    check_name, check_origin, check_params, check_range, not_null, optional_json, params,
    parse_cursor, parse_limit, required,
};
use super::tokens::each_token_page;
use super::{managed_site, not_found, room_for, trail, ApiResult, MAX_SITES_PER_OWNER, P};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateSite {
    name: String,
    origin_url: String,
    site_requests_per_second: Option<u64>,
    replay_window_seconds: Option<u64>,
    failed_attempts_per_minute: Option<u64>,
    secret_query_params: Option<Vec<String>>,
}

pub(super) async fn create_site(
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
pub(super) async fn list_sites(
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

pub(super) async fn get_site(
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
pub(super) struct UpdateSite {
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

pub(super) async fn update_site(
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

/// Delete a site: revoke its API keys and tokens, delete its plans, then the site
/// itself with its quota events; in that order, so a failure part-way leaves the
/// site in place, with what was revoked so far, for a retry. Its audit records stay
/// until they expire.
pub(super) async fn delete_site(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    let (store, now) = (st.store(), now_ms() / 1000);
    for key in store.list_keys(&site_id).await? {
        if key.revoked_at.is_none() {
            store.revoke_key(&site_id, &key.key_id, now).await?;
            st.gateway.invalidate_key(&key.key_hash);
        }
    }
    // A plan a token is still active on stays: one issued after the site's tokens
    // were listed (or not yet in the list DynamoDB's index reads). Those are revoked
    // in another pass, a little later; after three, the deletion is refused.
    for pass in 1.. {
        revoke_tokens(&st, &site_id, now).await?;
        if delete_plans(&st, &site_id).await? {
            break;
        }
        if pass == 3 {
            return Err(ApiError::Conflict(
                "tokens are being issued on the site meanwhile: delete it again".into(),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50 * pass)).await;
    }
    if !store.delete_site(&site_id).await? {
        return Err(not_found("site"));
    }
    st.gateway.invalidate_site(&site_id);
    trail(&st, &p, "site.delete", &site, None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Revoke every active token of the site, 16 at a time.
async fn revoke_tokens(st: &AppState, site_id: &str, now: u64) -> Result<(), ApiError> {
    use futures_util::{StreamExt, TryStreamExt};
    let store = st.store();
    each_token_page(st, site_id, None, usize::MAX, |tokens| async {
        let active = tokens.into_iter().filter(|t| t.revoked_at.is_none());
        futures_util::stream::iter(active)
            .map(|t| async move { store.revoke_token(site_id, &t.token_id, now).await })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    })
    .await
    .map(drop)
}

/// Delete every plan of the site; `false` if an active token kept one.
async fn delete_plans(st: &AppState, site_id: &str) -> Result<bool, ApiError> {
    let store = st.store();
    let mut all = true;
    for plan in store.list_plans(site_id).await? {
        let deleted = store.delete_plan(site_id, &plan.plan_id).await?;
        all &= !matches!(deleted, PlanDeletion::InUse(_));
    }
    Ok(all)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Rotate {
    overlap_seconds: Option<u64>,
}

pub(super) async fn rotate_secret(
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

pub(super) async fn get_webhook(
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
pub(super) struct PutWebhook {
    /// Required, `null` to remove the webhook: a body that leaves it out (say
    /// `{"rotate_secret": true}`) must not remove it by omission.
    #[serde(deserialize_with = "required")]
    url: Option<String>,
    #[serde(default)]
    rotate_secret: bool,
}

/// Set (or clear, with `url: null`) the quota-warning webhook URL. A signing
/// secret is generated the first time, or on `rotate_secret`, and shown once.
pub(super) async fn put_webhook(
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
