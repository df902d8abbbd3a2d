//! The dashboard Lambda (JWT-protected `/api/*`).

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    payfence_core::telemetry::init();
    let state = payfence_core::AppState::from_env(true).await?;
    lambda_http::run(payfence_dashboard::router(state)).await
}
