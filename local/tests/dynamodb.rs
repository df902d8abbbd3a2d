//! PayFence on DynamoDB (the test server scripts/test.sh starts): requests per
//! decision, changes seen by another process, and failing closed while the server
//! is down.

mod common;

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::response::IntoResponse;
use axum::Router;
use common::*;
use payfence_core::store::dynamo::DynamoStore;
use payfence_core::store::EventStore;
use payfence_local::Local;
use serde_json::{json, Value};

/// Answers a request to the DynamoDB server in its place (given the operation and
/// the request's JSON), or `None` to let it through.
type Intercept = Arc<dyn Fn(&str, &Value) -> Option<axum::response::Response> + Send + Sync>;

/// An HTTP forwarder in front of the DynamoDB server that records, per request,
/// the operation and the kind of item (`UpdateItem TOKEN`, `BatchWriteItem -`, …),
/// and forwards it unless `intercept` answers it.
async fn forwarder(target: String, intercept: Intercept) -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let app = Router::new().fallback(move |req: Request| {
        let (seen, http, target) = (seen2.clone(), http.clone(), target.clone());
        let intercept = intercept.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let op = parts
                .headers
                .get("x-amz-target")
                .and_then(|v| v.to_str().ok())
                .and_then(|t| t.split('.').nth(1))
                .unwrap_or("-")
                .to_owned();
            let json: Value = serde_json::from_slice(&body).unwrap_or_default();
            let kind = json["Key"]["pk"]["S"]
                .as_str()
                .and_then(|pk| pk.split('#').next())
                .unwrap_or("-")
                .to_owned();
            seen.lock().unwrap().push(format!("{op} {kind}"));
            if let Some(answer) = intercept(&op, &json) {
                return answer;
            }
            let mut out = http.request(parts.method, format!("{target}{}", parts.uri.path()));
            for (k, v) in &parts.headers {
                if k != "host" && k != "content-length" {
                    out = out.header(k, v);
                }
            }
            let res = out.body(body).send().await.unwrap();
            let status = res.status();
            let ctype = res.headers().get("content-type").cloned();
            let bytes = res.bytes().await.unwrap();
            let mut r = (status, bytes).into_response();
            if let Some(c) = ctype {
                r.headers_mut().insert("content-type", c);
            }
            r
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

fn count(seen: &[String], what: &str) -> usize {
    seen.iter().filter(|s| s.as_str() == what).count()
}

/// A local server on a new table (named from `prefix`) of the DynamoDB server at
/// `endpoint`, reaching it through a [`forwarder`] with `intercept`: the app, the
/// calls seen, and the table.
async fn app_behind_forwarder(
    endpoint: String,
    prefix: &str,
    intercept: Intercept,
) -> (App, Arc<Mutex<Vec<String>>>, String) {
    let (forwarder, seen) = forwarder(endpoint, intercept).await;
    let (dir, table) = (tempfile::tempdir().unwrap(), unique_table(prefix));
    let local = Local::open_dynamodb(dir.path(), test_config(), &table, Some(&forwarder))
        .await
        .unwrap();
    (spawn_local(local, dir).await, seen, table)
}

/// An [`Intercept`] that gives `answer` to the next calls that `matches`, as many
/// as the count it returns holds (0 at first; set it), and lets the others through.
fn countdown(
    matches: impl Fn(&str, &Value) -> bool + Send + Sync + 'static,
    answer: fn(&Value) -> axum::response::Response,
) -> (Intercept, Arc<AtomicUsize>) {
    let left = Arc::new(AtomicUsize::new(0));
    let count = left.clone();
    let intercept: Intercept = Arc::new(move |op, request| {
        let take = || (left.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))).is_ok();
        (matches(op, request) && take()).then(|| answer(request))
    });
    (intercept, count)
}

