//! Test helpers: the real server on port 0 with fresh state, and a real origin
//! that verifies PayFence signatures with the shipped verifier layer.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header::LOCATION, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use futures_util::StreamExt;
use payfence_core::auth::Role;
use payfence_core::config::Config;
use payfence_local::Local;
use serde_json::{json, Value};
use sha2::Digest;
use tokio::net::TcpListener;

pub struct App {
    pub base: String,
    pub local: Arc<Local>,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

pub fn test_config() -> Config {
    Config {
        allow_http_origins: true,
        ..Config::default()
    }
}

pub async fn spawn_app() -> App {
    spawn_app_with(test_config()).await
}

/// An app whose dashboard takes requests as fast as a test sends them.
pub async fn spawn_app_unthrottled() -> App {
    spawn_app_with(Config {
        dashboard_requests_per_second: 100_000,
        ..test_config()
    })
    .await
}

/// The DynamoDB endpoint of the test server `scripts/test.sh` started. Without it a
/// DynamoDB test fails in CI and is skipped (loudly) elsewhere.
pub fn dynamodb_endpoint() -> Option<String> {
    match std::env::var("PAYFENCE_TEST_DYNAMODB") {
        Ok(e) if !e.is_empty() => Some(e),
        _ if std::env::var_os("CI").is_some() => {
            panic!("PAYFENCE_TEST_DYNAMODB is not set: run the tests with scripts/test.sh")
        }
        _ => {
            eprintln!("SKIPPED: no DynamoDB test server (run scripts/test.sh)");
            None
        }
    }
}

pub fn unique_table(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        hex::encode(payfence_core::ids::random_bytes::<6>())
    )
}

/// The app on the store the run asks for: embedded, or with
/// `PAYFENCE_TEST_STORE=dynamodb` a fresh table on the test DynamoDB server.
pub async fn spawn_app_with(config: Config) -> App {
    let dir = tempfile::tempdir().unwrap();
    let local = if std::env::var("PAYFENCE_TEST_STORE").as_deref() == Ok("dynamodb") {
        let endpoint =
            dynamodb_endpoint().expect("PAYFENCE_TEST_STORE=dynamodb needs PAYFENCE_TEST_DYNAMODB");
        Local::open_dynamodb(dir.path(), config, &unique_table("app"), Some(&endpoint))
            .await
            .unwrap()
    } else {
        Local::open(dir.path(), config).unwrap()
    };
    spawn_local(local, dir).await
}

pub async fn spawn_local(local: Local, dir: tempfile::TempDir) -> App {
    let local = Arc::new(local);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(payfence_local::serve(listener, local.clone()));
    App {
        base: format!("http://{addr}"),
        local,
        http: client(),
        dir,
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap()
}

/// What the test origin saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path_and_query: String,
    pub headers: http::HeaderMap,
    pub body_len: usize,
    pub body_sha256: String,
}

