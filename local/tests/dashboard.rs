//! The dashboard API: JWT checks, roles, isolation, validation, rotation, logs.

mod common;

use base64::Engine;
use common::*;
use payfence_core::auth::{AuthError, Role};
use payfence_core::config::Config;
use serde_json::{json, Value};

#[tokio::test]
async fn jwts_are_fully_checked() {
    let app = spawn_app().await;
    let now = payfence_core::domain::now_ms() / 1000;
    let claims = |over: Value| {
        let mut c = json!({"sub": "alice", "iss": payfence_local::ISSUER, "client_id": payfence_local::AUDIENCE,
            "token_use": "access", "cognito:groups": ["site_owner"], "iat": now, "exp": now + 600});
        c.as_object_mut()
            .unwrap()
            .extend(over.as_object().unwrap().clone());
        app.local.issuer.sign_claims(&c)
    };
    assert_eq!(
        app.get(&claims(json!({})), "/api/sites").await.status(),
        200
    );
    let res = app.http.get(app.url("/api/sites")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(header(&res, "www-authenticate"), Some("Bearer"));
    for (why, token) in [
        ("garbage", "not.a.jwt".to_owned()),
        ("issuer", claims(json!({"iss": "someone-else"}))),
        ("audience", claims(json!({"client_id": "other-app"}))),
        ("expired", claims(json!({"exp": now - 3600}))),
        ("token_use", claims(json!({"token_use": "refresh"}))),
        ("empty sub", claims(json!({"sub": ""}))),
    ] {
        assert_eq!(app.get(&token, "/api/sites").await.status(), 401, "{why}");
    }
    // A token signed by another key with the same kid.
    let other_dir = tempfile::tempdir().unwrap();
    let other = payfence_local::Issuer::load_or_create(other_dir.path()).unwrap();
    let forged = other.token("alice", Role::Admin, std::time::Duration::from_secs(60));
    assert_eq!(app.get(&forged, "/api/sites").await.status(), 401);
    // A JWT sent twice is refused, even two copies of a valid one.
    let valid = claims(json!({}));
    let res = app
        .http
        .get(app.url("/api/sites"))
        .header("authorization", format!("Bearer {valid}"))
        .header("authorization", format!("Bearer {valid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // Authenticated but in no PayFence group.
    assert_eq!(
        app.get(&claims(json!({"cognito:groups": ["staff"]})), "/api/sites")
            .await
            .status(),
        403
    );
}

#[tokio::test]
async fn owners_see_only_their_sites_admins_see_all_consumers_their_tokens() {
    let app = spawn_app().await;
    let s = app.setup(60, 1000).await; // alice's
    let bob = app.jwt("bob", Role::SiteOwner);
    let admin = app.jwt("root", Role::Admin);
    let carol = app.jwt("carol", Role::Consumer);

    for path in ["", "/plans", "/tokens", "/logs", "/api-keys", "/events"] {
        let res = app
            .get(&bob, &format!("/api/sites/{}{path}", s.site_id))
            .await;
        assert_eq!(res.status(), 404, "bob must not see alice's site{path}");
        assert_eq!(
            app.get(&admin, &format!("/api/sites/{}{path}", s.site_id))
                .await
                .status(),
            200
        );
    }
    let res = app
        .delete(
            &bob,
            &format!("/api/sites/{}/tokens/{}", s.site_id, s.token_id),
        )
        .await;
    assert_eq!(res.status(), 404);
    let bobs: Value = app.get_json(&bob, "/api/sites").await;
    assert_eq!(bobs["items"].as_array().unwrap().len(), 0);
    let all: Value = app.get_json(&admin, "/api/sites").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 1);
    assert_eq!(all["next_cursor"], Value::Null);
    assert!(
        !all.to_string().contains("signing_secret"),
        "secrets are shown once only"
    );
    // Site lists come in pages, in site-id order: an admin's has every owner's.
    let mut bobs_sites = Vec::new();
    for _ in 0..2 {
        let site = app.create_site(&bob, "https://api.example.com").await;
        bobs_sites.push(site["site_id"].as_str().unwrap().to_owned());
    }
    bobs_sites.sort();
    let mut every = [bobs_sites.clone(), vec![s.site_id.clone()]].concat();
    every.sort();
    for (jwt, expected) in [(&admin, &every), (&bob, &bobs_sites)] {
        let mut seen = Vec::new();
        for page in app.pages(jwt, "/api/sites", "limit=1").await {
            let items = page["items"].as_array().unwrap();
            assert_eq!(items.len(), 1);
            seen.push(items[0]["site_id"].as_str().unwrap().to_owned());
        }
        assert_eq!(&seen, expected);
    }
    let alices: Value = app.get_json(&s.owner, "/api/sites").await;
    assert_eq!(alices["items"][0]["site_id"], s.site_id.as_str());
    assert_eq!(alices["items"].as_array().unwrap().len(), 1);
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("cursor=tok_0000000000000000", "cursor"),
        ("owner=bob", "owner"),
    ] {
        let res = app.get(&admin, &format!("/api/sites?{query}")).await;
        assert_eq!(res.status(), 422, "{query}");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], field);
    }

    // Consumers cannot manage sites, but see tokens assigned to them, with usage.
    assert_eq!(app.get(&carol, "/api/sites").await.status(), 403);
    assert_eq!(
        app.post(
            &carol,
            "/api/sites",
            json!({"name": "x", "origin_url": "https://api.example.com"})
        )
        .await
        .status(),
        403
    );
    assert_eq!(
        app.get(&carol, &format!("/api/sites/{}", s.site_id))
            .await
            .status(),
        403
    );
    let res = app
        .post(
            &s.owner,
            &format!("/api/sites/{}/tokens", s.site_id),
            json!({"plan_id": s.plan_id, "consumer": "carol", "label": "carol's"}),
        )
        .await;
    let tok: Value = res.json().await.unwrap();
    app.proxy_get(&s.site_id, "/", tok["token"].as_str().unwrap())
        .await;
    let mine: Value = app.get_json(&carol, "/api/me/tokens").await;
    let items = mine["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["token_id"], tok["token_id"]);
    assert_eq!(items[0]["usage"]["used"], 1);
    assert_eq!(items[0]["plan"], "pro", "the plan's name");
    assert!(items[0].get("token").is_none());
    // Each of several tokens comes with its own usage, in token-id order, in pages.
    let res = app
        .post(
            &s.owner,
            &format!("/api/sites/{}/tokens", s.site_id),
            json!({"plan_id": s.plan_id, "consumer": "carol"}),
        )
        .await;
    let second: Value = res.json().await.unwrap();
    for _ in 0..3 {
        app.proxy_get(&s.site_id, "/", second["token"].as_str().unwrap())
            .await;
    }
    let mut expected = vec![
        (tok["token_id"].as_str().unwrap().to_owned(), 1),
        (second["token_id"].as_str().unwrap().to_owned(), 3),
    ];
    expected.sort();
    let used = |page: &Value| -> Vec<(String, u64)> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let id = t["token_id"].as_str().unwrap().into();
                (id, t["usage"]["used"].as_u64().unwrap())
            })
            .collect()
    };
    let mine: Value = app.get_json(&carol, "/api/me/tokens").await;
    assert_eq!(used(&mine), expected);
    assert_eq!(mine["next_cursor"], Value::Null);
    let first: Value = app.get_json(&carol, "/api/me/tokens?limit=1").await;
    assert_eq!(used(&first), expected[..1]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let rest: Value = app
        .get_json(&carol, &format!("/api/me/tokens?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(used(&rest), expected[1..]);
    assert_eq!(rest["next_cursor"], Value::Null);
    for (query, field) in [
        ("limit=0", "limit"),
        ("cursor=x", "cursor"),
        ("site=1", "site"),
    ] {
        let res = app.get(&carol, &format!("/api/me/tokens?{query}")).await;
        assert_eq!(res.status(), 422, "{query}");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], field);
    }

    // The admin trail recorded who did what.
    let trail: Value = app.get_json(&admin, "/api/audit-trail").await;
    let actions: Vec<&str> = trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"site.create")
            && actions.contains(&"plan.create")
            && actions.contains(&"token.create"),
        "{actions:?}"
    );
    assert!(trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["actor"].is_string() && e["timestamp"].is_string()));
    let bob_trail: Value = app.get_json(&bob, "/api/audit-trail").await;
    let bobs_changes: Vec<&str> = (bob_trail["items"].as_array().unwrap().iter())
        .map(|e| e["site_id"].as_str().unwrap())
        .collect();
    assert_eq!(bobs_changes.len(), 2, "his two sites, none of alice's");
    assert!(bobs_changes
        .iter()
        .all(|id| bobs_sites.iter().any(|b| b == id)));
    // An admin's change to a site is in its owner's trail too.
    app.create_key(&admin, &s.site_id).await;
    let owner_trail: Value = app.get_json(&s.owner, "/api/audit-trail").await;
    assert_eq!(owner_trail["items"][0]["action"], "api_key.create");
    assert_eq!(owner_trail["items"][0]["role"], "admin");
    assert_eq!(
        owner_trail["items"][0]["owner"],
        owner_trail["items"][1]["owner"]
    );
    let trail: Value = app.get_json(&admin, "/api/audit-trail").await;
    let one: Value = app.get_json(&admin, "/api/audit-trail?limit=1").await;
    assert_eq!(one["items"].as_array().unwrap().len(), 1);
    assert_eq!(one["items"][0], trail["items"][0], "newest first");
    let cursor = one["next_cursor"].as_str().unwrap();
    let two: Value = app
        .get_json(&admin, &format!("/api/audit-trail?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(two["items"][0], trail["items"][1], "the page after");
    for (query, field) in [("limit=abc", "limit"), ("cursor=evt_1", "cursor")] {
        let res = app.get(&admin, &format!("/api/audit-trail?{query}")).await;
        assert_eq!(res.status(), 422);
        assert_eq!(res.json::<Value>().await.unwrap()["field"], field);
    }
}

#[tokio::test]
async fn invalid_input_is_400_or_422_naming_the_field() {
    let app = spawn_app_with(Config::default()).await; // production origin rules
    let owner = app.jwt("alice", Role::SiteOwner);
    let cases = [
        (json!({"origin_url": "https://api.example.com"}), "name"),
        (
            json!({"name": "", "origin_url": "https://api.example.com"}),
            "name",
        ),
        (
            json!({"name": "x", "origin_url": "http://api.example.com"}),
            "origin_url",
        ),
        (
            json!({"name": "x", "origin_url": "https://169.254.169.254"}),
            "origin_url",
        ),
        (
            json!({"name": "x", "origin_url": "https://localhost"}),
            "origin_url",
        ),
        (
            json!({"name": "x", "origin_url": "https://10.0.0.8"}),
            "origin_url",
        ),
        (
            json!({"name": "x", "origin_url": "https://[2002:7f00:1::]"}),
            "origin_url",
        ),
        (
            json!({"name": "x", "origin_url": "https://api.example.com:0"}),
            "origin_url",
        ),
        (
            json!({"name": "x", "origin_url": "https://api.example.com", "site_requests_per_second": 0}),
            "site_requests_per_second",
        ),
        (
            json!({"name": "x", "origin_url": "https://api.example.com", "replay_window_seconds": 5}),
            "replay_window_seconds",
        ),
        (
            json!({"name": "x", "origin_url": "https://api.example.com", "colour": "red"}),
            "colour",
        ),
        (
            json!({"name": 7, "origin_url": "https://api.example.com"}),
            "name",
        ),
    ];
    for (body, field) in cases {
        let res = app.post(&owner, "/api/sites", body.clone()).await;
        assert_eq!(res.status(), 422, "{body}");
        assert_eq!(
            header(&res, "content-type"),
            Some("application/problem+json")
        );
        let p: Value = res.json().await.unwrap();
        assert_eq!(p["field"], field, "{body}");
        assert_eq!(p["status"], 422);
    }
    // A value in the wrong field may be a secret: the detail names its type, never it.
    let secret = "pfsig_pasted-into-the-wrong-field";
    for body in [
        json!({"name": "x", "origin_url": "https://api.example.com", "replay_window_seconds": secret}),
        json!({"name": "x", "origin_url": "https://api.example.com", "secret_query_params": secret}),
    ] {
        let res = app.post(&owner, "/api/sites", body.clone()).await;
        assert_eq!(res.status(), 422, "{body}");
        let p = res.text().await.unwrap();
        assert!(p.contains("invalid type: a string, expected"), "{p}");
        assert!(!p.contains(secret), "{p}");
    }
    let res = app
        .http
        .post(app.url("/api/sites"))
        .bearer_auth(&owner)
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = app
        .http
        .post(app.url("/api/sites"))
        .bearer_auth(&owner)
        .body("name=x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 415);
    let res = app
        .post(
            &owner,
            "/api/sites",
            json!({"name": "x".repeat(70_000), "origin_url": "https://api.example.com"}),
        )
        .await;
    assert_eq!(res.status(), 413);
    assert_eq!(
        res.json::<Value>().await.unwrap()["type"],
        "https://payfence.io/problems/payload-too-large"
    );

    let site = app.create_site(&owner, "https://api.example.com/v2/").await;
    assert_eq!(site["origin_url"], "https://api.example.com/v2");
    assert!(site["signing_secret"]
        .as_str()
        .unwrap()
        .starts_with("pfsig_"));
    let sid = site["site_id"].as_str().unwrap();
    for (body, field) in [
        (
            json!({"name": "pro", "requests_per_minute": 9, "monthly_quota": 10}),
            "requests_per_minute",
        ),
        (
            json!({"name": "pro", "requests_per_minute": 10_001, "monthly_quota": 10}),
            "requests_per_minute",
        ),
        (
            json!({"name": "pro", "requests_per_minute": 10, "monthly_quota": 0}),
            "monthly_quota",
        ),
        (
            json!({"name": "pro\r\nx", "requests_per_minute": 10, "monthly_quota": 1}),
            "name",
        ),
        (
            json!({"name": "pro", "requests_per_minute": -1, "monthly_quota": 1}),
            "requests_per_minute",
        ),
    ] {
        let res = app
            .post(&owner, &format!("/api/sites/{sid}/plans"), body.clone())
            .await;
        assert_eq!(res.status(), 422, "{body}");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], field, "{body}");
    }
    // In a PATCH, `null` is not "leave it": it is refused, naming the field.
    let plan_id = app.create_plan(&owner, sid, 60, 1000).await;
    for (path, fields) in [
        (
            format!("/api/sites/{sid}"),
            &[
                "name",
                "origin_url",
                "site_requests_per_second",
                "replay_window_seconds",
                "failed_attempts_per_minute",
                "secret_query_params",
            ][..],
        ),
        (
            format!("/api/sites/{sid}/plans/{plan_id}"),
            &["name", "requests_per_minute", "monthly_quota"][..],
        ),
    ] {
        for field in fields {
            let res = app.patch(&owner, &path, json!({ *field: null })).await;
            assert_eq!(res.status(), 422, "{path} {field}");
            let p: Value = res.json().await.unwrap();
            assert_eq!(p["field"], *field, "{p}");
            assert!(p["detail"].as_str().unwrap().contains("must not be null"));
        }
    }
    let res = app
        .post(
            &owner,
            &format!("/api/sites/{sid}/tokens"),
            json!({"plan_id": "plan_0000000000000000"}),
        )
        .await;
    assert_eq!(res.json::<Value>().await.unwrap()["field"], "plan_id");
    let res = app
        .get(&owner, &format!("/api/sites/{sid}/logs?decision=maybe"))
        .await;
    assert_eq!(res.json::<Value>().await.unwrap()["field"], "decision");
    let res = app
        .get(&owner, &format!("/api/sites/{sid}/logs?from=yesterday"))
        .await;
    assert_eq!(res.json::<Value>().await.unwrap()["field"], "from");
    for route in ["logs", "logs/export"] {
        let res = app
            .get(
                &owner,
                &format!("/api/sites/{sid}/{route}?from=2026-02-01T00:00:00Z&to=1769817600"),
            )
            .await;
        assert_eq!(res.status(), 422, "{route}: from after to");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], "from");
    }
    let res = app
        .get(&owner, &format!("/api/sites/{sid}/logs?cursor=zzz"))
        .await;
    assert_eq!(res.status(), 422);
    for (query, field) in [("cursor=zzz", "cursor"), ("limit=0", "limit")] {
        let res = app
            .get(&owner, &format!("/api/sites/{sid}/tokens?{query}"))
            .await;
        assert_eq!(res.status(), 422, "{query}");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], field);
    }
    assert_eq!(
        app.get(&owner, "/api/sites/site_0000000000000000")
            .await
            .status(),
        404
    );
    let res = app
        .post(
            &owner,
            &format!("/api/sites/{sid}/signing-secret/rotate"),
            json!({"overlap_seconds": 60, "pad": "x".repeat(70_000)}),
        )
        .await;
    assert_eq!(res.status(), 413);
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    // A path parameter that is not UTF-8 once decoded.
    let res = app
        .get(&owner, &format!("/api/sites/{sid}/tokens/%ff%fe"))
        .await;
    assert_eq!(res.status(), 400);
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    let res = app.get(&owner, "/api/nothing-here").await;
    assert_eq!(res.status(), 404);
    assert_eq!(
        res.json::<Value>().await.unwrap()["type"],
        "https://payfence.io/problems/not-found"
    );
    // A known route with a method it does not take: 405, saying so, with Allow.
    let res = app
        .http
        .delete(app.url("/api/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(header(&res, "allow"), Some("GET,HEAD"));
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        res.json::<Value>().await.unwrap()["type"],
        "https://payfence.io/problems/method-not-allowed"
    );
}