/// An answer of DynamoDB's (JSON 1.0).
fn dynamodb_answer(status: http::StatusCode, body: Value) -> axum::response::Response {
    let mut answer = (status, body.to_string()).into_response();
    let json_1_0 = http::HeaderValue::from_static("application/x-amz-json-1.0");
    answer.headers_mut().insert("content-type", json_1_0);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_conditional_update_per_decision_and_no_reads() {
    let Some(endpoint) = dynamodb_endpoint() else {
        return;
    };
    let (app, seen, _) = app_behind_forwarder(endpoint, "trips", Arc::new(|_, _| None)).await;
    let s = app.setup(10_000, 1_000_000).await;
    let key = app.create_key(&s.owner, &s.site_id).await;
    let authorize = |token: String| {
        let (http, url, key) = (app.http.clone(), app.url("/v1/authorize"), key.clone());
        async move {
            let res = http
                .post(url)
                .bearer_auth(key)
                .json(&json!({"token": token, "method": "GET", "path": "/v1/x"}))
                .send()
                .await
                .unwrap();
            res.json::<Value>().await.unwrap()
        }
    };
    // Warm: the token, site, plan and key are cached; the previous minute is known.
    assert_eq!(
        app.proxy_get(&s.site_id, "/warm", &s.token).await.status(),
        200
    );
    assert_eq!(authorize(s.token.clone()).await["decision"], "allow");
    app.logs(&s.owner, &s.site_id, "").await; // this process's audit writes have landed
    seen.lock().unwrap().clear();

    const N: usize = 20;
    for i in 0..N {
        assert_eq!(
            app.proxy_get(&s.site_id, &format!("/r/{i}"), &s.token)
                .await
                .status(),
            200
        );
        assert_eq!(authorize(s.token.clone()).await["decision"], "allow");
    }
    let hot: Vec<String> = seen.lock().unwrap().clone();
    let decisions = 2 * N;
    // The one sequential round trip: one conditional UpdateItem on the token's usage
    // item per decision. Beside it, concurrently, the site's per-second counter.
    assert_eq!(count(&hot, "UpdateItem TOKEN"), decisions, "{hot:?}");
    assert_eq!(count(&hot, "UpdateItem SITE"), decisions, "{hot:?}");
    // No reads on the warm path; audit records go in batches, off the request path.
    for read in ["GetItem", "Query", "Scan", "DescribeTable"] {
        assert!(
            !hot.iter().any(|s| s.starts_with(read)),
            "{read} on the hot path: {hot:?}"
        );
    }
    let other = hot
        .iter()
        .filter(|s| !s.starts_with("UpdateItem") && !s.starts_with("BatchWriteItem"))
        .count();
    assert_eq!(other, 0, "{hot:?}");
    let logs = app.logs(&s.owner, &s.site_id, "limit=1000").await;
    assert_eq!(
        logs["items"].as_array().unwrap().len(),
        2 + decisions,
        "every decision audited"
    );
}

/// DynamoDB's answer to a transaction cancelled because another transaction held
/// one of its items: here the one that updates (a plan's count of active tokens).
fn transaction_conflict(request: &Value) -> axum::response::Response {
    let reasons: Vec<Value> = (request["TransactItems"].as_array().unwrap().iter())
        .map(|item| match item.get("Update") {
            Some(_) => json!({"Code": "TransactionConflict",
                              "Message": "Transaction is ongoing for the item"}),
            None => json!({"Code": "None"}),
        })
        .collect();
    let body = json!({
        "__type": "com.amazonaws.dynamodb.v20120810#TransactionCanceledException",
        "Message": "Transaction cancelled, please refer cancellation reasons for specific reasons",
        "CancellationReasons": reasons,
    });
    dynamodb_answer(http::StatusCode::BAD_REQUEST, body)
}

/// A token transaction that DynamoDB cancels because another one held the plan
/// item (as when a site's tokens are revoked 16 at a time) is sent again, up to 8
/// times; past that the dashboard answers 503 and nothing was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_transactions_cancelled_by_a_conflict_are_sent_again() {
    let Some(endpoint) = dynamodb_endpoint() else {
        return;
    };
    // How many of the next TransactWriteItems calls DynamoDB cancels.
    let (intercept, conflicts) =
        countdown(|op, _| op == "TransactWriteItems", transaction_conflict);
    let (app, seen, _) = app_behind_forwarder(endpoint, "conflicts", intercept).await;
    let s = app.setup(600, 1000).await;
    let tokens = format!("/api/sites/{}/tokens", s.site_id);
    let plan = format!("/api/sites/{}/plans/{}", s.site_id, s.plan_id);
    let transactions = || count(&seen.lock().unwrap(), "TransactWriteItems -");

    // Issued on the fourth attempt, and counted on its plan once.
    conflicts.store(3, SeqCst);
    let before = transactions();
    let (token_id, token) = app.create_token(&s.owner, &s.site_id, &s.plan_id).await;
    assert_eq!(transactions() - before, 4);
    assert_eq!(app.proxy_get(&s.site_id, "/", &token).await.status(), 200);
    let res = app.delete(&s.owner, &plan).await;
    assert_eq!(res.status(), 409);
    let detail = res.json::<Value>().await.unwrap()["detail"].to_string();
    assert!(detail.contains("2 active token(s)"), "{detail}");

    // Cancelled 8 times: given up, and no token issued.
    conflicts.store(8, SeqCst);
    let before = transactions();
    let res = app
        .post(&s.owner, &tokens, json!({"plan_id": s.plan_id}))
        .await;
    assert_eq!(res.status(), 503);
    assert_eq!(transactions() - before, 8);
    let listed = app.get_json(&s.owner, &tokens).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);

    // Revocations go through on a later attempt too, each taken off the count once.
    for id in [&token_id, &s.token_id] {
        conflicts.store(2, SeqCst);
        let res = app.delete(&s.owner, &format!("{tokens}/{id}")).await;
        assert_eq!(res.status(), 204);
    }
    assert_eq!(conflicts.load(SeqCst), 0);
    assert_eq!(app.delete(&s.owner, &plan).await.status(), 204);
}

