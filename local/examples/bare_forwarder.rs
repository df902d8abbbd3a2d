//! A baseline for the load benchmark (`ONLY="... bare" bash bench/run.sh`): the HTTP
//! shape of PayFence's proxy with nothing else. One single-threaded runtime per core
//! serves HTTP/1.1 with hyper and forwards each request, streamed, to the origin
//! through hyper-util's pooled client, as `payfence-local` does; no authorization, no
//! signature, no audit, no log. What it costs per request on a machine is the floor
//! for any hyper-based forwarder there (see docs/performance.md).
//!
//! ```sh
//! cargo run --release -p payfence-local --example bare_forwarder -- 127.0.0.1:18083 http://127.0.0.1:18081
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

type Body = http_body_util::Either<Incoming, http_body_util::Empty<hyper::body::Bytes>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_forwarder LISTEN_ADDR ORIGIN_URL (e.g. 127.0.0.1:18083 http://127.0.0.1:18081)";
    let listen: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let origin: Uri = args.next().ok_or(usage)?.parse()?;
    let (scheme, authority) = match (origin.scheme(), origin.authority()) {
        (Some(s), Some(a)) => (s.clone(), a.clone()),
        _ => return Err(usage.into()),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut queues = Vec::new();
    for _ in 0..threads {
        let (tx, mut rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
        queues.push(tx);
        let (scheme, authority) = (scheme.clone(), authority.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let mut http = HttpConnector::new();
                http.set_nodelay(true);
                let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(256)
                    .build(http);
                while let Some(stream) = rx.recv().await {
                    let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                        continue;
                    };
                    let (client, scheme, authority) =
                        (client.clone(), scheme.clone(), authority.clone());
                    let forward = hyper::service::service_fn(move |req: Request<Incoming>| {
                        forward(client.clone(), scheme.clone(), authority.clone(), req)
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), forward),
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

async fn forward(
    client: Client<HttpConnector, Incoming>,
    scheme: hyper::http::uri::Scheme,
    authority: hyper::http::uri::Authority,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build();
    let status = match uri {
        Ok(uri) => {
            *req.uri_mut() = uri;
            req.headers_mut().remove(hyper::header::HOST);
            match tokio::time::timeout(Duration::from_secs(30), client.request(req)).await {
                Ok(Ok(res)) => return Ok(res.map(http_body_util::Either::Left)),
                Ok(Err(_)) => StatusCode::BAD_GATEWAY,
                Err(_) => StatusCode::GATEWAY_TIMEOUT,
            }
        }
        Err(_) => StatusCode::BAD_REQUEST,
    };
    let mut res = Response::new(http_body_util::Either::Right(http_body_util::Empty::new()));
    *res.status_mut() = status;
    Ok(res)
}
