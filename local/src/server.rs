//! The local server's threads: one single-threaded tokio runtime per core. An
//! acceptor hands each new connection to the next thread in turn; the connection,
//! its requests and the origin connections they use then stay on that thread, with
//! no hand-offs between threads (see docs/performance.md for what this saved).
//! [`Connections`] serves each connection with a header read timeout, and with a
//! timeout for a client that stalls a body in either direction.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use http_body::{Body as _, Frame};
use hyper::body::Incoming;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use payfence_core::http::BodyStalled;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Sleep;
use tower::ServiceExt;

use crate::Local;

type Handoff = (std::net::TcpStream, SocketAddr);

/// A listening socket (`SO_REUSEADDR`, so a restart can bind at once).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A single-threaded runtime, for `main` and for each server thread.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Where a server is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Not accepting; the requests in flight may finish (within the grace period).
    Draining,
    /// Close every connection now.
    Closing,
}

/// Serve every router of `local` on `listener` with `threads` threads (this one
/// included) until `shutdown` resolves; then stop accepting and let the requests in
/// flight finish on every thread, for up to `Config::shutdown_grace` or until `force`
/// resolves, whichever comes first; then close the connections left, and return.
pub async fn run(
    listener: TcpListener,
    local: Arc<Local>,
    threads: usize,
    shutdown: impl Future<Output = ()>,
    force: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (stop, stopped) = watch::channel(Phase::Serving);
    let mut queues = Vec::new();
    let mut handles = Vec::new();
    for i in 1..threads {
        let (tx, rx) = mpsc::unbounded_channel();
        queues.push(tx);
        let (local, stopped) = (local.clone(), stopped.clone());
        let handle = std::thread::Builder::new()
            .name(format!("payfence-http-{i}"))
            .spawn(move || runtime().map(|rt| rt.block_on(serve(rx, &local, stopped))))?;
        handles.push(handle);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    queues.push(tx);
    let acceptor = accept(listener, queues, stopped.clone());
    let here = serve(rx, &local, stopped);
    let stopping = async {
        shutdown.await;
        let _ = stop.send(Phase::Draining);
        let grace = tokio::time::sleep(local.state.config.shutdown_grace);
        tokio::select! {
            _ = grace => tracing::warn!(
                grace_ms = local.state.config.shutdown_grace.as_millis() as u64,
                "requests still in flight at the end of the shutdown grace period: closing"
            ),
            _ = force => tracing::warn!("asked again to stop: closing the connections left"),
            _ = stop.closed() => return, // every thread is done
        }
        let _ = stop.send(Phase::Closing);
    };
    tokio::join!(stopping, acceptor, here);
    for handle in handles {
        handle
            .join()
            .map_err(|_| std::io::Error::other("a server thread panicked"))??;
    }
    Ok(())
}

/// Accept connections and hand them to the threads in turn, until told to stop.
async fn accept(
    listener: TcpListener,
    queues: Vec<mpsc::UnboundedSender<Handoff>>,
    mut stopped: watch::Receiver<Phase>,
) {
    let mut next = 0;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped.wait_for(|p| *p >= Phase::Draining) => return,
            accepted = next_connection(&listener) => accepted,
        };
        match stream.into_std() {
            Ok(stream) => {
                let _ = queues[next % queues.len()].send((stream, peer));
                next += 1;
            }
            Err(e) => tracing::warn!(error = %e, "handing over a connection failed"),
        }
    }
}

