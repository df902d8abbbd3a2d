//! A baseline for the load benchmark (`ONLY="... bare" bash bench/run.sh`): the HTTP
//! shape of PayFence's proxy with nothing else. One single-threaded runtime per core
//! serves HTTP/1.1 with hyper and forwards each request, streamed, to the origin
//! through PayFence's own origin client and timeouts, as `payfence-local` does; no
//! authorization, no signature, no audit, no log. What it costs per request on a
//! machine is the floor for any hyper-based forwarder there (see docs/performance.md).
//!
//! ```sh
//! cargo run --release -p payfence-local --example bare_forwarder -- 127.0.0.1:18083 http://127.0.0.1:18081
//! ```

use std::net::SocketAddr;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use payfence_core::config::Config;
use payfence_core::origin::{origin_client, OriginClient};
use payfence_local::server::runtime;
use tokio::sync::mpsc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_forwarder LISTEN_ADDR ORIGIN_URL (e.g. 127.0.0.1:18083 http://127.0.0.1:18081)";
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let origin: Uri = args.next().ok_or(usage)?.parse()?;
    let (scheme, authority) = match (origin.scheme(), origin.authority()) {
        (Some(s), Some(a)) => (s.clone(), a.clone()),
        _ => return Err(usage.into()),
    };
    let config = Config::default();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut queues = Vec::new();
    for _ in 0..threads {
        let (tx, mut rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
        queues.push(tx);
        let (scheme, authority, config) = (scheme.clone(), authority.clone(), config.clone());
        let runtime = runtime()?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                // Like the proxy: one client per thread, private origins allowed locally.
                let client = origin_client(true, config.origin_connect_timeout);
                while let Some(stream) = rx.recv().await {
                    let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                        continue;
                    };
                    let (client, scheme, authority) =
                        (client.clone(), scheme.clone(), authority.clone());
                    let timeout = config.origin_timeout;
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let request = upstream(scheme.clone(), authority.clone(), req);
                        forward(client.clone(), timeout, request)
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service),
                    );
                }
            })
        });
    }
    let listener = std::net::TcpListener::bind(listen)?;
    println!("bare forwarder listening on http://{listen}, forwarding to {origin}");
    for (i, stream) in listener.incoming().enumerate() {
        let Ok(stream) = stream else { continue };
        if stream.set_nodelay(true).is_ok() && stream.set_nonblocking(true).is_ok() {
            let _ = queues[i % threads].send(stream);
        }
    }
    Ok(())
}

/// The request for the origin: the same path and query, headers and body.
fn upstream(scheme: Scheme, authority: Authority, req: Request<Incoming>) -> Option<Request<Body>> {
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .ok()?;
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    parts.headers.remove(hyper::header::HOST);
    Some(Request::from_parts(parts, Body::new(body)))
}

async fn forward(
    client: OriginClient,
    timeout: std::time::Duration,
    request: Option<Request<Body>>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let status = match request {
        None => StatusCode::BAD_REQUEST,
        Some(request) => match tokio::time::timeout(timeout, client.request(request)).await {
            Ok(Ok(res)) => return Ok(res.map(Body::new)),
            Ok(Err(_)) => StatusCode::BAD_GATEWAY,
            Err(_) => StatusCode::GATEWAY_TIMEOUT,
        },
    };
    let mut res = Response::new(Body::empty());
    *res.status_mut() = status;
    Ok(res)
}
