//! The proxy Lambda: streams origin responses back (response streaming).

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    payfence_core::telemetry::init();
    let state = payfence_core::AppState::from_env(false).await?;
    lambda_http::run_with_streaming_response(payfence_proxy::router(state)).await
}
