//! Structured JSON logs.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// `RUST_LOG` as `level` or `level,target=level,...` (no regular expressions);
/// `info` when unset or unreadable.
fn filter() -> Targets {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| "info".parse().expect("a valid filter"))
}

/// JSON logs to stdout, a write per line, level from `RUST_LOG` (default `info`).
/// For Lambda, which serves one request at a time. Call once.
pub fn init() {
    init_with_writer(std::io::stdout);
}

/// JSON logs to any writer (the local server uses a [`batched`] one).
pub fn init_with_writer<W>(writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(true)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(writer)
        .finish()
        .with(filter())
        .try_init();
}

/// How often the batched writer's thread writes what has gathered.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Lines pending beyond this many bytes (the sink is stuck) are dropped and counted.
const MAX_PENDING: usize = 8 << 20;

struct Pending {
    buf: Mutex<Vec<u8>>,
    dropped: AtomicU64,
    stop: AtomicBool,
}

/// A log writer for a busy server: each line is appended to an in-memory buffer
/// (one short lock, no system call, no thread wake-up) and one thread writes the
/// buffer to the sink every [`FLUSH_EVERY`]. A line is never split or interleaved.
/// If the sink falls more than 8 MiB behind, new lines are dropped and the count of
/// dropped lines is logged once the sink catches up.
#[derive(Clone)]
pub struct BatchedWriter {
    pending: Arc<Pending>,
}

/// Flushes what is pending and stops the writer's thread when dropped.
pub struct FlushGuard {
    pending: Arc<Pending>,
    thread: Option<JoinHandle<()>>,
}

/// A batched writer to `sink`, and the guard to keep alive until exit.
pub fn batched<W: Write + Send + 'static>(sink: W) -> (BatchedWriter, FlushGuard) {
    let pending = Arc::new(Pending {
        buf: Mutex::new(Vec::with_capacity(64 << 10)),
        dropped: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let p = pending.clone();
    let thread = std::thread::Builder::new()
        .name("payfence-log".into())
        .spawn(move || flush_loop(&p, sink))
        .expect("spawn the log writer thread");
    (
        BatchedWriter {
            pending: pending.clone(),
        },
        FlushGuard {
            pending,
            thread: Some(thread),
        },
    )
}

fn flush_loop(p: &Pending, mut sink: impl Write) {
    let mut out = Vec::with_capacity(64 << 10);
    loop {
        let stopping = p.stop.load(Ordering::Acquire);
        std::mem::swap(&mut out, &mut *p.buf.lock().unwrap());
        let dropped = p.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                out,
                r#"{{"level":"WARN","target":"payfence::log","message":"log lines dropped: the log sink fell behind","dropped":{dropped}}}"#
            );
        }
        if !out.is_empty() {
            // A failing sink loses these lines; there is nowhere to report that.
            let _ = sink.write_all(&out).and_then(|()| sink.flush());
            out.clear();
            if out.capacity() > 1 << 20 {
                out.shrink_to(64 << 10);
            }
        }
        if stopping {
            return;
        }
        std::thread::park_timeout(FLUSH_EVERY);
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.pending.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

impl Write for BatchedWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut buf = self.pending.buf.lock().unwrap();
        if buf.len() + line.len() > MAX_PENDING {
            drop(buf);
            self.pending.dropped.fetch_add(1, Ordering::Relaxed);
        } else {
            buf.extend_from_slice(line);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedWriter {
    type Writer = BatchedWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_whole_and_in_order_per_thread() {
        let sink = Sink::default();
        let (writer, guard) = batched(sink.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        w.write_all(format!("{{\"t\":{t},\"i\":{i}}}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard); // flushes the rest
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let mut next = [0u64; 4];
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let t = v["t"].as_u64().unwrap() as usize;
            assert_eq!(v["i"].as_u64().unwrap(), next[t], "thread {t} out of order");
            next[t] += 1;
        }
        assert_eq!(next, [5_000; 4]);
    }

    #[test]
    fn a_stuck_sink_drops_lines_and_says_how_many() {
        struct Stuck(Arc<Mutex<()>>, Sink);
        impl Write for Stuck {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let _wait = self.0.lock().unwrap();
                self.1.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new(Mutex::new(()));
        let sink = Sink::default();
        let held = gate.lock().unwrap();
        let (mut writer, guard) = batched(Stuck(gate.clone(), sink.clone()));
        // The first flush takes whatever is pending and blocks in the sink; wait for it.
        writer.write_all(b"{\"first\":true}\n").unwrap();
        while !writer.pending.buf.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        for _ in 0..MAX_PENDING / line.len() + 100 {
            writer.write_all(&line).unwrap();
        }
        drop(held);
        drop(guard);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let warning = out
            .lines()
            .find(|l| l.contains("log lines dropped"))
            .expect("a warning line");
        let v: serde_json::Value = serde_json::from_str(warning).unwrap();
        assert!(v["dropped"].as_u64().unwrap() >= 100);
        assert!(out.len() <= MAX_PENDING + 4096);
    }
}
