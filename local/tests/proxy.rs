//! Proxy mode through HTTP, against a real origin that verifies signatures.

mod common;

use common::*;
use futures_util::StreamExt;
use payfence_core::auth::Role;
use payfence_core::config::Config;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test]
async fn allowed_request_reaches_origin_signed_and_intact() {
    let app = spawn_app().await;
    let s = app.setup(600, 100_000).await;
    let body = "x".repeat(100_000) + "end";
    let res = app
        .http
        .post(app.url(&format!(
            "/p/{}/v1/flights/search?from=OSL&to=SFO&x=a%20b",
            s.site_id
        )))
        .bearer_auth(&s.token)
        .header("x-custom", "kept")
        .header("x-payfence-signature", "sha256=forged")
        .header("x-payfence-token-id", "tok_forged")
        .header("x-forwarded-for", "203.0.113.9")
        .header("forwarded", "for=203.0.113.9;proto=https")
        .header("x-real-ip", "203.0.113.9")
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-proto", "https")
        .header("x-respond-with", "hello back")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_rate_headers(&res);
    assert_eq!(header(&res, "x-ratelimit-limit"), Some("600"));
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("599"));
    assert_eq!(header(&res, "x-origin"), Some("yes"));
    assert!(header(&res, "x-payfence-request-id").is_some());
    assert_eq!(res.text().await.unwrap(), "hello back");

    let seen = s.origin.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(
        seen.path_and_query,
        "/v1/flights/search?from=OSL&to=SFO&x=a%20b"
    );
    assert_eq!(seen.body_len, body.len());
    assert_eq!(
        seen.body_sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes()))
    );
    let h = |n: &str| seen.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        h("authorization"),
        None,
        "the token must not reach the origin"
    );
    assert_eq!(h("x-custom").as_deref(), Some("kept"));
    assert_eq!(h("x-payfence-token-id"), Some(s.token_id.clone()));
    assert_eq!(h("x-payfence-plan").as_deref(), Some("pro"));
    assert!(h("x-payfence-request-id").is_some());
    assert_eq!(
        h("x-forwarded-for").as_deref(),
        Some("127.0.0.1"),
        "the address PayFence saw, not the one the client claimed"
    );
    for claimed in [
        "forwarded",
        "x-real-ip",
        "x-forwarded-host",
        "x-forwarded-proto",
    ] {
        assert_eq!(h(claimed), None, "{claimed}: a client's claim stays behind");
    }
    let ts: u64 = h("x-payfence-timestamp").unwrap().parse().unwrap();
    assert_eq!(
        h("x-payfence-signature").unwrap(),
        payfence_signing::sign(&[&s.secret], "POST", &seen.path_and_query, ts)
    );
}

#[tokio::test]
async fn token_header_lets_consumer_authorization_through() {
    let app = spawn_app().await;
    let s = app.setup(600, 100_000).await;
    let res = app
        .http
        .get(app.url(&format!("/p/{}/me", s.site_id)))
        .header("x-payfence-token", &s.token)
        .header("authorization", "Basic dXNlcjpwdw==")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = s.origin.last();
    assert_eq!(
        seen.headers.get("authorization").unwrap(),
        "Basic dXNlcjpwdw=="
    );
    assert!(seen.headers.get("x-payfence-token").is_none());
    // An Authorization that repeats the token is the token: it stays behind.
    let res = app
        .http
        .get(app.url(&format!("/p/{}/me", s.site_id)))
        .header("x-payfence-token", &s.token)
        .header("authorization", format!("bearer  {}", s.token))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(s.origin.last().headers.get("authorization").is_none());
    // However many times it is repeated, beside the consumer's own.
    let res = app
        .http
        .get(app.url(&format!("/p/{}/me", s.site_id)))
        .header("x-payfence-token", &s.token)
        .header("authorization", "Basic dXNlcjpwdw==")
        .header("authorization", format!("Bearer {}", s.token))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(s.origin.last().headers.get("authorization").is_none());
    // The site root is reachable too.
    let res = app.proxy_get(&s.site_id, "", &s.token).await;
    assert_eq!(res.status(), 200);
    assert_eq!(s.origin.last().path_and_query, "/");
}

