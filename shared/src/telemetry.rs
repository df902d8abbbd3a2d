//! Structured JSON logs.

use std::fmt::{self, Write as _};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use chrono::{Datelike, Timelike};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// `RUST_LOG` as `level` or `level,target=level,...` (no regular expressions);
/// `info` when unset or unreadable.
fn filter() -> Targets {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| "info".parse().expect("a valid filter"))
}

/// A panic is logged as an `ERROR` line of target `payfence::panic` with its message
/// and location, instead of Rust's plain-text report, so that log queries and
/// alarms see it.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(
            target: "payfence::panic",
            panic = %panic_message(info.payload()),
            location,
            "panicked"
        );
    }));
}

/// The message a panic was raised with.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// JSON logs to stdout, a write per line, level from `RUST_LOG` (default `info`).
/// For Lambda, which serves one request at a time: `tracing_subscriber`'s own JSON,
/// which also lists the spans a line was logged in (the runtime's invocation span
/// carries the AWS request id). Call once.
pub fn init() {
    log_panics();
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(true)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(std::io::stdout)
        .finish()
        .with(filter())
        .try_init();
}

/// JSON logs to any writer (the local server uses a [`batched`] one), formatted by
/// [`JsonLine`]. Call once.
pub fn init_with_writer<W>(writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    log_panics();
    let _ = tracing_subscriber::fmt()
        .event_format(JsonLine)
        .with_max_level(tracing::Level::TRACE)
        .with_writer(writer)
        .finish()
        .with(filter())
        .try_init();
}

/// One log line per event, in the shape of `tracing_subscriber`'s flattened JSON
/// (`timestamp`, `level`, the event's fields in order, `target`), written straight
/// into the line instead of through a map of `serde_json::Value`s: the local server
/// logs every request, and this takes half the time of the stock formatter.
/// Spans are not listed (the local server opens none).
pub struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut w: format::Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = chrono::Utc::now();
        let (d, t) = (now.date_naive(), now.time());
        write!(
            w,
            "{{\"timestamp\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z\",\"level\":\"{}\"",
            d.year(),
            d.month(),
            d.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.nanosecond() / 1000 % 1_000_000,
            event.metadata().level()
        )?;
        let mut fields = JsonFields {
            w: &mut w,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str(",\"target\":")?;
        json_str(&mut w, event.metadata().target())?;
        w.write_str("}\n")
    }
}

/// Writes each field as `,"name":value`.
struct JsonFields<'a, 'w> {
    w: &'a mut format::Writer<'w>,
    result: fmt::Result,
}

/// Keys every line writes itself. A field of the same name is written as
/// `field_<name>`, so that no key appears twice in a line (a JSON reader would keep
/// only one of them).
const LINE_KEYS: [&str; 3] = ["timestamp", "level", "target"];

impl JsonFields<'_, '_> {
    fn put(&mut self, field: &Field, value: impl FnOnce(&mut format::Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            let name = field.name();
            self.result = self
                .w
                .write_char(',')
                .and_then(|()| match LINE_KEYS.contains(&name) {
                    true => json_fmt(self.w, format_args!("field_{name}")),
                    false => json_str(self.w, name),
                })
                .and_then(|()| self.w.write_char(':'))
                .and_then(|()| value(self.w));
        }
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, |w| json_str(w, value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, |w| json_fmt(w, format_args!("{value:?}")));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, |w| json_fmt(w, format_args!("{value}")));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, |w| write!(w, "{value}"));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, |w| write!(w, "{value}"));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, |w| write!(w, "{value}"));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        self.put(field, |w| match value.is_finite() {
            true => write!(w, "{value}"),
            false => w.write_str("null"),
        });
    }
}

fn json_str(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_str(s)?;
    w.write_char('"')
}

/// `value` formatted as a JSON string.
fn json_fmt(w: &mut impl fmt::Write, value: fmt::Arguments<'_>) -> fmt::Result {
    w.write_char('"')?;
    Escaped(w).write_fmt(value)?;
    w.write_char('"')
}

/// Escapes what it is given for the inside of a JSON string.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let short = match b {
                b'"' => Some("\\\""),
                b'\\' => Some("\\\\"),
                b'\n' => Some("\\n"),
                b'\r' => Some("\\r"),
                b'\t' => Some("\\t"),
                0..=0x1f => None,
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            match short {
                Some(e) => self.0.write_str(e)?,
                None => write!(self.0, "\\u{b:04x}")?,
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
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

    /// What `emit` logs through `format`: one line.
    fn one_line(format: impl FnOnce(Sink) -> tracing::Dispatch, emit: impl FnOnce()) -> String {
        let sink = Sink::default();
        tracing::dispatcher::with_default(&format(sink.clone()), emit);
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        out
    }

    /// PayFence's own format.
    fn json_line(sink: Sink) -> tracing::Dispatch {
        tracing_subscriber::fmt()
            .event_format(JsonLine)
            .with_writer(move || sink.clone())
            .finish()
            .into()
    }

    /// One event with fields of every kind through `format`, as parsed JSON.
    fn log_line(format: impl FnOnce(Sink) -> tracing::Dispatch) -> serde_json::Value {
        let out = one_line(format, || {
            tracing::info!(
                target: "payfence::test",
                text = "say \"hi\"\n\t\\ \u{1} é",
                shown = %"a\"b",
                debugged = ?Some("x"),
                count = 42u64,
                delta = -7i64,
                yes = true,
                ratio = 0.062464000000000006,
                nothing = f64::NAN,
                absent = None::<&str>,
                "a message with {}", "arguments"
            );
        });
        serde_json::from_str(&out).unwrap()
    }

    #[test]
    fn json_line_writes_what_the_stock_json_formatter_writes() {
        let stock = log_line(|sink| {
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_writer(move || sink.clone())
                .finish()
                .into()
        });
        let fast = log_line(json_line);
        let ts = fast["timestamp"].as_str().unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
        assert_eq!(ts.len(), stock["timestamp"].as_str().unwrap().len(), "{ts}");
        let without_time = |mut v: serde_json::Value| {
            v.as_object_mut().unwrap().remove("timestamp");
            v
        };
        assert_eq!(without_time(fast), without_time(stock));
    }

    #[test]
    fn a_field_named_as_a_key_of_the_line_is_renamed() {
        let out = one_line(json_line, || {
            tracing::info!(target: "payfence::test", target = "plan_1", level = 3u64, timestamp = "t", "m");
        });
        for key in ["timestamp", "level", "target", "message"] {
            assert_eq!(
                out.matches(&format!("\"{key}\":")).count(),
                1,
                "{key}: {out}"
            );
        }
        let line: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(line["target"], "payfence::test");
        assert_eq!(line["field_target"], "plan_1");
        assert_eq!(line["field_level"], 3);
        assert_eq!(line["field_timestamp"], "t");
        assert_eq!(line["level"], "INFO");
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