pub struct Origin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the origin saw a request")
    }
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// Bind an origin now; it starts answering once `serve_origin` gets the secret.
pub async fn bind_origin() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// The test origin: behind `payfence_signing::VerifyLayer`, records what it saw and
/// answers with `x-respond-with` as body (or "ok"), or with a `302` to
/// `x-redirect-to`; each `x-respond-header: name: value` adds that header to the
/// answer. `/slow` sleeps 3 s first.
pub fn serve_origin(listener: TcpListener, verifier: payfence_signing::Verifier) -> Origin {
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let app = Router::new()
        .fallback(move |req: Request| {
            let seen = seen2.clone();
            async move {
                let (parts, body) = req.into_parts();
                if parts.uri.path() == "/slow" {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                let mut hasher = sha2::Sha256::new();
                let mut len = 0;
                let mut stream = body.into_data_stream();
                while let Some(chunk) = stream.next().await {
                    // A body that broke off: nothing seen.
                    let Ok(chunk) = chunk else {
                        return StatusCode::BAD_REQUEST.into_response();
                    };
                    len += chunk.len();
                    hasher.update(&chunk);
                }
                seen.lock().unwrap().push(Seen {
                    method: parts.method.to_string(),
                    path_and_query: parts.uri.path_and_query().unwrap().to_string(),
                    headers: parts.headers.clone(),
                    body_len: len,
                    body_sha256: hex::encode(hasher.finalize()),
                });
                if let Some(to) = parts.headers.get("x-redirect-to") {
                    return (StatusCode::FOUND, [(LOCATION, to.clone())]).into_response();
                }
                let reply = parts
                    .headers
                    .get("x-respond-with")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_else(|| "ok".into());
                let mut res = ([("x-origin", "yes")], reply).into_response();
                for h in parts.headers.get_all("x-respond-header") {
                    let (name, value) = h.to_str().unwrap().split_once(':').unwrap();
                    res.headers_mut().append(
                        http::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
                        http::HeaderValue::from_str(value.trim()).unwrap(),
                    );
                }
                res
            }
        })
        .layer(payfence_signing::VerifyLayer::new(verifier));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Origin { addr, seen }
}

/// A site with a plan and a token, in front of a fresh verifying origin.
pub struct Setup {
    pub owner: String,
    pub site_id: String,
    pub secret: String,
    pub plan_id: String,
    pub token_id: String,
    pub token: String,
    pub origin: Origin,
}

impl App {
    pub fn jwt(&self, sub: &str, role: Role) -> String {
        self.local
            .issuer
            .token(sub, role, Duration::from_secs(3600))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A dashboard request with a JSON body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        jwt: &str,
        path: &str,
        body: Value,
    ) -> reqwest::Response {
        self.http
            .request(method, self.url(path))
            .bearer_auth(jwt)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, jwt: &str, path: &str, body: Value) -> reqwest::Response {
        self.send(reqwest::Method::POST, jwt, path, body).await
    }

    pub async fn patch(&self, jwt: &str, path: &str, body: Value) -> reqwest::Response {
        self.send(reqwest::Method::PATCH, jwt, path, body).await
    }

    /// A dashboard `DELETE`.
    pub async fn delete(&self, jwt: &str, path: &str) -> reqwest::Response {
        self.http
            .delete(self.url(path))
            .bearer_auth(jwt)
            .send()
            .await
            .unwrap()
    }

    /// `POST /v1/authorize` with a site API key.
    pub async fn authorize(&self, key: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/authorize"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, jwt: &str, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(jwt)
            .send()
            .await
            .unwrap()
    }

    /// GET `path`, which must answer 200, as JSON.
    pub async fn get_json(&self, jwt: &str, path: &str) -> Value {
        let res = self.get(jwt, path).await;
        assert_eq!(res.status(), 200, "{path}");
        res.json().await.unwrap()
    }

    /// Every page of a list route, `query` (e.g. `limit=2`) at a time, following
    /// `next_cursor` to the end.
    pub async fn pages(&self, jwt: &str, path: &str, query: &str) -> Vec<Value> {
        let (mut pages, mut cursor) = (Vec::new(), String::new());
        loop {
            let page = self.get_json(jwt, &format!("{path}?{query}{cursor}")).await;
            let next = page["next_cursor"].as_str().map(|c| format!("&cursor={c}"));
            pages.push(page);
            match next {
                Some(c) => cursor = c,
                None => return pages,
            }
        }
    }

    pub async fn create_site(&self, jwt: &str, origin_url: &str) -> Value {
        let res = self
            .post(
                jwt,
                "/api/sites",
                json!({"name": "Travel API", "origin_url": origin_url}),
            )
            .await;
        assert_eq!(res.status(), 201);
        res.json().await.unwrap()
    }

    pub async fn create_plan(&self, jwt: &str, site_id: &str, rpm: u64, quota: u64) -> String {
        self.create_named_plan(jwt, site_id, "pro", rpm, quota)
            .await
    }

    /// A plan named `name`: its id.
    pub async fn create_named_plan(
        &self,
        jwt: &str,
        site_id: &str,
        name: &str,
        rpm: u64,
        quota: u64,
    ) -> String {
        let res = self
            .post(
                jwt,
                &format!("/api/sites/{site_id}/plans"),
                json!({"name": name, "requests_per_minute": rpm, "monthly_quota": quota}),
            )
            .await;
        assert_eq!(res.status(), 201);
        res.json::<Value>().await.unwrap()["plan_id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn create_token(&self, jwt: &str, site_id: &str, plan_id: &str) -> (String, String) {
        let res = self
            .post(
                jwt,
                &format!("/api/sites/{site_id}/tokens"),
                json!({"plan_id": plan_id}),
            )
            .await;
        assert_eq!(res.status(), 201);
        let v: Value = res.json().await.unwrap();
        (
            v["token_id"].as_str().unwrap().into(),
            v["token"].as_str().unwrap().into(),
        )
    }

    pub async fn create_key(&self, jwt: &str, site_id: &str) -> String {
        let res = self
            .post(jwt, &format!("/api/sites/{site_id}/api-keys"), json!({}))
            .await;
        assert_eq!(res.status(), 201);
        res.json::<Value>().await.unwrap()["key"]
            .as_str()
            .unwrap()
            .into()
    }

    /// A site in front of `origin_url` with a plan (60 a minute, 10 a month) and a
    /// token: the site id and the token.
    pub async fn site_with_token(&self, jwt: &str, origin_url: &str) -> (String, String) {
        let site = self.create_site(jwt, origin_url).await;
        let site_id = site["site_id"].as_str().unwrap().to_owned();
        let plan = self.create_plan(jwt, &site_id, 60, 10).await;
        let (_, token) = self.create_token(jwt, &site_id, &plan).await;
        (site_id, token)
    }

    /// Owner `alice` with a site in front of a verifying origin, a plan and a token.
    pub async fn setup(&self, rpm: u64, quota: u64) -> Setup {
        let owner = self.jwt("alice", Role::SiteOwner);
        let (listener, addr) = bind_origin().await;
        let site = self.create_site(&owner, &format!("http://{addr}")).await;
        let secret = site["signing_secret"].as_str().unwrap().to_owned();
        let site_id = site["site_id"].as_str().unwrap().to_owned();
        let origin = serve_origin(listener, payfence_signing::Verifier::new(&secret));
        let plan_id = self.create_plan(&owner, &site_id, rpm, quota).await;
        let (token_id, token) = self.create_token(&owner, &site_id, &plan_id).await;
        Setup {
            owner,
            site_id,
            secret,
            plan_id,
            token_id,
            token,
            origin,
        }
    }

    /// GET through the proxy with a bearer token.
    pub async fn proxy_get(&self, site_id: &str, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/p/{site_id}{path}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn logs(&self, jwt: &str, site_id: &str, query: &str) -> Value {
        self.get_json(jwt, &format!("/api/sites/{site_id}/logs?{query}"))
            .await
    }
}

/// Wait, if needed, so that the next few seconds stay inside one calendar minute.
pub async fn avoid_minute_boundary() {
    let now = payfence_core::domain::now_ms();
    let into = now % 60_000;
    if into > 45_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - into + 500)).await;
    }
}

/// A duration in milliseconds as PayFence reports them: a number with at most three
/// decimals (to the microsecond), not a float's binary noise.
pub fn is_ms_to_the_microsecond(v: &Value) -> bool {
    v.as_f64().is_some_and(|ms| ms >= 0.0)
        && v.to_string()
            .split_once('.')
            .is_none_or(|(_, f)| f.len() <= 3)
}

pub fn header<'a>(res: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    res.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The rate-limit headers every response to a resolved token carries.
pub fn assert_rate_headers(res: &reqwest::Response) {
    for h in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "ratelimit-policy",
        "ratelimit",
    ] {
        assert!(header(res, h).is_some(), "missing {h} on {}", res.status());
    }
}

/// Send raw bytes and read the whole response (the server closes or answers once).
pub async fn raw_request(base: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
