//! Site API keys (middleware mode): issue, list, read, relabel, revoke.

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::Extension;
use http::StatusCode;
use payfence_core::domain::{now_ms, ApiKey};
use payfence_core::http::{json, ApiError, ApiJson, ApiPath};
use payfence_core::{ids, AppState};
use serde::Deserialize;
use serde_json::{json, Value};

use super::input::{check_name, name_or_none, not_null, optional_json};
use super::{managed_site, not_found, room_for, trail, ApiResult, MAX_ACTIVE_KEYS_PER_SITE, P};

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
pub(super) async fn create_key(
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

pub(super) async fn list_keys(
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
pub(super) struct UpdateKey {
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

pub(super) async fn get_key(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath((site_id, key_id)): ApiPath<(String, String)>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let key = find_key(&st, &site_id, &key_id).await?;
    Ok(json(StatusCode::OK, &key_view(&key)))
}

/// Relabel an active API key (`""` removes the label); the key itself stays.
pub(super) async fn update_key(
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

pub(super) async fn revoke_key(
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