#[tokio::test]
async fn local_origins_allowed_but_never_metadata_addresses() {
    let app = spawn_app().await; // allow_http_origins, as `--allow-http-origins`
    let owner = app.jwt("alice", Role::SiteOwner);
    for ok in [
        "http://127.0.0.1:9000",
        "http://10.0.0.8",
        "http://[::1]:8080",
    ] {
        let res = app
            .post(&owner, "/api/sites", json!({"name": "x", "origin_url": ok}))
            .await;
        assert_eq!(res.status(), 201, "{ok}");
    }
    for bad in [
        "http://169.254.169.254/latest",
        "https://169.254.170.2",
        "http://[fd00:ec2::254]",
        "http://[fe80::1]",
        "http://[::ffff:169.254.169.254]",
    ] {
        let res = app
            .post(
                &owner,
                "/api/sites",
                json!({"name": "x", "origin_url": bad}),
            )
            .await;
        assert_eq!(res.status(), 422, "{bad}");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], "origin_url");
    }
}

#[tokio::test]
async fn rotation_signs_with_both_secrets_during_the_overlap() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let res = app
        .post(
            &s.owner,
            &format!("/api/sites/{}/signing-secret/rotate", s.site_id),
            json!({"overlap_seconds": 3600}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let r: Value = res.json().await.unwrap();
    let new = r["signing_secret"].as_str().unwrap().to_owned();
    assert_ne!(new, s.secret);
    assert!(
        r["previous_valid_until"].as_u64().unwrap() > payfence_core::domain::now_ms() / 1000 + 3500
    );

    // The origin still verifying with the old secret keeps working.
    assert_eq!(
        app.proxy_get(&s.site_id, "/after-rotation", &s.token)
            .await
            .status(),
        200
    );
    let seen = s.origin.last();
    let sig = seen
        .headers
        .get("x-payfence-signature")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let ts = seen
        .headers
        .get("x-payfence-timestamp")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(sig.matches("sha256=").count(), 2);
    let now: u64 = ts.parse().unwrap();
    for secret in [&new, &s.secret] {
        payfence_signing::Verifier::new(secret)
            .verify("GET", "/after-rotation", Some(&ts), Some(&sig), now)
            .unwrap();
    }

    // With no overlap the old secret stops signing at once.
    let res = app
        .post(
            &s.owner,
            &format!("/api/sites/{}/signing-secret/rotate", s.site_id),
            json!({"overlap_seconds": 0}),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        app.proxy_get(&s.site_id, "/x", &s.token).await.status(),
        401,
        "the origin rejects what it cannot verify"
    );
}

/// Concurrent changes to a site cannot undo each other: one made from a site that
/// another changed meanwhile is refused with 409, so a secret shown to the owner is
/// never silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_site_changes_never_lose_a_shown_secret() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let rotate = || {
        app.http
            .post(app.url(&format!("/api/sites/{}/signing-secret/rotate", s.site_id)))
            .bearer_auth(&s.owner)
            .json(&json!({"overlap_seconds": 3600}))
            .send()
    };
    let rename = |i: usize| {
        app.http
            .patch(app.url(&format!("/api/sites/{}", s.site_id)))
            .bearer_auth(&s.owner)
            .json(&json!({"name": format!("renamed {i}")}))
            .send()
    };
    let rotations = futures_util::future::join_all((0..8).map(|_| rotate()));
    let renames = futures_util::future::join_all((0..8).map(rename));
    let (rotations, renames) = tokio::join!(rotations, renames);
    let (mut shown, mut applied) = (Vec::new(), 0);
    for res in rotations.into_iter().chain(renames).map(Result::unwrap) {
        match res.status().as_u16() {
            200 => {
                applied += 1;
                let body: Value = res.json().await.unwrap();
                if let Some(secret) = body["signing_secret"].as_str() {
                    shown.push(secret.to_owned());
                }
            }
            409 => {
                let p: Value = res.json().await.unwrap();
                assert_eq!(p["type"], "https://payfence.io/problems/conflict");
                assert!(p["detail"].as_str().unwrap().contains("retry"), "{p}");
            }
            other => panic!("{other}"),
        }
    }
    assert!(applied > 0, "one change at least goes through");

    // What the proxy signs with now: the last rotation's secret and, in the overlap,
    // the one before, which is the creation secret or an earlier rotation's (or only
    // the creation secret, if every rotation found the site renamed meanwhile).
    let (listener, addr) = bind_origin().await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen2 = seen.clone();
    let capture = axum::Router::new().fallback(move |req: axum::extract::Request| {
        *seen2.lock().unwrap() = Some(req.headers().clone());
        async { "ok" }
    });
    tokio::spawn(async move { axum::serve(listener, capture).await.unwrap() });
    let res = rename_origin(&app, &s, &format!("http://{addr}")).await;
    assert_eq!(res, 200);
    assert_eq!(
        app.proxy_get(&s.site_id, "/x", &s.token).await.status(),
        200
    );
    let headers = seen.lock().unwrap().clone().unwrap();
    let sig = headers["x-payfence-signature"].to_str().unwrap().to_owned();
    let ts = headers["x-payfence-timestamp"].to_str().unwrap().to_owned();
    let now: u64 = ts.parse().unwrap();
    let signs = |secret: &str| {
        payfence_signing::Verifier::new(secret)
            .verify("GET", "/x", Some(&ts), Some(&sig), now)
            .is_ok()
    };
    let signing = shown.iter().filter(|s| signs(s)).count();
    assert_eq!(
        signing,
        shown.len().min(2),
        "{} rotations went through; the proxy signs with {signing} of their secrets",
        shown.len(),
    );
    assert_eq!(signs(&s.secret), shown.len() < 2, "the creation secret");
}

