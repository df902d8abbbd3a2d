//! The proxy Lambda: streams origin responses back (response streaming).

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    payfence_core::telemetry::init();
    let state = payfence_core::AppState::from_env(false).await?;
    let store = state.gateway.store().clone();
    payfence_core::lambda::run_streaming(store, payfence_proxy::router(state)).await
}