#[tokio::test]
async fn the_origins_hop_by_hop_headers_stay_behind() {
    let app = spawn_app().await;
    let s = app.setup(600, 100_000).await;
    let res = app
        .http
        .get(app.url(&format!("/p/{}/h", s.site_id)))
        .bearer_auth(&s.token)
        .header("x-respond-header", "keep-alive: timeout=99")
        .header("x-respond-header", "proxy-authenticate: Basic")
        .header("x-respond-header", "trailer: x-checksum")
        .header("x-respond-header", "connection: x-hop")
        .header("x-respond-header", "x-hop: for the proxy only")
        .header("x-respond-header", "x-kept: for the client")
        .header("x-respond-header", "x-kept: twice")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let all = |n: &str| -> Vec<&str> {
        res.headers()
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(all("x-kept"), ["for the client", "twice"]);
    assert_eq!(all("x-origin"), ["yes"]);
    for hop in ["keep-alive", "proxy-authenticate", "trailer", "x-hop"] {
        assert!(all(hop).is_empty(), "{hop}: {:?}", res.headers());
    }
    assert!(
        all("connection").iter().all(|c| !c.contains("x-hop")),
        "{:?}",
        res.headers()
    );
    assert_eq!(res.text().await.unwrap(), "ok");
}

async fn problem(res: reqwest::Response) -> Value {
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    res.json().await.unwrap()
}

#[tokio::test]
async fn denials_have_the_right_status_reason_and_headers() {
    let app = spawn_app().await;
    let s = app.setup(10, 100_000).await;

    // Missing and unknown tokens: 401, never reach the origin.
    let res = app
        .http
        .get(app.url(&format!("/p/{}/x", s.site_id)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(header(&res, "www-authenticate"), Some("Bearer"));
    assert_eq!(problem(res).await["reason"], "missing_token");
    // A CORS preflight is a request like any other: it carries no token.
    let res = app
        .http
        .request(
            reqwest::Method::OPTIONS,
            app.url(&format!("/p/{}/x", s.site_id)),
        )
        .header("origin", "https://page.example")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(header(&res, "access-control-allow-origin").is_none());
    assert_eq!(problem(res).await["reason"], "missing_token");
    for garbage in [
        "nonsense",
        "pf_live_short",
        &format!("pf_live_{}", "A".repeat(43)),
    ] {
        let res = app
            .http
            .get(app.url(&format!("/p/{}/x", s.site_id)))
            .header("x-payfence-token", garbage)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{garbage}");
        assert_eq!(
            header(&res, "www-authenticate"),
            Some(r#"Bearer error="invalid_token""#)
        );
        let p = problem(res).await;
        assert_eq!(p["reason"], "invalid_token", "{garbage}");
        assert!(
            !p.to_string().contains(garbage),
            "a problem never echoes the token"
        );
    }
    // A credential that is not ASCII was presented, so it is invalid, not missing.
    for (name, value) in [
        ("x-payfence-token", &b"pf_live_\xe9t\xe9"[..]),
        ("authorization", &b"Bearer pf_live_\xe9t\xe9"[..]),
    ] {
        let res = app
            .http
            .get(app.url(&format!("/p/{}/x", s.site_id)))
            .header(
                name,
                reqwest::header::HeaderValue::from_bytes(value).unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{name}");
        assert_eq!(problem(res).await["reason"], "invalid_token", "{name}");
    }

    // A token sent twice is refused, even as two copies of a valid one: a request is
    // never judged on whichever copy came first.
    let other = app.setup(10, 100_000).await;
    for (name, first, second) in [
        (
            "authorization",
            format!("Bearer {}", s.token),
            format!("Bearer {}", s.token),
        ),
        (
            "authorization",
            format!("Bearer {}", s.token),
            format!("Bearer {}", other.token),
        ),
        ("x-payfence-token", s.token.clone(), s.token.clone()),
        ("x-payfence-token", s.token.clone(), other.token.clone()),
    ] {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.append(name, first.parse().unwrap());
        headers.append(name, second.parse().unwrap());
        let res = app
            .http
            .get(app.url(&format!("/p/{}/x", s.site_id)))
            .headers(headers)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{name}");
        let p = problem(res).await;
        assert_eq!(p["reason"], "invalid_token", "{name}");
        assert!(!p.to_string().contains(&s.token), "never echoed");
    }

    // Unknown site: 404.
    let res = app.proxy_get("site_0000000000000000", "/x", &s.token).await;
    assert_eq!(res.status(), 404);
    let res = app.proxy_get("not-a-site", "/x", &s.token).await;
    assert_eq!(res.status(), 404);

    // A token of another site: 403.
    let other = app.setup(10, 100).await;
    let res = app.proxy_get(&s.site_id, "/x", &other.token).await;
    assert_eq!(res.status(), 403);

    // Rate limited: 429 with Retry-After and the rate-limit headers.
    avoid_minute_boundary().await;
    for _ in 0..10 {
        assert_eq!(
            app.proxy_get(&s.site_id, "/x", &s.token).await.status(),
            200
        );
    }
    let res = app.proxy_get(&s.site_id, "/x", &s.token).await;
    assert_eq!(res.status(), 429);
    assert_rate_headers(&res);
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("0"));
    let retry: u64 = header(&res, "retry-after").unwrap().parse().unwrap();
    assert!((1..=121).contains(&retry));
    assert_eq!(problem(res).await["reason"], "rate_limited");
    assert_eq!(
        s.origin.count(),
        10,
        "denied requests never reach the origin"
    );

    // Revoked: 403 on the very next request.
    let res = app
        .delete(
            &other.owner,
            &format!("/api/sites/{}/tokens/{}", other.site_id, other.token_id),
        )
        .await;
    assert_eq!(res.status(), 204);
    let res = app.proxy_get(&other.site_id, "/x", &other.token).await;
    assert_eq!(res.status(), 403);
    assert_eq!(problem(res).await["reason"], "token_revoked");
}

#[tokio::test]
async fn quota_exhaustion_is_429_until_next_month() {
    let app = spawn_app().await;
    let s = app.setup(10_000, 3).await;
    for _ in 0..3 {
        assert_eq!(app.proxy_get(&s.site_id, "/", &s.token).await.status(), 200);
    }
    let res = app.proxy_get(&s.site_id, "/", &s.token).await;
    assert_eq!(res.status(), 429);
    let retry: u64 = header(&res, "retry-after").unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 31 * 86_400);
    assert!(header(&res, "ratelimit").unwrap().contains("\"month\";r=0"));
    assert_eq!(problem(res).await["reason"], "quota_exceeded");
}

#[tokio::test]
async fn failed_attempts_per_client_are_limited() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let owner = app.jwt("alice", Role::SiteOwner);
    let res = app
        .patch(
            &owner,
            &format!("/api/sites/{}", s.site_id),
            json!({"failed_attempts_per_minute": 3}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let bad = format!("pf_live_{}", "B".repeat(43));
    for _ in 0..3 {
        assert_eq!(app.proxy_get(&s.site_id, "/", &bad).await.status(), 401);
    }
    let res = app.proxy_get(&s.site_id, "/", &bad).await;
    assert_eq!(res.status(), 429);
    assert!(header(&res, "retry-after").is_some());
    assert_eq!(problem(res).await["reason"], "site_rate_limited");
}

#[tokio::test]
async fn origin_unreachable_is_502_and_slow_is_504() {
    let config = Config {
        origin_timeout: Duration::from_millis(500),
        ..test_config()
    };
    let app = spawn_app_with(config).await;
    let s = app.setup(600, 1000).await;
    let res = app.proxy_get(&s.site_id, "/slow", &s.token).await;
    assert_eq!(res.status(), 504);
    assert_rate_headers(&res);

    // An origin that is not listening.
    let owner = app.jwt("alice", Role::SiteOwner);
    let (l, addr) = bind_origin().await;
    drop(l);
    let (site_id, token) = app.site_with_token(&owner, &format!("http://{addr}")).await;
    let res = app.proxy_get(&site_id, "/", &token).await;
    assert_eq!(res.status(), 502);
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
}

#[tokio::test]
async fn private_origins_are_refused_at_connect_time_without_the_local_flag() {
    // allow_http_origins off: even a site stored with a loopback origin is not reached.
    let app = spawn_app_with(Config::default()).await;
    let owner = app.jwt("alice", Role::SiteOwner);
    let res = app
        .post(
            &owner,
            "/api/sites",
            json!({"name": "x", "origin_url": "https://127.0.0.1:9"}),
        )
        .await;
    assert_eq!(res.status(), 422);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["field"], "origin_url");
}

/// PUT `body` to `/upload` through the proxy.
async fn upload(app: &App, site_id: &str, token: &str, body: reqwest::Body) -> reqwest::Response {
    app.http
        .put(app.url(&format!("/p/{site_id}/upload")))
        .bearer_auth(token)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// `pieces` pieces of 1,000 bytes, `pause` apart.
fn paced_body(pieces: usize, pause: Duration) -> reqwest::Body {
    reqwest::Body::wrap_stream(
        futures_util::stream::iter(0..pieces).then(move |i| async move {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 1000]))
        }),
    )
}

/// `Expect: 100-continue` (curl sends it with bodies over 1 MB): a denied request is
/// answered at once, before its body is sent; an allowed one is told `100 Continue`,
/// and then its whole body reaches the origin.
#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let body = vec![b'x'; 100_000];
    let send_head = |token: String| {
        let head = format!(
            "PUT /p/{}/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            s.site_id,
            body.len()
        );
        let addr = app.base.trim_start_matches("http://").to_owned();
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            stream
        }
    };
    // One answer's head, read byte by byte so that nothing after it is taken.
    async fn answer_head(stream: &mut tokio::net::TcpStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte));
            assert_eq!(read.await.expect("an answer without the body").unwrap(), 1);
            head.push(byte[0]);
        }
        String::from_utf8(head).unwrap()
    }

    let mut denied = send_head(format!("pf_live_{}", "A".repeat(43))).await;
    let head = answer_head(&mut denied).await;
    assert!(head.starts_with("HTTP/1.1 401 "), "{head}");
    assert_eq!(s.origin.count(), 0);

    let mut allowed = send_head(s.token.clone()).await;
    assert_eq!(
        answer_head(&mut allowed).await,
        "HTTP/1.1 100 Continue\r\n\r\n"
    );
    allowed.write_all(&body).await.unwrap();
    let head = answer_head(&mut allowed).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(head.contains("x-ratelimit-remaining: 599\r\n"), "{head}");
    assert_eq!(s.origin.count(), 1);
    assert_eq!(s.origin.last().body_len, body.len());
}