/// Concurrent changes to one plan's different fields: each that was answered 200 is
/// in the plan that results (or a later 200 of the same field replaced it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_plan_changes_never_undo_each_other() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let path = format!("/api/sites/{}/plans/{}", s.site_id, s.plan_id);
    let patch = |body: Value| {
        app.http
            .patch(app.url(&path))
            .bearer_auth(&s.owner)
            .json(&body)
            .send()
    };
    let rpms = futures_util::future::join_all(
        (0..8).map(|i| patch(json!({"requests_per_minute": 100 + i}))),
    );
    let quotas =
        futures_util::future::join_all((0..8).map(|i| patch(json!({"monthly_quota": 5000 + i}))));
    let (rpms, quotas) = tokio::join!(rpms, quotas);
    let applied = |answers: Vec<reqwest::Result<reqwest::Response>>, base: u64| {
        answers
            .into_iter()
            .enumerate()
            .filter_map(|(i, res)| match res.unwrap().status().as_u16() {
                200 => Some(base + i as u64),
                409 => None,
                other => panic!("{other}"),
            })
            .collect::<Vec<u64>>()
    };
    let (rpms, quotas) = (applied(rpms, 100), applied(quotas, 5000));
    let plan: Value = app.get_json(&s.owner, &path).await;
    let rpm = plan["requests_per_minute"].as_u64().unwrap();
    let quota = plan["monthly_quota"].as_u64().unwrap();
    assert!(
        if rpms.is_empty() {
            rpm == 600
        } else {
            rpms.contains(&rpm)
        },
        "rpm {rpm}, applied {rpms:?}"
    );
    assert!(
        if quotas.is_empty() {
            quota == 1000
        } else {
            quotas.contains(&quota)
        },
        "quota {quota}, applied {quotas:?}"
    );
}

#[tokio::test]
async fn an_api_key_may_carry_a_label_changed_by_a_patch_and_is_read_alone_without_its_secret() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let keys = format!("/api/sites/{}/api-keys", s.site_id);
    // No body at all (as `curl -X POST` sends), a blank one, `{}`: a key without a label.
    for body in ["", " \n", "{}"] {
        let res = app
            .http
            .post(app.url(&keys))
            .bearer_auth(&s.owner)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "{body:?}");
        let k: Value = res.json().await.unwrap();
        assert_eq!(k["label"], Value::Null);
        assert!(k["key"].as_str().unwrap().starts_with("sk_"));
    }
    let res = app
        .post(&s.owner, &keys, json!({"label": "  billing server "}))
        .await;
    assert_eq!(res.status(), 201);
    let labelled: Value = res.json().await.unwrap();
    assert_eq!(labelled["label"], "billing server");
    // The label is kept, listed, and the key works.
    let res = app
        .authorize(
            labelled["key"].as_str().unwrap(),
            json!({"token": s.token, "method": "GET", "path": "/"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let listed = |v: &Value| -> Vec<(String, Value)> {
        let items = v["items"].as_array().unwrap();
        assert!(items.iter().all(|k| k.get("key").is_none()), "no secrets");
        items
            .iter()
            .map(|k| (k["key_id"].as_str().unwrap().to_owned(), k["label"].clone()))
            .collect()
    };
    let before = listed(&app.get_json(&s.owner, &keys).await);
    assert_eq!(before.len(), 4);
    assert!(before.contains(&(
        labelled["key_id"].as_str().unwrap().to_owned(),
        json!("billing server")
    )));
    for (body, status, field) in [
        (json!({"label": ""}), 422, Some("label")),
        (json!({"label": "x".repeat(101)}), 422, Some("label")),
        (json!({"label": "a\u{7}b"}), 422, Some("label")),
        (json!({"label": 5}), 422, Some("label")),
        (json!({"lable": "typo"}), 422, Some("lable")),
        (json!(["billing"]), 400, None),
        (json!(null), 400, None),
    ] {
        let res = app.post(&s.owner, &keys, body.clone()).await;
        assert_eq!(res.status(), status, "{body}");
        let p: Value = res.json().await.unwrap();
        assert_eq!(p["field"].as_str(), field, "{body}");
    }
    let res = app
        .http
        .post(app.url(&keys))
        .bearer_auth(&s.owner)
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(listed(&app.get_json(&s.owner, &keys).await), before);
    let trail: Value = app.get_json(&s.owner, "/api/audit-trail").await;
    let created = trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "api_key.create")
        .count();
    assert_eq!(created, 4, "a refused body leaves no entry");
    // A label is changed, or removed with "", by a PATCH; the key stays as it was.
    let key_path = format!("{keys}/{}", labelled["key_id"].as_str().unwrap());
    for (label, shown) in [
        (json!("billing, v2"), json!("billing, v2")),
        (json!(""), Value::Null),
    ] {
        let res = app
            .patch(&s.owner, &key_path, json!({"label": label}))
            .await;
        assert_eq!(res.status(), 200);
        let k: Value = res.json().await.unwrap();
        assert_eq!(
            (&k["label"], &k["key_id"], k.get("key")),
            (&shown, &labelled["key_id"], None)
        );
        let listed = listed(&app.get_json(&s.owner, &keys).await);
        assert!(listed.contains(&(k["key_id"].as_str().unwrap().to_owned(), shown)));
        assert_eq!(app.get_json(&s.owner, &key_path).await, k, "read alone");
    }
    let res = app
        .authorize(
            labelled["key"].as_str().unwrap(),
            json!({"token": s.token, "method": "GET", "path": "/"}),
        )
        .await;
    assert_eq!(res.status(), 200, "a relabelled key still works");
    for (body, field) in [
        (json!({"label": null}), "label"),
        (json!({"label": 7}), "label"),
        (json!({"key": "sk_x"}), "key"),
    ] {
        let res = app.patch(&s.owner, &key_path, body.clone()).await;
        assert_eq!(res.status(), 422, "{body}");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], field);
    }
    let body = json!({"label": "x"});
    let mallory = app.jwt("mallory", Role::SiteOwner);
    assert_eq!(
        app.patch(&mallory, &key_path, body.clone()).await.status(),
        404
    );
    let carol = app.jwt("carol", Role::Consumer);
    assert_eq!(
        app.patch(&carol, &key_path, body.clone()).await.status(),
        403
    );
    let unknown = format!("{keys}/key_0000000000000000");
    assert_eq!(
        app.patch(&s.owner, &unknown, body.clone()).await.status(),
        404
    );
    for (who, path, status) in [
        (&mallory, &key_path, 404),
        (&carol, &key_path, 403),
        (&s.owner, &unknown, 404),
        (&s.owner, &format!("{keys}/not-a-key"), 404),
    ] {
        assert_eq!(app.get(who, path).await.status(), status, "GET {path}");
    }
    assert_eq!(app.delete(&s.owner, &key_path).await.status(), 204);
    let res = app.patch(&s.owner, &key_path, body).await;
    assert_eq!(res.status(), 409, "revocation is final");
    let revoked = app.get_json(&s.owner, &key_path).await;
    assert!(revoked["revoked_at"].is_u64(), "{revoked}");
    assert_eq!(revoked.get("key"), None);
    let trail: Value = app.get_json(&s.owner, "/api/audit-trail").await;
    let updates = (trail["items"].as_array().unwrap().iter())
        .filter(|e| e["action"] == "api_key.update")
        .count();
    assert_eq!(updates, 2);
}

