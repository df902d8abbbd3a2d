//! The dashboard Lambda (JWT-protected `/api/*`).

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    payfence_core::telemetry::init();
    let state = payfence_core::AppState::from_env(true).await?;
    let store = state.gateway.store().clone();
    // Streamed, so that a logs export is not cut at the 6 MB of a buffered answer.
    payfence_core::lambda::run_streaming(store, payfence_dashboard::router(state)).await
}
