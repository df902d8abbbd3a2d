//! A site's plans: create, list, read, update, delete.

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Extension;
use http::StatusCode;
use payfence_core::domain::{now_ms, Plan};
use payfence_core::http::{json, ApiError, ApiJson, ApiPath};
use payfence_core::store::PlanDeletion;
use payfence_core::{ids, limits, AppState};
use serde::Deserialize;
use serde_json::{json, Value};

use super::input::{check_range, not_null};
use super::{managed_site, not_found, room_for, trail, ApiResult, MAX_PLANS_PER_SITE, P};

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
pub(super) struct CreatePlan {
    name: String,
    requests_per_minute: u64,
    monthly_quota: u64,
}

pub(super) async fn create_plan(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    ApiJson(b): ApiJson<CreatePlan>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    let now = now_ms() / 1000;
    let plan = Plan::new(
        &site_id,
        &check_plan_name(&b.name)?,
        check_rpm(b.requests_per_minute)?,
        check_quota(b.monthly_quota)?,
        now,
    );
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

pub(super) async fn list_plans(
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
pub(super) async fn body_plan(st: &AppState, site_id: &str, plan_id: &str) -> Result<(), ApiError> {
    match find_plan(st, site_id, plan_id).await {
        Err(ApiError::NotFound(_)) => {
            Err(ApiError::invalid("plan_id", "no such plan on this site"))
        }
        other => other.map(drop),
    }
}

pub(super) async fn get_plan(
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
pub(super) struct UpdatePlan {
    #[serde(default, deserialize_with = "not_null")]
    name: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    requests_per_minute: Option<u64>,
    #[serde(default, deserialize_with = "not_null")]
    monthly_quota: Option<u64>,
}

pub(super) async fn update_plan(
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
/// The store checks and deletes at once, so no token can be issued onto it meanwhile.
pub(super) async fn delete_plan(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath((site_id, plan_id)): ApiPath<(String, String)>,
) -> ApiResult {
    let site = managed_site(&st, &p, &site_id).await?;
    match st.store().delete_plan(&site_id, &plan_id).await? {
        PlanDeletion::Deleted => {}
        PlanDeletion::NotFound => return Err(not_found("plan")),
        PlanDeletion::InUse(active) => {
            return Err(ApiError::Conflict(format!(
                "{active} active token(s) use this plan: move them to another plan or revoke them first"
            )))
        }
    }
    st.gateway.invalidate_site(&site_id);
    trail(&st, &p, "plan.delete", &site, Some(&plan_id)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