#[tokio::test]
async fn webhook_settings_show_the_secret_once_and_are_never_removed_by_omission() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let path = format!("/api/sites/{}/webhook", s.site_id);
    let put = |body: Value| app.send(reqwest::Method::PUT, &s.owner, &path, body);
    assert_eq!(
        app.get_json(&s.owner, &path).await,
        json!({"url": null, "has_secret": false})
    );

    // The first URL gets a Standard Webhooks secret, shown this once.
    let res = put(json!({"url": "http://127.0.0.1:9/hooks"})).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["url"], "http://127.0.0.1:9/hooks");
    let first = v["secret"].as_str().unwrap().to_owned();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(first.strip_prefix("whsec_").unwrap())
        .unwrap();
    assert_eq!(raw.len(), 32);
    // Changing the URL keeps the secret, and does not show it again.
    let v: Value = put(json!({"url": "http://127.0.0.1:9/other"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["secret"], Value::Null);
    let read = app.get_json(&s.owner, &path).await;
    assert_eq!(
        read,
        json!({"url": "http://127.0.0.1:9/other", "has_secret": true})
    );
    // Rotation shows a new one.
    let v: Value = put(json!({"url": "http://127.0.0.1:9/other", "rotate_secret": true}))
        .await
        .json()
        .await
        .unwrap();
    let second = v["secret"].as_str().unwrap();
    assert!(second.starts_with("whsec_") && second != first);

    // A body without `url` is refused, not read as "remove the webhook".
    for body in [json!({"rotate_secret": true}), json!({})] {
        let res = put(body.clone()).await;
        assert_eq!(res.status(), 422, "{body}");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], "url");
    }
    for (url, status) in [
        ("https://169.254.169.254/", 422),
        ("ftp://example.com/", 422),
        ("not a url", 422),
    ] {
        assert_eq!(put(json!({"url": url})).await.status(), status, "{url}");
    }
    assert_eq!(
        app.get_json(&s.owner, &path).await["url"],
        "http://127.0.0.1:9/other",
        "refused changes change nothing"
    );

    // Another owner's site is not found; a consumer may not touch it.
    for (who, status) in [
        (app.jwt("bob", Role::SiteOwner), 404),
        (app.jwt("carol", Role::Consumer), 403),
    ] {
        assert_eq!(app.get(&who, &path).await.status(), status);
        let res = app
            .send(reqwest::Method::PUT, &who, &path, json!({"url": null}))
            .await;
        assert_eq!(res.status(), status);
    }

    // `null` removes it; the change is in the owner's audit trail.
    let v: Value = put(json!({"url": null})).await.json().await.unwrap();
    assert_eq!(v, json!({"url": null, "secret": null}));
    assert_eq!(app.get_json(&s.owner, &path).await["url"], Value::Null);
    let trail = app.get_json(&s.owner, "/api/audit-trail").await;
    let webhook_changes = trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "site.webhook")
        .count();
    assert_eq!(webhook_changes, 4);
    let text = trail.to_string();
    assert!(!text.contains(&first) && !text.contains(second));
}

#[tokio::test]
async fn a_plan_is_deleted_once_no_active_token_uses_it() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let plan = format!("/api/sites/{}/plans/{}", s.site_id, s.plan_id);

    let res = app.delete(&s.owner, &plan).await;
    assert_eq!(res.status(), 409);
    let p: Value = res.json().await.unwrap();
    assert_eq!(
        p["detail"],
        "1 active token(s) use this plan: move them to another plan or revoke them first"
    );
    assert_eq!(app.proxy_get(&s.site_id, "/", &s.token).await.status(), 200);
    let other = app.jwt("mallory", Role::SiteOwner);
    assert_eq!(app.delete(&other, &plan).await.status(), 404);

    let token = format!("/api/sites/{}/tokens/{}", s.site_id, s.token_id);
    assert_eq!(app.delete(&s.owner, &token).await.status(), 204);
    assert_eq!(app.delete(&s.owner, &plan).await.status(), 204);
    assert_eq!(app.get(&s.owner, &plan).await.status(), 404);
    assert_eq!(app.delete(&s.owner, &plan).await.status(), 404);
    let plans: Value = app
        .get_json(&s.owner, &format!("/api/sites/{}/plans", s.site_id))
        .await;
    assert_eq!(plans["items"].as_array().unwrap().len(), 0);
    let res = app
        .post(
            &s.owner,
            &format!("/api/sites/{}/tokens", s.site_id),
            json!({"plan_id": s.plan_id}),
        )
        .await;
    assert_eq!(res.status(), 422);
    assert_eq!(app.proxy_get(&s.site_id, "/", &s.token).await.status(), 403);
    let trail: Value = app.get_json(&s.owner, "/api/audit-trail").await;
    assert_eq!(trail["items"][0]["action"], "plan.delete");
    assert_eq!(trail["items"][0]["target"], s.plan_id.as_str());
}

/// Tokens issued on a plan while the plan is deleted: either the deletion comes
/// first (`204`) and every issue is refused, or a token comes first, the deletion is
/// refused (`409`) and every issue succeeds. No token ends up on a deleted plan.
/// (conformance.rs checks the store's part of it under finer interleavings.)
#[tokio::test]
async fn a_plan_deleted_while_tokens_are_issued_on_it_leaves_no_token_on_it() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let tokens = format!("/api/sites/{}/tokens", s.site_id);
    for round in 0..6 {
        let plan_id = app
            .create_named_plan(&s.owner, &s.site_id, &format!("p{round}"), 60, 10)
            .await;
        let plan = format!("/api/sites/{}/plans/{plan_id}", s.site_id);
        // The deletion is sent this long after the issues (before them if negative),
        // so it meets them at another point each round.
        let offset = [-2000, -500, 0, 500, 2000, 8000][round];
        let after =
            |us: i64| tokio::time::sleep(std::time::Duration::from_micros(us.max(0) as u64));
        let issue = || async {
            after(-offset).await;
            let res = app
                .post(&s.owner, &tokens, json!({"plan_id": plan_id}))
                .await;
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap())
        };
        let delete = async {
            after(offset).await;
            app.delete(&s.owner, &plan).await
        };
        let (a, b, deleted, c, d) = tokio::join!(issue(), issue(), delete, issue(), issue());
        let issued: Vec<Value> = [a, b, c, d]
            .into_iter()
            .filter_map(|(status, body)| match status {
                201 => Some(body),
                // Refused before the store (no such plan) or by it (deleted meanwhile).
                409 | 422 => None,
                other => panic!("round {round}: {other} {body}"),
            })
            .collect();
        match deleted.status().as_u16() {
            204 => assert!(issued.is_empty(), "round {round}: tokens on a deleted plan"),
            409 => assert_eq!(
                issued.len(),
                4,
                "round {round}: refused on a plan that stays"
            ),
            other => panic!("round {round}: deletion answered {other}"),
        }
        let listed = app
            .get_json(&s.owner, &format!("{tokens}?plan_id={plan_id}"))
            .await;
        assert_eq!(listed["items"].as_array().unwrap().len(), issued.len());
        for t in &issued {
            let secret = t["token"].as_str().unwrap();
            assert_eq!(app.proxy_get(&s.site_id, "/", secret).await.status(), 200);
        }
    }
}

/// `n` creations of `body` at `path`, eight at a time, each expected to be `201`.
async fn create_many(app: &App, jwt: &str, path: &str, n: usize, body: Value) {
    use futures_util::StreamExt;
    let created: Vec<u16> = futures_util::stream::iter(0..n)
        .map(|_| async { app.post(jwt, path, body.clone()).await.status().as_u16() })
        .buffer_unordered(8)
        .collect()
        .await;
    assert_eq!(created, vec![201; n], "{path}");
}

