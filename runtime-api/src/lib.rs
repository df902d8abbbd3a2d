//! A minimal Lambda Runtime API (the `2018-06-01` interface a function binary
//! polls): it hands out queued events, records the function's responses (buffered
//! or streamed) and errors, notes when the function first asked for an event (its
//! init time), and can stop the function while it waits for an event, as Lambda
//! freezes an idle execution environment.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

/// What a function answered to one event.
#[derive(Clone, Debug)]
pub struct Answer {
    pub request_id: String,
    pub streaming: bool,
    pub error: bool,
    pub raw: Bytes,
}

impl Answer {
    /// The HTTP response the function meant: (status, headers, body).
    pub fn http(&self) -> (u16, Value, Bytes) {
        if self.streaming {
            // A JSON prelude, eight NUL bytes, then the body.
            let sep = self
                .raw
                .windows(8)
                .position(|w| w == [0u8; 8])
                .unwrap_or(self.raw.len());
            let prelude: Value = serde_json::from_slice(&self.raw[..sep]).unwrap_or_default();
            let body = self.raw.slice((sep + 8).min(self.raw.len())..);
            (
                prelude["statusCode"].as_u64().unwrap_or(0) as u16,
                prelude["headers"].clone(),
                body,
            )
        } else {
            let v: Value = serde_json::from_slice(&self.raw).unwrap_or_default();
            let body = v["body"].as_str().unwrap_or_default().to_owned();
            (
                v["statusCode"].as_u64().unwrap_or(0) as u16,
                v["headers"].clone(),
                Bytes::from(body),
            )
        }
    }
}

#[derive(Default)]
struct Inner {
    events: VecDeque<Value>,
    answers: Vec<Answer>,
    first_next: Option<Instant>,
    init_error: Option<String>,
    /// Stop the function (`SIGSTOP`) when it asks for an event and none is queued,
    /// as Lambda freezes an idle environment.
    freeze_when_idle: bool,
    pid: Option<u32>,
    frozen: bool,
}

#[derive(Clone)]
pub struct Emulator {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

async fn next(State(inner): State<Arc<Mutex<Inner>>>) -> Response {
    let event = {
        let mut i = inner.lock().unwrap();
        i.first_next.get_or_insert_with(Instant::now);
        i.events.pop_front()
    };
    let Some(event) = event else {
        // No more events: keep the function waiting, as Lambda does.
        {
            let mut i = inner.lock().unwrap();
            if let (true, Some(pid)) = (i.freeze_when_idle, i.pid) {
                // SAFETY: kill has no memory-safety preconditions.
                i.frozen = unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) } == 0;
            }
        }
        std::future::pending::<()>().await;
        unreachable!()
    };
    let id = event["requestContext"]["requestId"]
        .as_str()
        .unwrap_or("req-1")
        .to_owned();
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 30_000;
    (
        [
            ("lambda-runtime-aws-request-id", id),
            ("lambda-runtime-deadline-ms", deadline.to_string()),
            (
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:us-east-1:123456789012:function:test".into(),
            ),
            (
                "lambda-runtime-trace-id",
                "Root=1-00000000-000000000000000000000000".into(),
            ),
        ],
        event.to_string(),
    )
        .into_response()
}

async fn answer(
    State(inner): State<Arc<Mutex<Inner>>>,
    UrlPath((id, kind)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let streaming = headers
        .get("lambda-runtime-function-response-mode")
        .is_some_and(|v| v == "streaming");
    inner.lock().unwrap().answers.push(Answer {
        request_id: id,
        streaming,
        error: kind == "error",
        raw: body,
    });
    StatusCode::ACCEPTED
}

async fn init_error(State(inner): State<Arc<Mutex<Inner>>>, body: Bytes) -> StatusCode {
    inner.lock().unwrap().init_error = Some(String::from_utf8_lossy(&body).into_owned());
    StatusCode::ACCEPTED
}

impl Emulator {
    /// Serve the Runtime API on a free loopback port with these events queued.
    pub async fn start(events: Vec<Value>) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            events: events.into(),
            ..Default::default()
        }));
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route("/2018-06-01/runtime/invocation/{id}/{kind}", post(answer))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, inner }
    }

    /// From now on, stop the function whenever it asks for an event and none is
    /// queued, as Lambda freezes an idle environment (see [`Self::frozen`]).
    pub fn freeze_when_idle(&self) {
        self.inner.lock().unwrap().freeze_when_idle = true;
    }

    /// Whether the function has been frozen.
    pub fn frozen(&self) -> bool {
        self.inner.lock().unwrap().frozen
    }

    /// Start a function binary against this Runtime API, with extra environment.
    pub fn spawn(&self, binary: &Path, env: &[(&str, &str)]) -> Child {
        let name = binary.file_name().unwrap().to_string_lossy().into_owned();
        let child = Command::new(binary)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AWS_LAMBDA_RUNTIME_API", self.addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", &name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/payfence/test/{name}"),
            )
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
            .env("AWS_REGION", "us-east-1")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.inner.lock().unwrap().pid = Some(child.id());
        child
    }

    /// Start `binary`, wait (up to 30 s) for `n` answers, stop it, and return them.
    pub async fn run(&self, binary: &Path, env: &[(&str, &str)], n: usize) -> Vec<Answer> {
        let mut child = self.spawn(binary, env);
        let answers = self.answers(n, Duration::from_secs(30)).await;
        let _ = child.kill();
        let _ = child.wait();
        answers
    }

    /// When the function first asked for an event.
    pub fn first_next(&self) -> Option<Instant> {
        self.inner.lock().unwrap().first_next
    }

    pub fn init_error(&self) -> Option<String> {
        self.inner.lock().unwrap().init_error.clone()
    }

    /// Wait until `n` answers arrived (or the time is up).
    pub async fn answers(&self, n: usize, within: Duration) -> Vec<Answer> {
        let end = Instant::now() + within;
        loop {
            let got = self.inner.lock().unwrap().answers.clone();
            if got.len() >= n || Instant::now() > end || self.init_error().is_some() {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A Lambda Function URL (API Gateway HTTP API v2.0 payload) event.
pub fn url_event(
    id: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Value {
    let (raw_path, query) = path.split_once('?').unwrap_or((path, ""));
    let mut h = serde_json::Map::new();
    h.insert("host".into(), json!("abcdefgh.lambda-url.us-east-1.on.aws"));
    for (k, v) in headers {
        h.insert(k.to_string(), json!(v));
    }
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": query,
        "headers": h,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abcdefgh",
            "domainName": "abcdefgh.lambda-url.us-east-1.on.aws",
            "domainPrefix": "abcdefgh",
            "http": {"method": method, "path": raw_path, "protocol": "HTTP/1.1", "sourceIp": "203.0.113.7", "userAgent": "test"},
            "requestId": id,
            "routeKey": "$default",
            "stage": "$default",
            "time": "22/Nov/2026:17:00:00 +0000",
            "timeEpoch": 1795366800000u64
        },
        "body": body,
        "isBase64Encoded": false
    })
}