#[tokio::test]
async fn streams_a_large_upload() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    // 64 MiB in 64 KiB chunks, generated on the fly.
    let chunk = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    let stream =
        futures_util::stream::iter((0..1024).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let res = upload(
        &app,
        &s.site_id,
        &s.token,
        reqwest::Body::wrap_stream(stream),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(s.origin.last().body_len, 64 * 1024 * 1024);
}

#[tokio::test]
async fn a_broken_request_body_is_the_clients_400_not_a_502() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    // A chunk size that is not hex: the body fails part-way through forwarding.
    let req = format!(
        "POST /p/{}/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        s.site_id, s.token
    );
    let res = raw_request(&app.base, req.as_bytes()).await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    assert!(res.contains("application/problem+json"), "{res}");
    assert!(res.contains("x-ratelimit-remaining"), "{res}");
}

#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_501_and_not_forwarded() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    for coding in ["gzip, chunked", "x-custom, chunked"] {
        let req = format!(
            "POST /p/{}/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Transfer-Encoding: {coding}\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            s.site_id, s.token
        );
        let res = raw_request(&app.base, req.as_bytes()).await;
        assert!(res.starts_with("HTTP/1.1 501"), "{coding}: {res}");
        assert!(res.contains("application/problem+json"), "{res}");
    }
    assert_eq!(s.origin.count(), 0);
    // Plain chunked passes.
    let req = format!(
        "POST /p/{}/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        s.site_id, s.token
    );
    let res = raw_request(&app.base, req.as_bytes()).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert_eq!(s.origin.last().body_len, 3);
}