#[tokio::test]
async fn sites_plans_and_active_api_keys_are_capped_with_a_409_that_changes_nothing() {
    let app = spawn_app_unthrottled().await;
    let s = app.setup(600, 1000).await;
    let site = format!("/api/sites/{}", s.site_id);
    let count = |path: String| {
        let app = &app;
        let owner = s.owner.clone();
        async move {
            let v: Value = app.get_json(&owner, &path).await;
            v["items"].as_array().unwrap().len()
        }
    };
    let refused = |res: reqwest::Response, detail: &'static str| async move {
        assert_eq!(res.status(), 409);
        let p: Value = res.json().await.unwrap();
        assert!(p["type"].as_str().unwrap().ends_with("conflict"), "{p}");
        assert_eq!(p["detail"], detail);
    };

    // Plans: 100 a site.
    let plan = json!({"name": "extra", "requests_per_minute": 60, "monthly_quota": 10});
    create_many(&app, &s.owner, &format!("{site}/plans"), 99, plan.clone()).await;
    let res = app
        .post(&s.owner, &format!("{site}/plans"), plan.clone())
        .await;
    refused(
        res,
        "this site has 100 plans, the most allowed: delete one first",
    )
    .await;
    assert_eq!(count(format!("{site}/plans")).await, 100);
    let plans: Value = app.get_json(&s.owner, &format!("{site}/plans")).await;
    let spare = plans["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["plan_id"].as_str().unwrap())
        .find(|id| *id != s.plan_id)
        .unwrap();
    let res = app.delete(&s.owner, &format!("{site}/plans/{spare}")).await;
    assert_eq!(res.status(), 204);
    assert_eq!(
        app.post(&s.owner, &format!("{site}/plans"), plan)
            .await
            .status(),
        201
    );
    // Tokens are not capped: they are paged.
    app.create_token(&s.owner, &s.site_id, &s.plan_id).await;

    // API keys: 20 active a site; a revoked one makes room, and the rest still work.
    create_many(&app, &s.owner, &format!("{site}/api-keys"), 19, json!({})).await;
    let key = app.create_key(&s.owner, &s.site_id).await;
    let res = app
        .post(&s.owner, &format!("{site}/api-keys"), json!({}))
        .await;
    refused(
        res,
        "this site has 20 active API keys, the most allowed: revoke one first",
    )
    .await;
    let keys: Value = app.get_json(&s.owner, &format!("{site}/api-keys")).await;
    let keys = keys["items"].as_array().unwrap();
    assert_eq!(keys.len(), 20);
    let other = keys
        .iter()
        .find(|k| !key.starts_with(k["prefix"].as_str().unwrap()));
    let other = other.unwrap()["key_id"].as_str().unwrap();
    let res = app
        .delete(&s.owner, &format!("{site}/api-keys/{other}"))
        .await;
    assert_eq!(res.status(), 204);
    app.create_key(&s.owner, &s.site_id).await;
    assert_eq!(
        count(format!("{site}/api-keys")).await,
        21,
        "revoked ones are listed"
    );
    let body = json!({"token": s.token, "method": "GET", "path": "/"});
    assert_eq!(app.authorize(&key, body).await.status(), 200);

    // Sites: 100 a user; another user is not held back by it.
    let new_site = json!({"name": "More", "origin_url": s.origin.url()});
    create_many(&app, &s.owner, "/api/sites", 99, new_site.clone()).await;
    let res = app.post(&s.owner, "/api/sites", new_site.clone()).await;
    refused(res, "you own 100 sites, the most allowed: delete one first").await;
    assert_eq!(count("/api/sites".into()).await, 100);
    let bob = app.jwt("bob", Role::SiteOwner);
    assert_eq!(
        app.post(&bob, "/api/sites", new_site.clone())
            .await
            .status(),
        201
    );
    assert_eq!(app.delete(&s.owner, &site).await.status(), 204);
    assert_eq!(
        app.post(&s.owner, "/api/sites", new_site).await.status(),
        201
    );

    // A refused creation leaves no entry in the audit trail.
    let trail: Value = app.get_json(&s.owner, "/api/audit-trail?limit=1000").await;
    let created = |action: &str| {
        trail["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action)
            .count()
    };
    assert_eq!(created("site.create"), 101);
    assert_eq!(created("plan.create"), 101);
    assert_eq!(created("api_key.create"), 21);
}

#[tokio::test]
async fn a_token_moves_to_another_plan_and_its_limits_follow_at_once() {
    avoid_minute_boundary().await;
    let app = spawn_app().await;
    let s = app.setup(600, 3).await;
    let token = format!("/api/sites/{}/tokens/{}", s.site_id, s.token_id);
    for _ in 0..3 {
        assert_eq!(app.proxy_get(&s.site_id, "/", &s.token).await.status(), 200);
    }
    assert_eq!(app.proxy_get(&s.site_id, "/", &s.token).await.status(), 429);
    let business = app
        .create_named_plan(&s.owner, &s.site_id, "business", 600, 10)
        .await;

    // The same secret, now on the new plan: this month's use counts against it.
    let res = app
        .patch(&s.owner, &token, json!({"plan_id": business}))
        .await;
    assert_eq!(res.status(), 200);
    let t: Value = res.json().await.unwrap();
    assert_eq!(t["plan_id"], business.as_str());
    assert_eq!(t["usage"]["used"], 3);
    assert_eq!(t["usage"]["monthly_quota"], 10);
    assert_eq!(t["usage"]["remaining"], 7);
    assert!(t.get("token").is_none(), "the secret is never shown again");
    let res = app.proxy_get(&s.site_id, "/", &s.token).await;
    assert_eq!(res.status(), 200);
    let plan_seen = s.origin.last().headers["x-payfence-plan"].clone();
    assert_eq!(plan_seen, "business");
    // Four allowed this minute (the refused one took nothing), of the new plan's 600.
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("596"));
    let logs = app.logs(&s.owner, &s.site_id, "limit=1").await;
    assert_eq!(logs["items"][0]["plan"], "business");

    // Label and consumer: set, and removed with "".
    let res = app
        .patch(
            &s.owner,
            &token,
            json!({"label": "ACME", "consumer": "carol"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let carol = app.jwt("carol", Role::Consumer);
    let mine: Value = app.get_json(&carol, "/api/me/tokens").await;
    assert_eq!(mine["items"][0]["token_id"], s.token_id.as_str());
    assert_eq!(mine["items"][0]["label"], "ACME");
    let t: Value = app
        .patch(&s.owner, &token, json!({"consumer": ""}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&t["consumer"], &t["label"]),
        (&Value::Null, &json!("ACME"))
    );
    let mine: Value = app.get_json(&carol, "/api/me/tokens").await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 0);

    // Bad changes are refused by field and change nothing.
    for (body, field) in [
        (json!({"plan_id": "plan_0000000000000000"}), "plan_id"),
        (json!({"plan_id": null}), "plan_id"),
        (json!({"label": 5}), "label"),
        (json!({"label": "x".repeat(101)}), "label"),
        (json!({"consumer": "a\nb"}), "consumer"),
        (json!({"token": "pf_live_x"}), "token"),
    ] {
        let res = app.patch(&s.owner, &token, body.clone()).await;
        assert_eq!(res.status(), 422, "{body}");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], field, "{body}");
    }
    let mallory = app.jwt("mallory", Role::SiteOwner);
    let body = json!({"label": "mine"});
    assert_eq!(
        app.patch(&mallory, &token, body.clone()).await.status(),
        404
    );
    assert_eq!(app.patch(&carol, &token, body.clone()).await.status(), 403);
    let ghost = format!("/api/sites/{}/tokens/tok_0000000000000000", s.site_id);
    assert_eq!(
        app.patch(&s.owner, &ghost, body.clone()).await.status(),
        404
    );
    let t: Value = app.get_json(&s.owner, &token).await;
    assert_eq!(
        (&t["label"], &t["plan_id"]),
        (&json!("ACME"), &json!(business))
    );

    // A revoked token stays revoked.
    assert_eq!(app.delete(&s.owner, &token).await.status(), 204);
    let res = app.patch(&s.owner, &token, body).await;
    assert_eq!(res.status(), 409);
    let p: Value = res.json().await.unwrap();
    assert_eq!(
        p["detail"],
        "the token is revoked, which is final: issue a new one"
    );
    assert_eq!(app.proxy_get(&s.site_id, "/", &s.token).await.status(), 403);

    let trail: Value = app.get_json(&s.owner, "/api/audit-trail").await;
    let actions: Vec<&str> = trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions[..4],
        [
            "token.revoke",
            "token.update",
            "token.update",
            "token.update"
        ]
    );
    assert_eq!(trail["items"][1]["target"], s.token_id.as_str());
}

#[tokio::test]
async fn deleting_a_site_revokes_its_tokens_and_keys_and_removes_it() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let key = app.create_key(&s.owner, &s.site_id).await;
    let authorize = || {
        app.http
            .post(app.url("/v1/authorize"))
            .bearer_auth(&key)
            .json(&json!({"token": s.token, "method": "GET", "path": "/"}))
            .send()
    };
    assert_eq!(app.proxy_get(&s.site_id, "/", &s.token).await.status(), 200);
    assert_eq!(authorize().await.unwrap().status(), 200);
    let site = format!("/api/sites/{}", s.site_id);
    let token = format!("{site}/tokens/{}", s.token_id);
    let other = app.jwt("mallory", Role::SiteOwner);
    assert_eq!(app.delete(&other, &site).await.status(), 404);
    assert_eq!(app.get(&s.owner, &site).await.status(), 200);

    assert_eq!(app.delete(&s.owner, &site).await.status(), 204);
    assert_eq!(app.get(&s.owner, &site).await.status(), 404);
    assert_eq!(
        app.get(&s.owner, &format!("{site}/plans")).await.status(),
        404
    );
    assert_eq!(app.delete(&s.owner, &site).await.status(), 404);
    let sites: Value = app.get_json(&s.owner, "/api/sites").await;
    assert_eq!(sites["items"].as_array().unwrap().len(), 0);
    // Its token and its API key no longer work, and the token shows as revoked.
    assert_eq!(app.proxy_get(&s.site_id, "/", &s.token).await.status(), 404);
    assert_eq!(authorize().await.unwrap().status(), 401);
    let stored = app
        .local
        .state
        .store()
        .get_token(&s.site_id, &s.token_id)
        .await
        .unwrap()
        .unwrap();
    assert!(stored.revoked_at.is_some());
    assert_eq!(app.get(&s.owner, &token).await.status(), 404);
    let admin = app.jwt("root", Role::Admin);
    let trail: Value = app.get_json(&admin, "/api/audit-trail").await;
    assert_eq!(trail["items"][0]["action"], "site.delete");
    assert_eq!(trail["items"][0]["site_id"], s.site_id.as_str());
    // Its owner still sees its own changes to the site, the deletion included.
    let mine: Value = app.get_json(&s.owner, "/api/audit-trail").await;
    let actions: Vec<&str> = mine["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions.first(), Some(&"site.delete"));
    assert!(actions.contains(&"site.create"), "{actions:?}");
}

/// Tokens issued on a site while it is deleted: every token issued is revoked once
/// the deletion has answered `204` (those issued after the site's tokens were
/// listed, in a later pass; after a second deletion if the first gave up, `409`).
#[tokio::test]
async fn a_site_deleted_while_tokens_are_issued_on_it_leaves_no_active_token() {
    let app = spawn_app_unthrottled().await;
    for offset in [-1000, 0, 300, 1000, 3000, 8000] {
        let s = app.setup(600, 1000).await;
        let (site, tokens) = (
            format!("/api/sites/{}", s.site_id),
            format!("/api/sites/{}/tokens", s.site_id),
        );
        let after =
            |us: i64| tokio::time::sleep(std::time::Duration::from_micros(us.max(0) as u64));
        let issue = |i: i64| {
            let (app, tokens, s) = (&app, &tokens, &s);
            async move {
                after(-offset + i * 200).await;
                let res = app
                    .post(&s.owner, tokens, json!({"plan_id": s.plan_id}))
                    .await;
                let status = res.status().as_u16();
                (status, res.json::<Value>().await.unwrap())
            }
        };
        let delete = async {
            after(offset).await;
            app.delete(&s.owner, &site).await.status().as_u16()
        };
        let (deleted, issued) =
            tokio::join!(delete, futures_util::future::join_all((0..6).map(issue)));
        let mut statuses = vec![deleted];
        if deleted == 409 {
            statuses.push(app.delete(&s.owner, &site).await.status().as_u16());
        }
        assert_eq!(statuses.last(), Some(&204), "offset {offset}: {statuses:?}");
        let store = app.local.state.store();
        for (status, body) in issued {
            match status {
                201 => {
                    let id = body["token_id"].as_str().unwrap();
                    let t = store.get_token(&s.site_id, id).await.unwrap().unwrap();
                    assert!(t.revoked_at.is_some(), "offset {offset}: {id} still active");
                }
                404 | 409 | 422 => {}
                other => panic!("offset {offset}: {other} {body}"),
            }
        }
    }
}

