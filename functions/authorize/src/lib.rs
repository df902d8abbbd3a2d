//! Middleware mode: `POST /v1/authorize`, called by the origin with its site API key.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::middleware::from_fn;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http::HeaderMap;
use payfence_core::domain::{elapsed_ms, Mode};
use payfence_core::gateway::{AuthorizeRequest, Decision};
use payfence_core::http::{
    bearer, decision_headers, json, parse_json, request_context, ApiError, LogFields,
    MAX_JSON_BODY_BYTES, MAX_TARGET_BYTES,
};
use payfence_core::{ids, AppState};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeBody {
    #[serde(default)]
    token: Option<String>,
    method: String,
    path: String,
    /// The end client's address, if the origin knows it (for the failed-attempt limit).
    #[serde(default)]
    client_ip: Option<String>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/authorize", post(authorize))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES))
        .with_state(state)
        .layer(from_fn(request_context))
}

fn valid_method(m: &str) -> bool {
    !m.is_empty() && m.len() <= 16 && m.bytes().all(|b| b.is_ascii_uppercase())
}

fn valid_path(p: &str) -> bool {
    p.starts_with('/') && !p.bytes().any(|b| b.is_ascii_control() || b == b' ')
}

/// The decision body of API.md "Middleware mode", serialised straight from the
/// decision (fields in alphabetical order, as they always were).
#[derive(Serialize)]
struct DecisionBody<'a> {
    decision: &'static str,
    limit: Option<Limit>,
    plan: &'a Option<String>,
    reason: Option<&'static str>,
    remaining: Option<Pair>,
    reset: Option<Pair>,
    retry_after: Option<u64>,
    token_id: &'a Option<String>,
}

#[derive(Serialize)]
struct Limit {
    monthly_quota: u64,
    requests_per_minute: u64,
}

#[derive(Serialize)]
struct Pair {
    minute: u64,
    quota: u64,
}

impl<'a> DecisionBody<'a> {
    fn new(d: &'a Decision) -> Self {
        let resolved = d.limits.is_some();
        Self {
            decision: if d.allowed { "allow" } else { "deny" },
            limit: d.limits.map(|l| Limit {
                monthly_quota: l.monthly_quota,
                requests_per_minute: l.requests_per_minute,
            }),
            plan: &d.plan,
            reason: d.reason.map(|r| r.as_str()),
            remaining: resolved.then_some(Pair {
                minute: d.remaining_minute,
                quota: d.remaining_quota,
            }),
            reset: resolved.then_some(Pair {
                minute: d.reset_minute,
                quota: d.reset_quota,
            }),
            retry_after: d.retry_after,
            token_id: &d.token_id,
        }
    }
}

async fn authorize(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let unauthorized = || {
        ApiError::Unauthorized(
            "a valid site API key is required: Authorization: Bearer sk_…".into(),
        )
    };
    let key = bearer(&headers)
        .filter(|k| ids::is_api_key_shaped(k))
        .ok_or_else(unauthorized)?;
    let key = st.gateway.api_key(&key).await?.ok_or_else(unauthorized)?;
    let body: AuthorizeBody = parse_json(&body?)?;
    if !valid_method(&body.method) {
        return Err(ApiError::invalid(
            "method",
            "must be an HTTP method in upper case, e.g. GET",
        ));
    }
    if !valid_path(&body.path) {
        return Err(ApiError::invalid(
            "path",
            "must start with / and contain no spaces or control characters",
        ));
    }
    if body.path.len() > MAX_TARGET_BYTES {
        return Err(ApiError::invalid(
            "path",
            "must be at most 8 KiB (8,192 bytes), path and query together",
        ));
    }
    let client_ip = match body.client_ip.as_deref() {
        None | Some("") => None,
        Some(ip) => Some(
            ip.parse()
                .map_err(|_| ApiError::invalid("client_ip", "must be an IPv4 or IPv6 address"))?,
        ),
    };
    let site = st
        .gateway
        .site(&key.site_id)
        .await?
        .ok_or_else(unauthorized)?;
    let authorized = st
        .gateway
        .authorize(AuthorizeRequest {
            site: &site,
            token: body.token.as_deref(),
            method: &body.method,
            path_and_query: &body.path,
            client_ip,
            mode: Mode::Middleware,
            started,
        })
        .await?;
    authorized.durable.await?;
    let d = authorized.decision;
    let mut res = json(http::StatusCode::OK, &DecisionBody::new(&d));
    decision_headers(res.headers_mut(), &d);
    res.extensions_mut().insert(LogFields {
        site_id: Some(site.site.site_id.clone()),
        token_id: d.token_id.clone(),
        decision: Some(if d.allowed { "allow" } else { "deny" }),
        reason: d.reason.map(|r| r.as_str()),
        auth_ms: Some(elapsed_ms(started)),
        ..Default::default()
    });
    Ok(res.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use payfence_core::domain::Reason;
    use payfence_core::limits::PlanLimits;

    #[test]
    fn decision_bodies_have_every_field_of_api_md() {
        let allow = Decision {
            allowed: true,
            token_id: Some("tok_1".into()),
            plan: Some("pro".into()),
            limits: Some(PlanLimits {
                requests_per_minute: 60,
                monthly_quota: 1000,
            }),
            remaining_minute: 59,
            remaining_quota: 999,
            reset_minute: 1_796_486_360,
            reset_quota: 1_798_761_600,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&DecisionBody::new(&allow)).unwrap(),
            r#"{"decision":"allow","limit":{"monthly_quota":1000,"requests_per_minute":60},"plan":"pro","reason":null,"remaining":{"minute":59,"quota":999},"reset":{"minute":1796486360,"quota":1798761600},"retry_after":null,"token_id":"tok_1"}"#
        );
        let deny = Decision {
            reason: Some(Reason::MissingToken),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&DecisionBody::new(&deny)).unwrap(),
            r#"{"decision":"deny","limit":null,"plan":null,"reason":"missing_token","remaining":null,"reset":null,"retry_after":null,"token_id":null}"#
        );
    }
}
