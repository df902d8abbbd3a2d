//! A site's use this month, summed by plan.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::Extension;
use http::StatusCode;
use payfence_core::domain::{now_ms, Plan};
use payfence_core::http::{json, ApiPath};
use payfence_core::limits::{period_end_unix, period_of};
use payfence_core::AppState;
use serde_json::{json, Value};

use super::input::{limit_up_to, params, parse_cursor};
use super::tokens::{each_token_page, token_cursor};
use super::{managed_site, ApiResult, P};

/// The most tokens one answer of a site's usage sums (also its default `limit`).
const USAGE_SUM_MAX: usize = 10_000;

/// This month's use of the site, by plan: `limit` tokens (default and at most
/// 10,000) at a time, in token-id order, summed; when more tokens follow,
/// `next_cursor` goes on from there and the answers' sums add up to the site's.
pub(super) async fn site_usage(
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