#[tokio::test]
async fn silent_stalled_and_idle_connections_are_closed_but_slow_bodies_are_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = Config {
        client_header_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let app = spawn_app_with(config).await;
    let s = app.setup(600, 1000).await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    let closed_within = |mut conn: tokio::net::TcpStream| async move {
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf))
            .await
            .is_ok()
    };

    // A connection that sends nothing, or only the first byte of a request (also of
    // HTTP/2's preface, "PRI …"): closed.
    let conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(closed_within(conn).await, "a silent connection stayed open");
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"P").await.unwrap();
    assert!(closed_within(conn).await, "a one-byte request stayed open");

    // Headers that never end: the connection is closed.
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(closed_within(conn).await, "a stalled request stayed open");

    // A keep-alive connection left idle after its answer: closed too.
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    conn.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(closed_within(conn).await, "an idle connection stayed open");

    // The limit is on headers only: a body with pauses longer than it streams through.
    let body = paced_body(3, Duration::from_millis(500));
    let res = upload(&app, &s.site_id, &s.token, body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(s.origin.last().body_len, 3000);
}

#[tokio::test]
async fn dot_segments_are_refused() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    for p in [
        "/a/%2e%2e/b",
        "/%2E%2E/etc/passwd",
        "/../x",
        "/a/./b",
        "/v1/..%2F..%2Fadmin",
        "/v1/..\\..\\admin",
    ] {
        let req = format!(
            "GET /p/{}{p} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            s.site_id, s.token
        );
        let res = raw_request(&app.base, req.as_bytes()).await;
        assert!(res.starts_with("HTTP/1.1 400"), "{p}: {res}");
    }
    assert_eq!(s.origin.count(), 0);
}