/// Tokens issued on a site all through its deletion, by eight clients: the deletion
/// either catches up with them or gives up with `409` (after three passes); asked
/// again once they stop, it finishes, and every token issued is revoked.
#[tokio::test]
async fn a_site_deleted_while_tokens_keep_being_issued_gives_up_or_catches_up() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let app = spawn_app_unthrottled().await;
    let s = app.setup(600, 1000).await;
    let (site, tokens) = (
        format!("/api/sites/{}", s.site_id),
        format!("/api/sites/{}/tokens", s.site_id),
    );
    let done = AtomicBool::new(false);
    let issuer = || async {
        let mut issued = Vec::new();
        while !done.load(Ordering::Relaxed) {
            let res = app
                .post(&s.owner, &tokens, json!({"plan_id": s.plan_id}))
                .await;
            match res.status().as_u16() {
                201 => {
                    let body: Value = res.json().await.unwrap();
                    issued.push(body["token_id"].as_str().unwrap().to_owned());
                }
                404 | 409 | 422 => {}
                other => panic!("{other}"),
            }
        }
        issued
    };
    let delete = async {
        // Let the issuers get going first.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let first = app.delete(&s.owner, &site).await.status().as_u16();
        done.store(true, Ordering::Relaxed);
        first
    };
    let (first, issued) = tokio::join!(
        delete,
        futures_util::future::join_all((0..8).map(|_| issuer()))
    );
    let second = match first {
        204 => None,
        409 => Some(app.delete(&s.owner, &site).await.status().as_u16()),
        other => panic!("the deletion answered {other}"),
    };
    assert!(
        matches!(second, None | Some(204)),
        "{first} then {second:?}"
    );
    let store = app.local.state.store();
    let issued: Vec<String> = issued.into_iter().flatten().collect();
    assert!(!issued.is_empty());
    for id in &issued {
        let t = store.get_token(&s.site_id, id).await.unwrap().unwrap();
        assert!(t.revoked_at.is_some(), "{id} still active");
    }
}

/// Deleting a plan sees, and deleting a site revokes, the tokens beyond the first
/// page of the site's token list (pages of 1000). On the embedded store
/// only: the paging is the dashboard's (each store's pages are checked in
/// conformance.rs), and 1001 tokens take the DynamoDB test server minutes.
#[tokio::test]
async fn deleting_a_plan_or_a_site_reaches_every_token_however_many() {
    use futures_util::{StreamExt, TryStreamExt};
    use payfence_core::domain::Token;
    let dir = tempfile::tempdir().unwrap();
    let local = payfence_local::Local::open(dir.path(), test_config()).unwrap();
    let app = spawn_local(local, dir).await;
    let s = app.setup(600, 1000).await;
    let other = app
        .create_named_plan(&s.owner, &s.site_id, "other", 60, 10)
        .await;
    let store = app.local.state.store().clone();
    let token = |token_id: String, plan_id: &str| Token {
        token_id,
        site_id: s.site_id.clone(),
        plan_id: plan_id.to_owned(),
        token_hash: payfence_core::ids::hash_secret(&payfence_core::ids::consumer_token()),
        label: None,
        consumer: None,
        created_at: 1,
        revoked_at: None,
    };
    // 1000 tokens on the setup plan; the last token of all, on `other`, is on page 2.
    let mut tokens: Vec<Token> = (0..1000)
        .map(|_| token(payfence_core::ids::token_id(), &s.plan_id))
        .collect();
    tokens.push(token("tok_ffffffffffffffff".into(), &other));
    futures_util::stream::iter(tokens)
        .map(|t| {
            let store = store.clone();
            async move { store.create_token(&t).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let res = app
        .delete(&s.owner, &format!("/api/sites/{}/plans/{other}", s.site_id))
        .await;
    assert_eq!(res.status(), 409);
    let p: Value = res.json().await.unwrap();
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .starts_with("1 active token(s)"),
        "{p}"
    );
    let res = app
        .delete(&s.owner, &format!("/api/sites/{}", s.site_id))
        .await;
    assert_eq!(res.status(), 204);
    for id in [s.token_id.as_str(), "tok_ffffffffffffffff"] {
        let stored = store.get_token(&s.site_id, id).await.unwrap().unwrap();
        assert!(stored.revoked_at.is_some(), "{id}");
    }
    let (mut after, mut active) = (None, 0);
    loop {
        let page = (store.list_tokens_page(&s.site_id, 1000, after.as_deref()))
            .await
            .unwrap();
        active += page.items.iter().filter(|t| t.revoked_at.is_none()).count();
        match page.next_cursor {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(active, 0);
}

#[tokio::test]
async fn the_token_list_comes_in_pages_with_each_tokens_usage() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let business = app
        .create_named_plan(&s.owner, &s.site_id, "business", 600, 5000)
        .await;
    // The use counted this minute is checked too: keep the uses within one minute.
    avoid_minute_boundary().await;
    app.proxy_get(&s.site_id, "/", &s.token).await;
    // (token id, this month's use, its plan's quota), one token on each plan per use count.
    let mut issued = vec![(s.token_id.clone(), 1, 1000)];
    for i in 0..4u64 {
        let (plan_id, quota) = if i % 2 == 0 {
            (&s.plan_id, 1000)
        } else {
            (&business, 5000)
        };
        let res = app
            .post(
                &s.owner,
                &format!("/api/sites/{}/tokens", s.site_id),
                json!({"plan_id": plan_id, "label": format!("t{i}")}),
            )
            .await;
        let t: Value = res.json().await.unwrap();
        for _ in 0..i {
            let res = app
                .proxy_get(&s.site_id, "/", t["token"].as_str().unwrap())
                .await;
            assert_eq!(res.status(), 200);
        }
        issued.push((t["token_id"].as_str().unwrap().to_owned(), i, quota));
    }
    issued.sort();
    let mut listed = Vec::new();
    let tokens = format!("/api/sites/{}/tokens", s.site_id);
    for page in app.pages(&s.owner, &tokens, "limit=2").await {
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        assert!(items.iter().all(|t| t.get("token").is_none()), "no secrets");
        for t in items {
            let u = &t["usage"];
            let (used, quota) = (u["used"].as_u64().unwrap(), u["monthly_quota"].as_u64());
            let plan = if quota == Some(1000) {
                "pro"
            } else {
                "business"
            };
            assert_eq!(t["plan"], plan, "{t}");
            assert_eq!(u["remaining"].as_u64(), Some(quota.unwrap() - used));
            assert_eq!(u["last_minute"].as_u64(), Some(used), "{t}");
            assert_eq!(u["requests_per_minute"], 600);
            let id = t["token_id"].as_str().unwrap().to_owned();
            listed.push((id, used, quota.unwrap()));
        }
    }
    assert_eq!(listed, issued);
    let all: Value = app
        .get_json(&s.owner, &format!("/api/sites/{}/tokens", s.site_id))
        .await;
    assert_eq!(all["items"].as_array().unwrap().len(), 5);
    assert_eq!(all["next_cursor"], Value::Null);
}

/// A token revoked more than 90 days ago is history past its keeping: no list shows
/// it and it cannot be read, changed or revoked (404), on either store (DynamoDB's
/// TTL may delete it days late). Once the embedded store's hourly purge has run,
/// its secret is as unknown as any (401); a token revoked since still gets 403.
#[tokio::test]
async fn a_token_revoked_over_90_days_ago_is_no_longer_shown_then_deleted() {
    use payfence_core::domain::{now_ms, REVOKED_KEPT_SECS};
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let tokens = format!("/api/sites/{}/tokens", s.site_id);
    let mut issued = Vec::new(); // (id, secret): revoked long ago, just now; active
    for _ in 0..3 {
        let res = (app.post(
            &s.owner,
            &tokens,
            json!({"plan_id": s.plan_id, "consumer": "carol"}),
        ))
        .await
        .json::<Value>()
        .await
        .unwrap();
        let field = |f: &str| res[f].as_str().unwrap().to_owned();
        issued.push((field("token_id"), field("token")));
    }
    let store = app.local.state.store().clone();
    let long_ago = now_ms() / 1000 - REVOKED_KEPT_SECS;
    (store.revoke_token(&s.site_id, &issued[0].0, long_ago))
        .await
        .unwrap()
        .unwrap();
    let res = app
        .delete(&s.owner, &format!("{tokens}/{}", issued[1].0))
        .await;
    assert_eq!(res.status(), 204);
    let carol = app.jwt("carol", Role::Consumer);
    let (old, recent, active) = (&issued[0].0, &issued[1].0, &issued[2].0);
    for (jwt, path, filter, wanted) in [
        (
            &s.owner,
            tokens.as_str(),
            "",
            vec![&s.token_id, recent, active],
        ),
        (&s.owner, &tokens, "status=revoked&", vec![recent]),
        (&carol, "/api/me/tokens", "", vec![recent, active]),
    ] {
        let mut wanted: Vec<&str> = wanted.into_iter().map(String::as_str).collect();
        wanted.sort();
        for limit in [1, 100] {
            let mut listed = Vec::new();
            for page in app
                .pages(jwt, path, &format!("{filter}limit={limit}"))
                .await
            {
                for t in page["items"].as_array().unwrap() {
                    listed.push(t["token_id"].as_str().unwrap().to_owned());
                }
            }
            assert_eq!(listed, wanted, "{path}?{filter}limit={limit}");
        }
    }
    let it = format!("{tokens}/{old}");
    assert_eq!(app.get(&s.owner, &it).await.status(), 404);
    let res = app.patch(&s.owner, &it, json!({"label": "x"})).await;
    assert_eq!(res.status(), 404);
    assert_eq!(app.delete(&s.owner, &it).await.status(), 404);
    if std::env::var("PAYFENCE_TEST_STORE").as_deref() == Ok("dynamodb") {
        return; // the test server does not run TTL
    }
    store.purge_expired(now_ms() / 1000).await.unwrap();
    for ((_, secret), status, reason) in [
        (&issued[0], 401, "invalid_token"),
        (&issued[1], 403, "token_revoked"),
        (&issued[2], 200, ""),
    ] {
        let res = app.proxy_get(&s.site_id, "/x", secret).await;
        assert_eq!(res.status(), status, "{reason}");
        if status != 200 {
            assert_eq!(res.json::<Value>().await.unwrap()["reason"], reason);
        }
    }
}

#[tokio::test]
async fn the_token_list_narrows_to_a_plan_a_status_or_a_consumer() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let business = app
        .create_named_plan(&s.owner, &s.site_id, "business", 600, 5000)
        .await;
    let tokens = format!("/api/sites/{}/tokens", s.site_id);
    // (id, plan, consumer, revoked): the setup's token, then four more.
    let mut issued = vec![(s.token_id.clone(), s.plan_id.clone(), None, false)];
    for (plan, consumer, revoked) in [
        (&s.plan_id, Some("carol"), false),
        (&s.plan_id, None, true),
        (&business, Some("carol"), false),
        (&business, Some("carol/x"), false),
    ] {
        let res = app
            .post(
                &s.owner,
                &tokens,
                json!({"plan_id": plan, "consumer": consumer}),
            )
            .await;
        let id = res.json::<Value>().await.unwrap()["token_id"]
            .as_str()
            .unwrap()
            .to_owned();
        if revoked {
            let res = app.delete(&s.owner, &format!("{tokens}/{id}")).await;
            assert_eq!(res.status(), 204);
        }
        issued.push((id, plan.clone(), consumer.map(String::from), revoked));
    }
    issued.sort();
    let carol = Some("carol".to_owned());
    type Wanted<'a> = &'a dyn Fn(&(String, String, Option<String>, bool)) -> bool;
    let cases: [(String, Wanted); 6] = [
        (format!("plan_id={business}"), &|t| t.1 == business),
        ("status=revoked".into(), &|t| t.3),
        ("status=active".into(), &|t| !t.3),
        ("consumer=carol".into(), &|t| t.2 == carol),
        (
            format!("consumer=carol&plan_id={business}&status=active"),
            &|t| t.2 == carol && t.1 == business,
        ),
        ("consumer=nobody".into(), &|_| false),
    ];
    for (filter, wanted) in cases {
        let wanted: Vec<&str> = (issued.iter().filter(|t| wanted(t)))
            .map(|t| t.0.as_str())
            .collect();
        for limit in [1, 100] {
            let mut listed = Vec::new();
            for page in app
                .pages(&s.owner, &tokens, &format!("{filter}&limit={limit}"))
                .await
            {
                let items = page["items"].as_array().unwrap();
                assert!(items.len() <= limit, "{filter}");
                for t in items {
                    assert!(t["usage"]["used"].is_u64(), "{t}");
                    listed.push(t["token_id"].as_str().unwrap().to_owned());
                }
            }
            assert_eq!(listed, wanted, "{filter}, limit {limit}");
        }
    }
    for (query, field) in [
        ("status=gone", "status"),
        ("plan_id=pro", "plan_id"),
        ("plan=pro", "plan"),
    ] {
        let res = app.get(&s.owner, &format!("{tokens}?{query}")).await;
        assert_eq!(res.status(), 422, "{query}");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], field);
    }
}

