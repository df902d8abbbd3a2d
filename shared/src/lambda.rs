//! Running a router as a Lambda function.
//!
//! Audit records are written off the request path, but Lambda freezes the
//! environment as soon as the function asks for its next event, and may end a
//! frozen environment without warning. So after each answer has been sent, and
//! before the next event is asked for, the function waits for its store to settle
//! (its audit records stored), within what is left of the invocation's time. The
//! caller already has its answer; only the environment's billed time grows.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use lambda_http::lambda_runtime::{self, LambdaInvocation, Runtime};
use lambda_http::tower::{Layer, Service};

use crate::domain::now_ms;
use crate::store::Store;

/// Serve `router` with buffered responses.
pub async fn run(store: Arc<dyn Store>, router: Router) -> Result<(), lambda_http::Error> {
    Runtime::new(lambda_http::Adapter::from(router))
        .layer(Settle(store))
        .run()
        .await
}

/// Serve `router` with streamed responses.
pub async fn run_streaming(
    store: Arc<dyn Store>,
    router: Router,
) -> Result<(), lambda_http::Error> {
    lambda_http::streaming_runtime(router)
        .layer(Settle(store))
        .run()
        .await
}

/// Waits for the store to settle after each invocation has been answered.
#[derive(Clone)]
struct Settle(Arc<dyn Store>);

impl<S> Layer<S> for Settle {
    type Service = Settled<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Settled {
            inner,
            store: self.0.clone(),
        }
    }
}

struct Settled<S> {
    inner: S,
    store: Arc<dyn Store>,
}

impl<S> Service<LambdaInvocation> for Settled<S>
where
    S: Service<LambdaInvocation, Response = (), Error = lambda_runtime::Error>,
    S::Future: 'static,
{
    type Response = ();
    type Error = lambda_runtime::Error;
    type Future = Pin<Box<dyn Future<Output = Result<(), Self::Error>>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, invocation: LambdaInvocation) -> Self::Future {
        let left = time_left(invocation.context.deadline);
        // The inner service answers the Runtime API before it resolves.
        let answered = self.inner.call(invocation);
        let store = self.store.clone();
        Box::pin(async move {
            let result = answered.await;
            if tokio::time::timeout(left, store.settle()).await.is_err() {
                tracing::warn!("audit records not yet stored when the invocation's time ran out");
            }
            result
        })
    }
}

/// Time until `deadline_ms` (Unix milliseconds), less a margin for asking for the
/// next event.
fn time_left(deadline_ms: u64) -> Duration {
    Duration::from_millis(deadline_ms.saturating_sub(now_ms()).saturating_sub(100))
}