#[tokio::test]
async fn one_audit_record_per_decision() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    assert_eq!(
        app.proxy_get(&s.site_id, "/v1/flights?api_key=hide", &s.token)
            .await
            .status(),
        200
    );
    assert_eq!(
        app.proxy_get(&s.site_id, "/v1/hotels", "garbage")
            .await
            .status(),
        401
    );
    assert_eq!(
        app.http
            .get(app.url(&format!("/p/{}/v1/cars", s.site_id)))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let logs = app.logs(&s.owner, &s.site_id, "").await;
    let items = logs["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["path"], "/v1/cars");
    assert_eq!(items[0]["reason"], "missing_token");
    assert_eq!(items[1]["reason"], "invalid_token");
    assert_eq!(items[2]["decision"], "allow");
    assert_eq!(items[2]["token_id"], s.token_id.as_str());
    assert_eq!(items[2]["plan"], "pro");
    assert_eq!(items[2]["mode"], "proxy");
    assert_eq!(items[2]["remaining"], 999);
    for field in ["id", "timestamp", "site_id", "method", "latency_ms"] {
        assert!(!items[2][field].is_null(), "{field}");
    }
    for item in items {
        assert!(is_ms_to_the_microsecond(&item["latency_ms"]), "{item}");
    }
    assert!(!logs.to_string().contains(&s.token));
}

#[tokio::test]
async fn over_long_targets_and_other_methods_are_refused_and_never_recorded() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    // `/p/{site_id}` and the rest: 8,192 bytes in all is the longest taken.
    let prefix = format!("/p/{}", s.site_id);
    let rest = |len: usize| format!("/v1/x?q={}", "a".repeat(len - prefix.len() - 8));
    let res = app.proxy_get(&s.site_id, &rest(8192), &s.token).await;
    assert_eq!(res.status(), 200);
    assert_eq!(s.origin.last().path_and_query, rest(8192));
    for token in [s.token.as_str(), "garbage"] {
        let res = app.proxy_get(&s.site_id, &rest(8193), token).await;
        assert_eq!(res.status(), 414);
        assert_eq!(
            header(&res, "content-type"),
            Some("application/problem+json")
        );
        assert!(header(&res, "x-payfence-request-id").is_some());
    }
    // The methods CloudFront passes are proxied; any other (`TRACE`, which would echo
    // the signed request, or one of 32 bytes) is 405 with `Allow`, and one over 32
    // bytes is 501 (RFC 9112 §3). None of those reaches the origin or is recorded.
    let send = |method: reqwest::Method, token: &str| {
        app.http
            .request(method, app.url(&format!("/p/{}/v1/x", s.site_id)))
            .header("x-payfence-token", token)
            .send()
    };
    let proxied = ["GET", "HEAD", "OPTIONS", "PUT", "PATCH", "POST", "DELETE"];
    for m in proxied {
        let res = send(m.parse().unwrap(), &s.token).await.unwrap();
        assert_eq!(res.status(), 200, "{m}");
        assert_eq!(s.origin.last().method, m);
    }
    let method = |len: usize| reqwest::Method::from_bytes("X".repeat(len).as_bytes()).unwrap();
    for token in [s.token.as_str(), "garbage"] {
        for m in [reqwest::Method::TRACE, method(32)] {
            let res = send(m.clone(), token).await.unwrap();
            assert_eq!(res.status(), 405, "{m}");
            assert_eq!(
                header(&res, "content-type"),
                Some("application/problem+json")
            );
            let allow = header(&res, "allow").unwrap();
            for p in proxied {
                assert!(allow.contains(p), "{allow}");
            }
            assert!(!allow.contains("TRACE"), "{allow}");
        }
        let res = send(method(33), token).await.unwrap();
        assert_eq!(res.status(), 501);
        assert_eq!(
            header(&res, "content-type"),
            Some("application/problem+json")
        );
    }
    assert_eq!(s.origin.count(), 8);
    let logs = app.logs(&s.owner, &s.site_id, "").await;
    assert_eq!(logs["items"].as_array().unwrap().len(), 8, "{logs}");
    // Every route: nothing past the limit is served.
    let res = app
        .http
        .get(app.url(&format!("/api/health?{}", "a".repeat(8192))))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 414);
}

