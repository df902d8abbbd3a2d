//! `GET /api/health`: a real round trip to the store, at most
//! `PAYFENCE_HEALTH_RPS` a second per client (an IPv4 address or an IPv6 /64).

use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::from_fn;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use http::StatusCode;
use payfence_core::domain::elapsed_ms;
use payfence_core::http::{client_ip, json, per_second_limit, request_context};
use payfence_core::AppState;
use serde_json::json;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .with_state(state)
        .layer(from_fn(request_context))
}

async fn health(State(st): State<AppState>, req: Request) -> Response {
    // Anyone may call it, and each call reaches the store: limited per client.
    let key = match client_ip(&req) {
        Some(ip) => format!("health:{}", payfence_core::limits::client_of(ip)),
        None => "health:".to_owned(),
    };
    let limit = st.config.health_requests_per_second;
    per_second_limit(&st.limiter, &key, limit, probe(&st)).await
}

async fn probe(st: &AppState) -> Response {
    let started = Instant::now();
    let probe = tokio::time::timeout(Duration::from_secs(3), st.store().ping()).await;
    let latency_ms = elapsed_ms(started);
    let version = env!("CARGO_PKG_VERSION");
    match probe {
        Ok(Ok(())) => json(
            StatusCode::OK,
            &json!({"status": "ok", "checks": {"store": {"status": "ok", "latency_ms": latency_ms}}, "version": version}),
        ),
        failed => {
            let error = match failed {
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "health: store check failed");
                    "store unreachable"
                }
                _ => "store timed out",
            };
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "degraded", "checks": {"store": {"status": "error", "latency_ms": latency_ms, "error": error}}, "version": version}),
            )
        }
    }
}