/// DynamoDB's answer to a batch it processed none of (as when it throttles): every
/// key asked for comes back unprocessed, or every write request.
fn nothing_processed(op: &str, request: &Value) -> axum::response::Response {
    let body = match op {
        "BatchGetItem" => json!({"Responses": {}, "UnprocessedKeys": request["RequestItems"]}),
        _ => json!({"UnprocessedItems": request["RequestItems"]}),
    };
    dynamodb_answer(http::StatusCode::OK, body)
}

/// What a batch asks of DynamoDB: `BatchGetItem`, or the kind of the first write
/// request of a `BatchWriteItem` (`PutRequest`: audit records; `DeleteRequest`: a
/// site's quota events).
fn batch_kind(op: &str, request: &Value) -> Option<String> {
    match op {
        "BatchGetItem" => Some(op.into()),
        "BatchWriteItem" => {
            let items = request["RequestItems"].as_object()?.values().next()?;
            items[0].as_object()?.keys().next().cloned()
        }
        _ => None,
    }
}

/// What DynamoDB leaves unprocessed in a batch (usage reads, audit writes, the
/// deletion of a site's quota events) is sent again, and the whole batch lands;
/// usage reads or deletes left unprocessed 5 times in a row are a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_left_unprocessed_are_sent_again() {
    let Some(endpoint) = dynamodb_endpoint() else {
        return;
    };
    // How many of the next batches of each kind DynamoDB processes none of.
    let throttled: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let to_throttle = throttled.clone();
    let intercept: Intercept = Arc::new(move |op, request| {
        let kind = batch_kind(op, request)?;
        let mut left = to_throttle.lock().unwrap();
        let n = left.get_mut(&kind).filter(|n| **n > 0)?;
        *n -= 1;
        Some(nothing_processed(op, request))
    });
    let (app, seen, table) = app_behind_forwarder(endpoint.clone(), "unprocessed", intercept).await;
    let s = app.setup(600, 5).await;
    let throttle = |kind: &str, n: usize| throttled.lock().unwrap().insert(kind.into(), n);
    let calls = |what: &str| count(&seen.lock().unwrap(), what);

    // Audit records: the first two batches come back whole; each record lands once.
    throttle("PutRequest", 2);
    for i in 0..4 {
        let res = app
            .proxy_get(&s.site_id, &format!("/r/{i}"), &s.token)
            .await;
        assert_eq!(res.status(), 200);
    }
    let logs = app.logs(&s.owner, &s.site_id, "limit=100").await;
    let paths: Vec<&str> = (logs["items"].as_array().unwrap().iter())
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/r/3", "/r/2", "/r/1", "/r/0"]);
    assert_eq!(throttled.lock().unwrap()["PutRequest"], 0);

    // Usage reads: asked for again; 5 times unprocessed is a 503.
    let tokens = format!("/api/sites/{}/tokens", s.site_id);
    throttle("BatchGetItem", 3);
    let before = calls("BatchGetItem -");
    let listed = app.get_json(&s.owner, &tokens).await;
    assert_eq!(listed["items"][0]["usage"]["used"], 4);
    assert_eq!(calls("BatchGetItem -") - before, 4);
    throttle("BatchGetItem", 5);
    assert_eq!(app.get(&s.owner, &tokens).await.status(), 503);
    throttle("BatchGetItem", 0);

    // The 80 % event, deleted with the site. Left unprocessed 5 times in a row, the
    // deletion is a 503 that leaves the site (and its event) for a retry; sent again
    // after fewer, it goes through.
    let (site, events) = (
        format!("/api/sites/{}", s.site_id),
        format!("/api/sites/{}/events", s.site_id),
    );
    let listed = app.get_json(&s.owner, &events).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    throttle("DeleteRequest", 5);
    assert_eq!(app.delete(&s.owner, &site).await.status(), 503);
    assert_eq!(app.get(&s.owner, &site).await.status(), 200);
    let listed = app.get_json(&s.owner, &events).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    throttle("DeleteRequest", 2);
    assert_eq!(app.delete(&s.owner, &site).await.status(), 204);
    assert_eq!(throttled.lock().unwrap()["DeleteRequest"], 0);
    let store = DynamoStore::connect(&table, Some(&endpoint)).await;
    let left = store.list_events(&s.site_id, 100, None).await.unwrap();
    assert!(left.items.is_empty(), "{:?}", left.items);
}