#[tokio::test]
async fn a_sites_usage_sums_this_months_use_by_plan_in_as_many_answers_as_asked() {
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let site = format!("/api/sites/{}", s.site_id);
    let business = app
        .create_named_plan(&s.owner, &s.site_id, "business", 600, 5000)
        .await;
    let unused = app
        .create_named_plan(&s.owner, &s.site_id, "unused", 600, 10)
        .await;
    // (plan, uses, revoked after): the setup's token is used twice.
    let uses = [
        (&s.plan_id, 1, false),
        (&s.plan_id, 0, false),
        (&business, 3, false),
        (&business, 1, true),
    ];
    for (plan, n, revoked) in uses {
        let (id, token) = app.create_token(&s.owner, &s.site_id, plan).await;
        for _ in 0..n {
            assert_eq!(app.proxy_get(&s.site_id, "/", &token).await.status(), 200);
        }
        if revoked {
            let res = app.delete(&s.owner, &format!("{site}/tokens/{id}")).await;
            assert_eq!(res.status(), 204);
        }
    }
    for _ in 0..2 {
        let res = app.proxy_get(&s.site_id, "/", &s.token).await;
        assert_eq!(res.status(), 200);
    }
    let line = |u: &Value, plan: &str| -> (Value, u64, u64) {
        let line = (u["plans"].as_array().unwrap().iter())
            .find(|l| l["plan_id"] == plan)
            .unwrap_or_else(|| panic!("{plan} in {u}"));
        let n = |f: &str| line[f].as_u64().unwrap();
        (line["name"].clone(), n("active_tokens"), n("used"))
    };
    let all = app.get_json(&s.owner, &format!("{site}/usage")).await;
    assert_eq!(
        (&all["tokens_read"], &all["active_tokens"], &all["used"]),
        (&json!(5), &json!(4), &json!(7)),
        "{all}"
    );
    assert_eq!(all["next_cursor"], Value::Null);
    assert!(all["period"].as_u64().unwrap() > 202600 && all["resets_at"].is_u64());
    assert_eq!(line(&all, &s.plan_id), (json!("pro"), 3, 3));
    assert_eq!(line(&all, &business), (json!("business"), 1, 4));
    assert_eq!(line(&all, &unused), (json!("unused"), 0, 0));
    // Two tokens an answer: three answers, whose sums add up to the whole.
    let pages = app
        .pages(&s.owner, &format!("{site}/usage"), "limit=2")
        .await;
    assert_eq!(pages.len(), 3);
    let total = |f: &str| pages.iter().map(|p| p[f].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        (total("tokens_read"), total("active_tokens"), total("used")),
        (5, 4, 7)
    );
    let plan_used = |plan: &str| pages.iter().map(|p| line(p, plan).2).sum::<u64>();
    assert_eq!((plan_used(&s.plan_id), plan_used(&business)), (3, 4));
    // A deleted plan's use this month stays, under its id.
    let business_tokens = app
        .pages(
            &s.owner,
            &format!("{site}/tokens"),
            &format!("plan_id={business}&status=active"),
        )
        .await;
    for t in business_tokens[0]["items"].as_array().unwrap() {
        let id = t["token_id"].as_str().unwrap();
        assert_eq!(
            app.delete(&s.owner, &format!("{site}/tokens/{id}"))
                .await
                .status(),
            204
        );
    }
    let res = app
        .delete(&s.owner, &format!("{site}/plans/{business}"))
        .await;
    assert_eq!(res.status(), 204);
    let all = app.get_json(&s.owner, &format!("{site}/usage")).await;
    assert_eq!(line(&all, &business), (Value::Null, 0, 4));
    assert_eq!(
        (&all["active_tokens"], &all["used"]),
        (&json!(3), &json!(7))
    );
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("cursor=x", "cursor"),
        ("plan_id=x", "plan_id"),
    ] {
        let res = app.get(&s.owner, &format!("{site}/usage?{query}")).await;
        assert_eq!(res.status(), 422, "{query}");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], field);
    }
    let mallory = app.jwt("mallory", Role::SiteOwner);
    assert_eq!(
        app.get(&mallory, &format!("{site}/usage")).await.status(),
        404
    );
    let carol = app.jwt("carol", Role::Consumer);
    assert_eq!(
        app.get(&carol, &format!("{site}/usage")).await.status(),
        403
    );
}

async fn rename_origin(app: &App, s: &Setup, origin_url: &str) -> u16 {
    app.patch(
        &s.owner,
        &format!("/api/sites/{}", s.site_id),
        json!({"origin_url": origin_url}),
    )
    .await
    .status()
    .as_u16()
}

/// Records past their 90 days are never listed or exported, even before the store
/// deletes them (DynamoDB's TTL can take two days; the local server purges hourly).
#[tokio::test]
async fn records_past_their_retention_are_never_listed_or_exported() {
    use payfence_core::domain::{
        audit_expires_at, now_ms, rfc3339_ms, AuditRecord, DecisionKind, Mode, Reason,
        AUDIT_RETENTION_SECS,
    };
    let app = spawn_app().await;
    let s = app.setup(600, 1000).await;
    let retention_ms = AUDIT_RETENTION_SECS * 1000;
    for (ts_ms, path) in [
        (now_ms() - retention_ms - 10_000, "/expired"),
        (now_ms() - retention_ms + 60_000, "/kept"),
    ] {
        let record = AuditRecord {
            id: payfence_core::ids::log_id(ts_ms * 1000),
            timestamp: rfc3339_ms(ts_ms),
            ts_ms,
            site_id: s.site_id.clone(),
            token_id: None,
            plan: None,
            method: "GET".into(),
            path: path.into(),
            decision: DecisionKind::Deny,
            reason: Some(Reason::InvalidToken),
            remaining: None,
            latency_ms: 0.1,
            mode: Mode::Proxy,
            expires_at: audit_expires_at(ts_ms),
        };
        app.local.state.store().append_audit(record).await.unwrap();
    }
    let paths = |items: Vec<Value>| -> Vec<String> {
        let path = |r: &Value| r["path"].as_str().unwrap().to_owned();
        items.iter().map(path).collect()
    };
    for query in ["", "from=0", "from=2000-01-01T00:00:00Z&decision=deny"] {
        let page = app.logs(&s.owner, &s.site_id, query).await;
        let items = page["items"].as_array().unwrap().clone();
        assert_eq!(paths(items), ["/kept"], "{query}");
    }
    let export = app
        .get(
            &s.owner,
            &format!("/api/sites/{}/logs/export?from=0", s.site_id),
        )
        .await
        .text()
        .await
        .unwrap();
    let lines = export.lines().map(|l| serde_json::from_str(l).unwrap());
    assert_eq!(paths(lines.collect()), ["/kept"]);
    // A window that ended before the retention's start holds nothing.
    let old = app.logs(&s.owner, &s.site_id, "from=0&to=86400").await;
    assert_eq!(old["items"], json!([]));
}