#[tokio::test]
async fn secret_query_values_and_tokens_reach_the_origin_but_never_the_audit_log() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let res = app
        .patch(
            &s.owner,
            &format!("/api/sites/{}", s.site_id),
            json!({"secret_query_params": ["api_key"]}),
        )
        .await;
    assert_eq!(res.status(), 200);

    // However the client spells the name, its origin reads it as `api_key`.
    let targets = [
        "/v1/a?api_key=hide-1&x=1",
        "/v1/b?x=2&api%5Fkey=hide-2",
        "/v1/c?API_KEY=hide-3",
        "/v1/d?api_key",
    ];
    for target in targets {
        let res = app.proxy_get(&s.site_id, target, &s.token).await;
        assert_eq!(res.status(), 200, "{target}");
        assert_eq!(s.origin.last().path_and_query, target, "forwarded as sent");
    }
    // A consumer token a client put in the path or query is never logged either.
    let target = format!("/v1/t/{}?access_token={}", s.token, s.token);
    let res = app.proxy_get(&s.site_id, &target, &s.token).await;
    assert_eq!(res.status(), 200);
    assert_eq!(s.origin.last().path_and_query, target);
    let key = app.create_key(&s.owner, &s.site_id).await;
    let res = app
        .authorize(
            &key,
            json!({"token": s.token, "method": "GET", "path": "/v1/e?Api%5fKey=hide-4"}),
        )
        .await;
    assert_eq!(res.status(), 200);

    let logs = app.logs(&s.owner, &s.site_id, "").await;
    let paths: Vec<&str> = logs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/v1/e?Api%5fKey=***",
            "/v1/t/pf_live_***?access_token=pf_live_***",
            "/v1/d?api_key=***",
            "/v1/c?API_KEY=***",
            "/v1/b?x=2&api%5Fkey=***",
            "/v1/a?api_key=***&x=1",
        ],
        "newest first, also within a millisecond"
    );
    let export = app
        .get(
            &s.owner,
            &format!("/api/sites/{}/logs/export?format=csv", s.site_id),
        )
        .await;
    assert_eq!(export.status(), 200);
    let export = export.text().await.unwrap();
    assert_eq!(export.matches("=***").count(), 5, "{export}");
    assert!(!export.contains("hide-"), "{export}");
    assert!(!export.contains(&s.token), "{export}");
}

