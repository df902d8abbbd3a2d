//! Middleware mode: `POST /v1/authorize` with a site API key.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn decisions_have_the_documented_shape() {
    let app = spawn_app().await;
    let s = app.setup(10, 1000).await;
    let key = app.create_key(&s.owner, &s.site_id).await;
    avoid_minute_boundary().await;

    let res = app
        .authorize(
            &key,
            json!({"token": s.token, "method": "GET", "path": "/v1/flights"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_rate_headers(&res);
    let d: Value = res.json().await.unwrap();
    assert_eq!(d["decision"], "allow");
    assert_eq!(d["reason"], Value::Null);
    assert_eq!(d["token_id"], s.token_id.as_str());
    assert_eq!(d["plan"], "pro");
    assert_eq!(
        d["limit"],
        json!({"requests_per_minute": 10, "monthly_quota": 1000})
    );
    assert_eq!(d["remaining"], json!({"minute": 9, "quota": 999}));
    assert!(d["reset"]["minute"].as_u64().unwrap() > 1_700_000_000);
    assert!(d["reset"]["quota"].as_u64().unwrap() > d["reset"]["minute"].as_u64().unwrap());
    assert_eq!(d["retry_after"], Value::Null);

    // Denials are 200 with a reason.
    let d: Value = app
        .authorize(&key, json!({"method": "GET", "path": "/"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (d["decision"].as_str(), d["reason"].as_str()),
        (Some("deny"), Some("missing_token"))
    );
    let d: Value = app
        .authorize(
            &key,
            json!({"token": "pf_live_nope", "method": "GET", "path": "/"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d["reason"], "invalid_token");
    assert_eq!(d["token_id"], Value::Null);
    for _ in 0..9 {
        app.authorize(
            &key,
            json!({"token": s.token, "method": "GET", "path": "/"}),
        )
        .await;
    }
    let res = app
        .authorize(
            &key,
            json!({"token": s.token, "method": "GET", "path": "/"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert!(header(&res, "retry-after").is_some());
    let d: Value = res.json().await.unwrap();
    assert_eq!(d["reason"], "rate_limited");
    assert!(d["retry_after"].as_u64().unwrap() >= 1);

    // Audit records say middleware.
    let logs = app.logs(&s.owner, &s.site_id, "decision=allow").await;
    assert_eq!(logs["items"][0]["mode"], "middleware");
}

#[tokio::test]
async fn bad_keys_and_bodies_are_clear_4xx() {
    let app = spawn_app().await;
    let s = app.setup(10, 1000).await;
    let key = app.create_key(&s.owner, &s.site_id).await;
    for bad in ["", "sk_nope", &format!("sk_{}", "0".repeat(48))] {
        let res = app
            .authorize(bad, json!({"token": s.token, "method": "GET", "path": "/"}))
            .await;
        assert_eq!(res.status(), 401, "{bad}");
        assert_eq!(header(&res, "www-authenticate"), Some("Bearer"), "{bad}");
    }
    let res = app
        .http
        .post(app.url("/v1/authorize"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // A key sent twice is refused, even two copies of a valid one.
    let res = app
        .http
        .post(app.url("/v1/authorize"))
        .header("authorization", format!("Bearer {key}"))
        .header("authorization", format!("Bearer {key}"))
        .json(&json!({"token": s.token, "method": "GET", "path": "/"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    let raw = |body: &'static str| {
        app.http
            .post(app.url("/v1/authorize"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let res = raw("{not json").await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    // Other JSON values than an object (serde would take a struct from an array).
    for body in [r#"["x", "GET", "/"]"#, "5", r#""x""#, "null", " "] {
        let res = raw(body).await.unwrap();
        assert_eq!(res.status(), 400, "{body}");
        let p: Value = res.json().await.unwrap();
        assert_eq!(p["detail"], "the body must be a JSON object", "{body}");
    }
    let res = raw(r#"{"token": "x", "path": "/"}"#).await.unwrap();
    assert_eq!(res.status(), 422);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["field"], "method");
    let res = raw(r#"{"token": 5, "method": "GET", "path": "/"}"#)
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    assert_eq!(res.json::<Value>().await.unwrap()["field"], "token");
    let res = raw(r#"{"method": "get me", "path": "/"}"#).await.unwrap();
    assert_eq!(res.status(), 422);
    let res = raw(r#"{"method": "GET", "path": "no-slash"}"#)
        .await
        .unwrap();
    assert_eq!(res.json::<Value>().await.unwrap()["field"], "path");
    // A path (with its query) of 8 KiB is taken, a longer one named.
    let path =
        |len: usize| json!({"method": "GET", "path": format!("/?q={}", "a".repeat(len - 4))});
    let res = app.authorize(&key, path(8192)).await;
    assert_eq!(res.status(), 200);
    let res = app.authorize(&key, path(8193)).await;
    assert_eq!(res.status(), 422);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["field"], "path");
    assert!(p["detail"].as_str().unwrap().contains("8 KiB"), "{p}");
    // A body past the limit: 413, as problem+json.
    let big = format!(
        r#"{{"method": "GET", "path": "/", "pad": "{}"}}"#,
        "x".repeat(70_000)
    );
    let res = app
        .http
        .post(app.url("/v1/authorize"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        res.json::<Value>().await.unwrap()["type"],
        "https://payfence.io/problems/payload-too-large"
    );

    // A revoked key stops working.
    let keys: Value = app
        .get_json(&s.owner, &format!("/api/sites/{}/api-keys", s.site_id))
        .await;
    let key_id = keys["items"][0]["key_id"].as_str().unwrap();
    let res = app
        .delete(
            &s.owner,
            &format!("/api/sites/{}/api-keys/{key_id}", s.site_id),
        )
        .await;
    assert_eq!(res.status(), 204);
    let res = app
        .authorize(
            &key,
            json!({"token": s.token, "method": "GET", "path": "/"}),
        )
        .await;
    assert_eq!(res.status(), 401);
}

/// The origin passes the end client's address as `client_ip`; failed attempts count
/// per client: an IPv4 address, or an IPv6 /64, whose host may use any address in it.
#[tokio::test]
async fn failed_attempts_count_per_client_address_and_per_ipv6_64() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let key = app.create_key(&s.owner, &s.site_id).await;
    let res = app
        .patch(
            &s.owner,
            &format!("/api/sites/{}", s.site_id),
            json!({"failed_attempts_per_minute": 3}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let bad = format!("pf_live_{}", "B".repeat(43));
    let reason = |client_ip: &str, token: &str| {
        let body = json!({"token": token, "method": "GET", "path": "/", "client_ip": client_ip});
        let app = &app;
        let key = key.clone();
        async move {
            let res = app.authorize(&key, body).await;
            assert_eq!(res.status(), 200);
            res.json::<Value>().await.unwrap()["reason"].clone()
        }
    };
    // Three misses from three addresses of one /64 use up that client's budget...
    for host in ["::1", "::2", "::ffff:1"] {
        let ip = format!("2001:db8:7:7{host}");
        assert_eq!(reason(&ip, &bad).await, "invalid_token", "{ip}");
    }
    // ...so any address in it is cut off, even with a good token,
    for ip in ["2001:db8:7:7::1", "2001:db8:7:7:abcd::9"] {
        assert_eq!(reason(ip, &s.token).await, "site_rate_limited", "{ip}");
    }
    // while the next /64 and an IPv4 client are not.
    assert_eq!(reason("2001:db8:7:8::1", &s.token).await, Value::Null);
    assert_eq!(reason("203.0.113.9", &s.token).await, Value::Null);
    // An IPv4 address is one client however it is written.
    for ip in ["198.51.100.4", "::ffff:198.51.100.4", "198.51.100.4"] {
        assert_eq!(reason(ip, &bad).await, "invalid_token", "{ip}");
    }
    assert_eq!(
        reason("::ffff:198.51.100.4", &s.token).await,
        "site_rate_limited"
    );
    assert_eq!(reason("198.51.100.5", &s.token).await, Value::Null);
}

#[tokio::test]
async fn a_stalled_request_body_gets_408_on_authorize_and_the_dashboard() {
    let config = payfence_core::config::Config {
        client_body_timeout: std::time::Duration::from_millis(300),
        ..test_config()
    };
    let app = spawn_app_with(config).await;
    let s = app.setup(10, 1000).await;
    let key = app.create_key(&s.owner, &s.site_id).await;
    for (path, credential) in [("/v1/authorize", &key), ("/api/sites", &s.owner)] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {credential}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"token\":"
        );
        let res = raw_request(&app.base, req.as_bytes()).await;
        assert!(res.starts_with("HTTP/1.1 408"), "{path}: {res}");
        assert!(res.contains("application/problem+json"), "{path}: {res}");
        assert!(res.contains("connection: close"), "{path}: {res}");
    }
    // Nothing was decided or created.
    let logs = app.logs(&s.owner, &s.site_id, "").await;
    assert_eq!(logs["items"].as_array().unwrap().len(), 0);
    let sites = app.get_json(&s.owner, "/api/sites").await;
    assert_eq!(sites["items"].as_array().unwrap().len(), 1);
}
