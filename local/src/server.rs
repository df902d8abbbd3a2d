//! The local server's threads: one single-threaded tokio runtime per core. An
//! acceptor hands each new connection to the next thread in turn; the connection,
//! its requests and the origin connections they use then stay on that thread, with
//! no hand-offs between threads (see docs/performance.md for what this saved).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

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

/// Serve every router of `local` on `listener` with `threads` threads (this one
/// included) until `shutdown` resolves; then stop accepting, finish the requests in
/// flight on every thread, and return.
pub async fn run(
    listener: TcpListener,
    local: Arc<Local>,
    threads: usize,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let mut queues = Vec::new();
    let mut handles = Vec::new();
    for i in 1..threads {
        let (tx, rx) = mpsc::unbounded_channel();
        queues.push(tx);
        let (local, stopped) = (local.clone(), stopped.clone());
        let handle = std::thread::Builder::new()
            .name(format!("payfence-http-{i}"))
            .spawn(move || runtime()?.block_on(serve(rx, addr, &local, stopped)))?;
        handles.push(handle);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    queues.push(tx);
    let acceptor = accept(listener, queues, stopped.clone());
    let here = serve(rx, addr, &local, stopped);
    let stopping = async {
        shutdown.await;
        let _ = stop.send(true);
    };
    let ((), (), served) = tokio::join!(stopping, acceptor, here);
    for handle in handles {
        handle
            .join()
            .map_err(|_| std::io::Error::other("a server thread panicked"))??;
    }
    served
}

/// Accept connections and hand them to the threads in turn, until told to stop.
async fn accept(
    listener: TcpListener,
    queues: Vec<mpsc::UnboundedSender<Handoff>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted.and_then(|(stream, peer)| Ok((stream.into_std()?, peer))) {
            Ok(handoff) => {
                let _ = queues[next % queues.len()].send(handoff);
                next += 1;
            }
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                // Out of file descriptors or memory: wait, as axum::serve does.
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

/// The connections handed to one thread, as a listener for `axum::serve`.
struct Handed {
    rx: mpsc::UnboundedReceiver<Handoff>,
    addr: SocketAddr,
}

impl axum::serve::Listener for Handed {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Some((stream, peer)) = self.rx.recv().await else {
                // The acceptor has stopped: shutdown is under way.
                return std::future::pending().await;
            };
            match TcpStream::from_std(stream) {
                Ok(stream) => return (stream, peer),
                Err(e) => tracing::warn!(error = %e, "taking over a connection failed"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Serve the connections handed to this thread until `stopped`, then finish the
/// requests in flight.
async fn serve(
    rx: mpsc::UnboundedReceiver<Handoff>,
    addr: SocketAddr,
    local: &Local,
    mut stopped: watch::Receiver<bool>,
) -> std::io::Result<()> {
    // Responses are written whole; small streamed chunks must not wait for an ACK.
    let listener = Handed { rx, addr }.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(
        listener,
        local
            .router()
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    })
    .await
}