#[tokio::test]
async fn an_http_1_0_origin_keeps_the_clients_connection_alive() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let app = spawn_app().await;
    let owner = app.jwt("alice", Role::SiteOwner);
    // An origin speaking HTTP/1.0 (as `python3 -m http.server` does): one answer per
    // connection, then close.
    let (listener, addr) = bind_origin().await;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                let mut line = String::new();
                while stream.read_line(&mut line).await.unwrap_or(0) > 2 {
                    line.clear();
                }
                let _ = stream
                    .get_mut()
                    .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                    .await;
            });
        }
    });
    let (site_id, token) = app.site_with_token(&owner, &format!("http://{addr}")).await;

    // Two requests on one client connection: both answered in HTTP/1.1.
    let conn = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let mut conn = BufReader::new(conn);
    for i in 0..2 {
        let req = format!(
            "GET /p/{site_id}/v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        conn.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = tokio::time::timeout(Duration::from_secs(5), conn.read_line(&mut line))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "request {i}: the connection was closed");
            if line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_ascii_lowercase());
        }
        assert_eq!(head[0], "http/1.1 200 ok", "request {i}: {head:?}");
        assert!(head.contains(&"content-length: 5".to_string()), "{head:?}");
        assert!(!head.iter().any(|h| h == "connection: close"), "{head:?}");
        let mut body = [0; 5];
        conn.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"hello");
    }
}

#[tokio::test]
async fn redirects_into_the_origin_point_back_through_the_proxy() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let origin = s.origin.url();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for (to, expected) in [
        (
            format!("{origin}/v1/next?page=2"),
            format!("/p/{}/v1/next?page=2", s.site_id),
        ),
        ("/v1/login".to_owned(), format!("/p/{}/v1/login", s.site_id)),
        (
            "https://elsewhere.example/x".to_owned(),
            "https://elsewhere.example/x".to_owned(),
        ),
    ] {
        let res = http
            .get(app.url(&format!("/p/{}/v1/start", s.site_id)))
            .bearer_auth(&s.token)
            .header("x-redirect-to", &to)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 302);
        assert_eq!(header(&res, "location"), Some(expected.as_str()), "{to}");
        assert_rate_headers(&res);
    }
}

#[tokio::test]
async fn streams_the_origins_answer_as_it_comes() {
    // The origin sends its first chunk, then holds the rest until the test has seen
    // that chunk arrive through the proxy: a gateway that buffered the answer would
    // never deliver it.
    let app = spawn_app().await;
    let owner = app.jwt("alice", Role::SiteOwner);
    let (listener, addr) = bind_origin().await;
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let released = std::sync::Arc::new(std::sync::Mutex::new(Some(released)));
    let origin = axum::Router::new().fallback(move || {
        let released = released.lock().unwrap().take().expect("one request");
        async move {
            let rest = async move {
                let _ = released.await;
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"second"))
            };
            let chunks = futures_util::stream::once(async {
                Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"first,"))
            })
            .chain(futures_util::stream::once(rest));
            axum::body::Body::from_stream(chunks)
        }
    });
    tokio::spawn(async move { axum::serve(listener, origin).await.unwrap() });
    let (site_id, token) = app.site_with_token(&owner, &format!("http://{addr}")).await;

    let first_chunk = async {
        let mut res = app.proxy_get(&site_id, "/events", &token).await;
        assert_eq!(res.status(), 200);
        let first = res.chunk().await.unwrap().unwrap();
        (res, first)
    };
    let (mut res, first) = tokio::time::timeout(Duration::from_secs(10), first_chunk)
        .await
        .expect("the first chunk arrives while the origin is still answering");
    assert_eq!(&first[..], b"first,");
    release.send(()).unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = res.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"second");
}