/// The next connection; a client that gave up before it was accepted is skipped,
/// and a failure of the listener itself (out of file descriptors or memory) is
/// waited out, as `axum::serve` does.
async fn next_connection(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                tracing::error!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// The most a connection buffers of a request head (request line and headers): room
/// for the longest target (8 KiB) and header block (32 KiB) the gateway serves, so those
/// get its own `414`/`431` problem answers, while a client stalling mid-head holds at
/// most this much memory (hyper's default is about 400 KB). Bodies are streamed in
/// reads of up to this size.
const MAX_HEAD_BUFFER: usize = 64 * 1024;

/// Serves connections with the local server's HTTP settings: HTTP/1.1 (and 1.0),
/// `TCP_NODELAY`, and `Config::client_header_timeout` for a request's headers, timed
/// from the moment the connection is accepted or its previous answer was sent. So a
/// connection that sends nothing, a half-sent request and an idle keep-alive
/// connection are all closed after it: slow or idle clients cannot hold connections.
/// (No HTTP/2 with prior knowledge: hyper's detection of it waits for the first bytes
/// with no time limit, and the proxy speaks HTTP/1.1 to origins anyway.) A request
/// head may take at most [`MAX_HEAD_BUFFER`]. A client that sends nothing more of a
/// request body for `Config::client_body_timeout` fails that body ([`StallGuard`]),
/// and one that takes nothing of an answer for as long loses its connection
/// ([`SendTimeout`]).
pub struct Connections {
    router: axum::Router,
    builder: Builder,
    body_timeout: Duration,
    graceful: GracefulShutdown,
}

impl Connections {
    pub fn new(local: &Local) -> Self {
        let mut builder = Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(local.state.config.client_header_timeout)
            .max_buf_size(MAX_HEAD_BUFFER);
        Self {
            router: local.router(),
            builder,
            body_timeout: local.state.config.client_body_timeout,
            graceful: GracefulShutdown::new(),
        }
    }

    /// Serve one connection on a task of the current runtime.
    pub fn serve(&self, stream: TcpStream, peer: SocketAddr) {
        // Responses are written whole; small streamed chunks must not wait for an ACK.
        let _ = stream.set_nodelay(true);
        let body_timeout = self.body_timeout;
        let service = self
            .router
            .clone()
            .map_request(move |req: http::Request<Incoming>| {
                let mut req = req.map(|body| {
                    if body.is_end_stream() {
                        Body::new(body)
                    } else {
                        Body::new(StallGuard {
                            body,
                            stall: Stall::new(body_timeout),
                        })
                    }
                });
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            });
        let conn = self.builder.serve_connection(
            TokioIo::new(SendTimeout {
                stream,
                stall: Stall::new(body_timeout),
            }),
            TowerToHyperService::new(service),
        );
        let conn = self.graceful.watch(conn);
        tokio::spawn(async move {
            // A client that goes away, stalls or sends garbage ends only its connection.
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }

    /// Let the connections finish the requests in flight, then close them.
    pub async fn shutdown(self) {
        self.graceful.shutdown().await;
    }
}

/// The clock of `Config::client_body_timeout`: how long a client has made no progress
/// while we waited for it.
struct Stall {
    timeout: Duration,
    /// Set while we wait (made on the first wait).
    deadline: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl Stall {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            deadline: None,
            waiting: false,
        }
    }

    fn progressed(&mut self) {
        self.waiting = false;
    }

    /// We wait (again): has the wait lasted `timeout`? If not, `cx` is woken when it has.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let sleep = match &mut self.deadline {
            Some(sleep) if self.waiting => sleep,
            Some(sleep) => {
                sleep
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.timeout);
                sleep
            }
            None => self
                .deadline
                .insert(Box::pin(tokio::time::sleep(self.timeout))),
        };
        self.waiting = true;
        sleep.as_mut().poll(cx).is_ready()
    }
}

/// A request body that fails with [`BodyStalled`] when its client has sent nothing
/// more of it for `Config::client_body_timeout` while it was awaited.
struct StallGuard {
    body: Incoming,
    stall: Stall,
}

impl http_body::Body for StallGuard {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            this.stall.progressed();
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.stall.expired(cx) {
            return Poll::Ready(Some(Err(BodyStalled(this.stall.timeout).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A client's connection whose writes fail with `TimedOut` when the client has taken
/// nothing of what it is sent for `Config::client_body_timeout` (it stopped reading,
/// so the sockets' buffers are full). hyper then closes it, and drops the answer it
/// was sending.
struct SendTimeout {
    stream: TcpStream,
    stall: Stall,
}

impl SendTimeout {
    /// A write's outcome, or `TimedOut` once writes have waited the timeout in a row.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stall.progressed();
            return polled;
        }
        if self.stall.expired(cx) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client took nothing of the answer for {} ms",
                    self.stall.timeout.as_millis()
                ),
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for SendTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.timed(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accept on `listener` and serve every connection on the current runtime, for
/// ever (one thread; for tests and embedding).
pub async fn serve_listener(listener: TcpListener, local: &Local) -> std::io::Result<()> {
    let connections = Connections::new(local);
    loop {
        let (stream, peer) = next_connection(&listener).await;
        connections.serve(stream, peer);
    }
}

/// Serve the connections handed to this thread until told to stop, then finish the
/// requests in flight unless told to close.
async fn serve(
    mut rx: mpsc::UnboundedReceiver<Handoff>,
    local: &Local,
    mut stopped: watch::Receiver<Phase>,
) {
    let connections = Connections::new(local);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stopped.wait_for(|p| *p >= Phase::Draining) => break,
            handed = rx.recv() => match handed {
                Some(handed) => handed,
                None => break,
            },
        };
        match TcpStream::from_std(stream) {
            Ok(stream) => connections.serve(stream, peer),
            Err(e) => tracing::warn!(error = %e, "taking over a connection failed"),
        }
    }
    tokio::select! {
        () = connections.shutdown() => {}
        // The connections' tasks end with this thread's runtime.
        _ = stopped.wait_for(|p| *p == Phase::Closing) => {}
    }
}