/// An audit record whose write fails, past the SDK's own 3 attempts, is written
/// again, and lands once: a decision's record is never lost to an error of
/// DynamoDB's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_writes_that_fail_are_sent_again() {
    let Some(endpoint) = dynamodb_endpoint() else {
        return;
    };
    let audit =
        |op: &str, request: &Value| batch_kind(op, request).as_deref() == Some("PutRequest");
    // How many of the next audit writes DynamoDB fails (500).
    let (intercept, failing) = countdown(audit, |_| {
        let error = json!({"__type": "com.amazonaws.dynamodb.v20120810#InternalServerError",
                           "message": "Internal server error"});
        dynamodb_answer(http::StatusCode::INTERNAL_SERVER_ERROR, error)
    });
    let (app, seen, _) = app_behind_forwarder(endpoint, "auditfail", intercept).await;
    let s = app.setup(600, 1000).await;
    // The SDK's 3 attempts of the first write, then 2 of the second.
    failing.store(5, SeqCst);
    assert_eq!(
        app.proxy_get(&s.site_id, "/once", &s.token).await.status(),
        200
    );
    let logs = app.logs(&s.owner, &s.site_id, "limit=100").await;
    let paths: Vec<&str> = (logs["items"].as_array().unwrap().iter())
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/once"]);
    assert_eq!(failing.load(SeqCst), 0);
    assert_eq!(count(&seen.lock().unwrap(), "BatchWriteItem -"), 6);
}

/// Two gateway processes on one table, as Lambda runs them: a token moved to another
/// plan through one is on that plan in the other once its cache entry expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_moved_in_one_process_is_on_its_new_plan_in_another_within_the_cache_ttl() {
    let Some(endpoint) = dynamodb_endpoint() else {
        return;
    };
    let (dir, table) = (tempfile::tempdir().unwrap(), unique_table("moves"));
    let config = payfence_core::config::Config {
        cache_ttl: Duration::from_secs(1),
        ..test_config()
    };
    let open = |config| Local::open_dynamodb(dir.path(), config, &table, Some(&endpoint));
    let (a, b) = (
        open(config.clone()).await.unwrap(),
        open(config).await.unwrap(),
    );
    let b = spawn_local(b, tempfile::tempdir().unwrap()).await;
    let a = spawn_local(a, dir).await;
    let s = a.setup(600, 2).await;
    for _ in 0..2 {
        assert_eq!(b.proxy_get(&s.site_id, "/", &s.token).await.status(), 200);
    }
    assert_eq!(b.proxy_get(&s.site_id, "/", &s.token).await.status(), 429);
    let business = a
        .create_named_plan(&s.owner, &s.site_id, "business", 600, 10)
        .await;
    let token = format!("/api/sites/{}/tokens/{}", s.site_id, s.token_id);
    let res = a
        .patch(&s.owner, &token, json!({"plan_id": business}))
        .await;
    assert_eq!(res.status(), 200);
    // The process that made the change knows it at once.
    assert_eq!(a.proxy_get(&s.site_id, "/", &s.token).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(b.proxy_get(&s.site_id, "/", &s.token).await.status(), 200);
    assert_eq!(s.origin.last().headers["x-payfence-plan"], "business");
}

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port below the kernel's ephemeral range (32768 and up), so that
/// no outgoing connection of the tests running beside this one can take it as its
/// local port while the server is down.
fn port_outside_ephemeral_range() -> u16 {
    let start = 20_000 + (std::process::id() % 10_000) as u16;
    (start..32_000)
        .chain(20_000..start)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port in 20000..32000")
}