#[tokio::test]
async fn the_origins_timeout_waits_for_a_slow_upload_but_not_for_an_origin_that_stops_reading() {
    let config = Config {
        origin_timeout: Duration::from_millis(500),
        ..test_config()
    };
    let app = spawn_app_with(config).await;
    let s = app.setup(600, 1000).await;
    // The test origin answers once it has the whole body; the body takes 1.2 s, more
    // than the origin's 500 ms, but the origin's clock runs only while it owes us.
    let body = paced_body(5, Duration::from_millis(300));
    let res = upload(&app, &s.site_id, &s.token, body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(s.origin.last().body_len, 5000);

    // An origin that accepts the connection and never reads: once the sockets'
    // buffers are full it owes us, and is given 500 ms.
    let owner = app.jwt("alice", Role::SiteOwner);
    let (listener, addr) = bind_origin().await;
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            let (conn, _) = listener.accept().await.unwrap();
            conns.push(conn);
        }
    });
    let (site_id, token) = app.site_with_token(&owner, &format!("http://{addr}")).await;
    let chunk = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    let endless = futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
    let res = tokio::time::timeout(
        Duration::from_secs(20),
        upload(&app, &site_id, &token, reqwest::Body::wrap_stream(endless)),
    )
    .await
    .expect("an origin that stops reading is timed out");
    assert_eq!(res.status(), 504);
    assert_rate_headers(&res);
    held.abort();
}

#[tokio::test]
async fn a_client_that_stalls_its_upload_gets_408_and_its_origin_request_is_dropped() {
    let config = Config {
        client_body_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let app = spawn_app_with(config).await;
    let s = app.setup(600, 1000).await;
    let req = format!(
        "PUT /p/{}/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 1000\r\n\r\nonly ten b",
        s.site_id, s.token
    );
    let res = raw_request(&app.base, req.as_bytes()).await;
    assert!(res.starts_with("HTTP/1.1 408"), "{res}");
    assert!(res.contains("application/problem+json"), "{res}");
    assert!(res.contains("x-ratelimit-remaining"), "{res}");
    assert!(res.contains("connection: close"), "{res}");
    assert!(res.contains("request-timeout"), "{res}");
    // The origin never saw a whole request.
    assert_eq!(s.origin.count(), 0);
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_connection_and_the_origin_is_let_go() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = Config {
        client_body_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let app = spawn_app_with(config).await;
    let owner = app.jwt("alice", Role::SiteOwner);
    // An origin with an endless answer, which notes when the proxy lets it go.
    let (listener, addr) = bind_origin().await;
    let (dropped_tx, dropped) = tokio::sync::oneshot::channel::<()>();
    let dropped_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    struct OnDrop(Option<tokio::sync::oneshot::Sender<()>>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }
    let origin = axum::Router::new().fallback(move || {
        let guard = OnDrop(dropped_tx.lock().unwrap().take());
        async move {
            let chunk = bytes::Bytes::from(vec![b'z'; 64 * 1024]);
            let endless = futures_util::stream::repeat_with(move || {
                let _ = &guard;
                Ok::<_, std::io::Error>(chunk.clone())
            });
            axum::body::Body::from_stream(endless)
        }
    });
    tokio::spawn(async move { axum::serve(listener, origin).await.unwrap() });
    let (site_id, token) = app.site_with_token(&owner, &format!("http://{addr}")).await;

    let mut conn = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let req = format!(
        "GET /p/{site_id}/download HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    // Read nothing: once the sockets' buffers are full, the server can send no more.
    tokio::time::timeout(Duration::from_secs(20), dropped)
        .await
        .expect("the origin's answer is dropped once the client stops reading")
        .unwrap();
    // The connection is closed: what was buffered, then the end.
    let mut sink = vec![0u8; 1 << 20];
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the client's connection stayed open");
}