#[tokio::test]
async fn logs_filter_paginate_and_export() {
    let app = spawn_app().await;
    let s = app.setup(10_000, 1000).await;
    for i in 0..5 {
        app.proxy_get(&s.site_id, &format!("/v1/flights/{i}"), &s.token)
            .await;
    }
    for _ in 0..3 {
        app.proxy_get(&s.site_id, "/v1/hotels", "bad").await;
    }
    let key = app.create_key(&s.owner, &s.site_id).await;
    let res = app
        .authorize(
            &key,
            json!({"token": s.token, "method": "GET", "path": "/v1/cars"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let q = |query: &str| {
        let query = query.to_owned();
        let (app, s) = (&app, &s);
        async move { app.logs(&s.owner, &s.site_id, &query).await }
    };
    assert_eq!(q("").await["items"].as_array().unwrap().len(), 9);
    // API.md's template, every parameter empty: no filter.
    let empty = "token_id=&plan=&decision=&reason=&from=&to=&path_prefix=&limit=&cursor=";
    assert_eq!(q(empty).await["items"].as_array().unwrap().len(), 9);
    assert_eq!(
        q("decision=allow").await["items"].as_array().unwrap().len(),
        6
    );
    assert_eq!(q("mode=proxy").await["items"].as_array().unwrap().len(), 8);
    let middleware = q("mode=middleware").await;
    assert_eq!(middleware["items"].as_array().unwrap().len(), 1);
    assert_eq!(middleware["items"][0]["path"], "/v1/cars");
    assert_eq!(
        q("decision=deny&reason=invalid_token").await["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        q(&format!("token_id={}", s.token_id)).await["items"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
    assert_eq!(q("plan=pro").await["items"].as_array().unwrap().len(), 6);
    assert_eq!(
        q("path_prefix=/v1/hotels").await["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        q("from=2000-01-01T00:00:00Z&to=2001-01-01T00:00:00Z").await["items"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // Cursor pages: newest first, no duplicates, nothing lost.
    let mut seen = Vec::new();
    let logs = format!("/api/sites/{}/logs", s.site_id);
    for page in app.pages(&s.owner, &logs, "limit=3").await {
        for item in page["items"].as_array().unwrap() {
            seen.push((
                item["ts_ms"].as_u64().unwrap(),
                item["id"].as_str().unwrap().to_owned(),
            ));
        }
    }
    assert_eq!(seen.len(), 9);
    assert!(seen.windows(2).all(|w| w[0] >= w[1]));

    let res = app
        .get(
            &s.owner,
            &format!(
                "/api/sites/{}/logs/export?format=ndjson&decision=allow",
                s.site_id
            ),
        )
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "content-type"), Some("application/x-ndjson"));
    let text = res.text().await.unwrap();
    assert_eq!(text.lines().count(), 6);
    assert!(text
        .lines()
        .all(|l| serde_json::from_str::<Value>(l).unwrap()["decision"] == "allow"));
    let csv = app
        .get(
            &s.owner,
            &format!("/api/sites/{}/logs/export?format=csv", s.site_id),
        )
        .await
        .text()
        .await
        .unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "id,timestamp,site_id,token_id,plan,method,path,decision,reason,remaining,latency_ms,mode"
    );
    assert_eq!(lines.count(), 9);
    assert_eq!(
        app.get(
            &s.owner,
            &format!("/api/sites/{}/logs/export?format=xml", s.site_id)
        )
        .await
        .status(),
        422
    );

    // A misspelt or unknown parameter is refused, not read as "no filter".
    for (path, field) in [
        ("logs?decison=deny", "decison"),
        ("logs?mode=lambda", "mode"),
        ("logs/export?format=csv&limit=5", "limit"),
        ("tokens?plan=pro", "plan"),
        ("tokens?limit=&plan=pro", "plan"),
    ] {
        let res = app
            .get(&s.owner, &format!("/api/sites/{}/{path}", s.site_id))
            .await;
        assert_eq!(res.status(), 422, "{path}");
        assert_eq!(res.json::<Value>().await.unwrap()["field"], field, "{path}");
    }
    let res = app.get(&s.owner, "/api/audit-trail?since=yesterday").await;
    assert_eq!(res.status(), 422);
    assert_eq!(res.json::<Value>().await.unwrap()["field"], "since");
}

#[tokio::test]
async fn own_endpoints_carry_security_headers_and_are_rate_limited() {
    let app = spawn_app_with(Config {
        dashboard_requests_per_second: 5,
        ..test_config()
    })
    .await;
    let owner = app.jwt("alice", Role::SiteOwner);
    for path in ["/api/health", "/api/sites", "/api/nowhere"] {
        let res = app.get(&owner, path).await;
        for (h, v) in [
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("content-security-policy", "default-src 'none'"),
            ("referrer-policy", "no-referrer"),
        ] {
            assert_eq!(header(&res, h), Some(v), "{path} {h}");
        }
        assert!(header(&res, "strict-transport-security").is_some());
        assert!(header(&res, "x-payfence-request-id").is_some());
    }
    let mut limited = None;
    for _ in 0..20 {
        let res = app.get(&owner, "/api/sites").await;
        assert!(header(&res, "x-ratelimit-limit").is_some());
        if res.status() == 429 {
            limited = Some(res);
            break;
        }
    }
    let res = limited.expect("the dashboard limit applies");
    assert!(header(&res, "retry-after").is_some());
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("0"));
}

/// Health needs no credential and every call probes the store, so it is limited per
/// client address, with the same headers as the rest.
#[tokio::test]
async fn health_is_rate_limited_per_client() {
    let app = spawn_app_with(Config {
        health_requests_per_second: 3,
        ..test_config()
    })
    .await;
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap()
    };
    let (first, second) = (from([127, 0, 0, 1]), from([127, 0, 0, 2]));
    let mut limited = None;
    for _ in 0..20 {
        let res = first.get(app.url("/api/health")).send().await.unwrap();
        assert_eq!(header(&res, "x-ratelimit-limit"), Some("3"));
        assert!(header(&res, "ratelimit-policy").is_some());
        if res.status() == 429 {
            limited = Some(res);
            break;
        }
        assert_eq!(res.status(), 200);
        assert!(header(&res, "x-ratelimit-remaining").is_some());
    }
    let res = limited.expect("the health limit applies");
    assert_eq!(header(&res, "retry-after"), Some("1"));
    assert_eq!(header(&res, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    assert!(header(&res, "x-payfence-request-id").is_some());
    // Another client is not held back by the first one's calls.
    let res = second.get(app.url("/api/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    // The limit is per second: the first client is served again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let res = first.get(app.url("/api/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn health_reports_the_store() {
    let app = spawn_app().await;
    let res = app.http.get(app.url("/api/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let h: Value = res.json().await.unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["checks"]["store"]["status"], "ok");
    let latency = &h["checks"]["store"]["latency_ms"];
    assert!(is_ms_to_the_microsecond(latency), "{latency}");
    assert!(h["version"].is_string());
}

#[tokio::test]
async fn jwks_are_fetched_from_a_url_as_with_cognito() {
    let app = spawn_app().await;
    let client = payfence_core::origin::origin_client(true, std::time::Duration::from_secs(2));
    let verifier = payfence_core::auth::JwtVerifier::with_url(
        payfence_local::ISSUER,
        payfence_local::AUDIENCE,
        &app.url("/.well-known/jwks.json"),
        client,
    );
    let token = app.jwt("dana", Role::Admin);
    let p = verifier.verify(&token).await.unwrap();
    assert_eq!((p.sub.as_str(), p.role), ("dana", Role::Admin));
    let other_dir = tempfile::tempdir().unwrap();
    let other = payfence_local::Issuer::load_or_create(other_dir.path()).unwrap();
    let foreign = other.token("dana", Role::Admin, std::time::Duration::from_secs(60));
    assert!(verifier.verify(&foreign).await.is_err());
}

/// While the JWKS cannot be fetched, a token signed with a key not yet known is
/// "unavailable" (the dashboard's 503, so the SPA retries), not "invalid" (a 401
/// that logs the user out); once the JWKS answers again, the token is accepted.
#[tokio::test]
async fn a_failed_jwks_fetch_is_unavailable_not_unauthorized_and_is_retried() {
    use axum::response::IntoResponse;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let app = spawn_app().await;
    let jwks: Value = app
        .http
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let up = Arc::new(AtomicBool::new(false));
    let serve = {
        let up = up.clone();
        axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || async move {
                if up.load(Ordering::SeqCst) {
                    axum::Json(jwks).into_response()
                } else {
                    http::StatusCode::SERVICE_UNAVAILABLE.into_response()
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, serve).await });

    let client = payfence_core::origin::origin_client(true, std::time::Duration::from_secs(2));
    let verifier = payfence_core::auth::JwtVerifier::with_url(
        payfence_local::ISSUER,
        payfence_local::AUDIENCE,
        &url,
        client,
    );
    let token = app.jwt("dana", Role::Admin);
    let unavailable = |r: Result<_, AuthError>| matches!(r, Err(AuthError::KeysUnavailable(_)));
    assert!(unavailable(verifier.verify(&token).await));
    // Back up, but the failure is only retried after a pause: still unavailable.
    up.store(true, Ordering::SeqCst);
    assert!(unavailable(verifier.verify(&token).await));
    tokio::time::sleep(std::time::Duration::from_millis(5100)).await;
    let p = verifier.verify(&token).await.unwrap();
    assert_eq!((p.sub.as_str(), p.role), ("dana", Role::Admin));
}

#[tokio::test]
async fn a_dashboard_on_a_configured_origin_may_call_the_api_from_the_browser() {
    let app = spawn_app_with(Config {
        dashboard_origins: vec!["https://dash.example.com".into()],
        ..test_config()
    })
    .await;
    let owner = app.jwt("alice", Role::SiteOwner);
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/api/sites"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };

    // The browser's preflight carries no JWT and must still succeed.
    let res = preflight("https://dash.example.com").await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(
        header(&res, "access-control-allow-origin"),
        Some("https://dash.example.com")
    );
    let methods = header(&res, "access-control-allow-methods")
        .unwrap()
        .to_owned();
    assert!(
        methods.contains("POST") && methods.contains("DELETE"),
        "{methods}"
    );
    let headers = header(&res, "access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("authorization") && headers.contains("content-type"));

    // The call itself is authenticated as ever, and readable by that origin.
    let list_sites = |origin: &'static str, jwt: Option<&str>| {
        let req = app.http.get(app.url("/api/sites")).header("origin", origin);
        match jwt {
            Some(jwt) => req.bearer_auth(jwt),
            None => req,
        }
        .send()
    };
    let res = list_sites("https://dash.example.com", Some(&owner))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        header(&res, "access-control-allow-origin"),
        Some("https://dash.example.com")
    );
    assert!(header(&res, "access-control-expose-headers")
        .unwrap()
        .contains("x-payfence-request-id"));
    let res = list_sites("https://dash.example.com", None).await.unwrap();
    assert_eq!(res.status(), 401);

    // Another origin gets no CORS headers: its pages cannot read anything.
    let res = preflight("https://evil.example").await.unwrap();
    assert_eq!(header(&res, "access-control-allow-origin"), None);
    let res = list_sites("https://evil.example", Some(&owner))
        .await
        .unwrap();
    assert_eq!(header(&res, "access-control-allow-origin"), None);

    // Without configured origins there is no CORS at all.
    let plain = spawn_app().await;
    let res = plain
        .http
        .request(reqwest::Method::OPTIONS, plain.url("/api/sites"))
        .header("origin", "https://dash.example.com")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&res, "access-control-allow-origin"), None);
}
