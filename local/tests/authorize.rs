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
        .http
        .delete(app.url(&format!("/api/sites/{}/api-keys/{key_id}", s.site_id)))
        .bearer_auth(&s.owner)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let res = app
        .authorize(
            &key,
            json!({"token": s.token, "method": "GET", "path": "/"}),
        )
        .await;
    assert_eq!(res.status(), 401);
}