/// Start moto's server on `port` and wait until it accepts connections; if it exits
/// or does not come up, fail with its output.
fn start_moto(port: u16) -> Moto {
    // The manifest dir cargo passes at run time: a test binary reused from a build in
    // another checkout (one shared target dir) still finds this checkout's script.
    let manifest_dir =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    let script = format!("{manifest_dir}/../scripts/moto_server.py");
    let log_path = std::env::temp_dir().join(format!("payfence-test-moto-{port}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut moto = Moto(
        Command::new("python3")
            .args([script.as_str(), "127.0.0.1", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("python3 with moto (scripts/test.sh installs it)"),
    );
    let output = || std::fs::read_to_string(&log_path).unwrap_or_default();
    for _ in 0..600 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return moto;
        }
        if let Ok(Some(status)) = moto.0.try_wait() {
            panic!("moto exited ({status}) on {port}:\n{}", output());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("moto did not start on {port} in 60 s:\n{}", output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fails_closed_while_dynamodb_is_down_and_recovers_without_restart() {
    if dynamodb_endpoint().is_none() {
        return;
    }
    let port = port_outside_ephemeral_range();
    let moto = start_moto(port);
    let endpoint = format!("http://127.0.0.1:{port}");
    let table = unique_table("faults");
    let dir = tempfile::tempdir().unwrap();
    let local = Local::open_dynamodb(dir.path(), test_config(), &table, Some(&endpoint))
        .await
        .unwrap();
    let app = spawn_local(local, dir).await;
    let s = app.setup(600, 1000).await;
    let key = app.create_key(&s.owner, &s.site_id).await;
    let authorize = |key: &str, token: &str| {
        app.http
            .post(app.url("/v1/authorize"))
            .bearer_auth(key)
            .json(&json!({"token": token, "method": "GET", "path": "/"}))
            .send()
    };
    assert_eq!(app.proxy_get(&s.site_id, "/", &s.token).await.status(), 200);
    assert_eq!(authorize(&key, &s.token).await.unwrap().status(), 200);
    let seen_before = s.origin.count();

    drop(moto); // the server stops
    let res = app.proxy_get(&s.site_id, "/", &s.token).await;
    assert_eq!(res.status(), 503);
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        s.origin.count(),
        seen_before,
        "nothing is forwarded without a decision"
    );
    let res = authorize(&key, &s.token).await.unwrap();
    assert_eq!(res.status(), 503, "authorize fails closed");
    let res = app.http.get(app.url("/api/health")).send().await.unwrap();
    assert_eq!(res.status(), 503);
    let h: Value = res.json().await.unwrap();
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["checks"]["store"]["status"], "error");

    // The server comes back (empty: moto keeps its data in memory). The same
    // PayFence process, not restarted, serves again once the table exists.
    let _moto = start_moto(port);
    DynamoStore::connect(&table, Some(&endpoint))
        .await
        .ensure_table()
        .await
        .unwrap();
    let res = app.http.get(app.url("/api/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let again = app.setup(600, 1000).await;
    assert_eq!(
        app.proxy_get(&again.site_id, "/", &again.token)
            .await
            .status(),
        200
    );
    assert_eq!(again.origin.count(), 1);
}
