//! `main.rs` wiring: the real binary against a Lambda Runtime API.

use std::path::Path;
use std::time::Duration;

use payfence_runtime_api::{url_event, Emulator};

/// The sealing key, base64 for `PAYFENCE_SEALING_KEY`, and its bytes.
const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const KEY_BYTES: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn answers_authorize_events() {
    let dir = tempfile::tempdir().unwrap();
    let unknown_key = format!("Bearer sk_{}", "0".repeat(48));
    let body = r#"{"token":"pf_live_x","method":"GET","path":"/"}"#;
    let emulator = Emulator::start(vec![
        url_event(
            "r1",
            "POST",
            "/v1/authorize",
            &[
                ("authorization", &unknown_key),
                ("content-type", "application/json"),
            ],
            Some(body),
        ),
        url_event("r2", "GET", "/v1/authorize", &[], None),
    ])
    .await;
    let answers = emulator
        .run(
            Path::new(env!("CARGO_BIN_EXE_authorize")),
            &[
                ("PAYFENCE_SEALING_KEY", KEY),
                ("PAYFENCE_DATA_DIR", dir.path().to_str().unwrap()),
            ],
            2,
        )
        .await;
    assert_eq!(emulator.init_error(), None);
    assert_eq!(answers.len(), 2, "{answers:?}");
    let (status, headers, body) = answers[0].http();
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(headers["x-payfence-request-id"].is_string());
    assert_eq!(answers[1].http().0, 405);
}

/// Lambda freezes an environment once its function asks for the next event, and
/// may end it without warning: the decision's audit record must be stored by then.
/// The emulator stops the process (`SIGSTOP`) at that point; the record must already
/// be in the table. Runs against the DynamoDB server `scripts/test.sh` starts.
#[tokio::test]
async fn the_audit_record_is_stored_before_the_environment_freezes() {
    use payfence_core::domain::{now_ms, ApiKey, AuditFilter, DecisionKind, Plan, Site, Token};
    use payfence_core::ids;
    use payfence_core::seal::SealingKey;
    use payfence_core::store::dynamo::DynamoStore;
    use payfence_core::store::{AuditStore, KeyStore, PlanStore, SiteStore, TokenStore};

    let Ok(endpoint) = std::env::var("PAYFENCE_TEST_DYNAMODB") else {
        eprintln!("PAYFENCE_TEST_DYNAMODB is not set: skipped (scripts/test.sh sets it)");
        return;
    };
    let table = format!("settle-{}", hex::encode(ids::random_bytes::<6>()));
    let store = DynamoStore::connect(&table, Some(&endpoint)).await;
    store.ensure_table().await.unwrap();

    // A site, plan, key and token, as the dashboard would create them.
    let sealing = SealingKey::from_bytes(KEY_BYTES);
    let now = now_ms() / 1000;
    let (mut site, _) = Site::new("owner", "settle", "https://origin.example", &sealing, now);
    site.site_requests_per_second = 100;
    site.failed_attempts_per_minute = 10;
    let site_id = site.site_id.clone();
    store.create_site(&site).await.unwrap();
    let plan = Plan::new(&site_id, "basic", 60, 1000, now);
    let plan_id = plan.plan_id.clone();
    store.create_plan(&plan).await.unwrap();
    let (key, api_key) = ApiKey::new(&site_id, None, now);
    store.create_key(&key).await.unwrap();
    let token = ids::consumer_token();
    let token_id = ids::token_id();
    let record = Token {
        token_id: token_id.clone(),
        site_id: site_id.clone(),
        plan_id,
        token_hash: ids::hash_secret(&token),
        label: None,
        consumer: None,
        created_at: now,
        revoked_at: None,
    };
    store.create_token(&record).await.unwrap();

    let bearer = format!("Bearer {api_key}");
    let body = serde_json::json!({"token": token, "method": "GET", "path": "/v1/x"}).to_string();
    let emulator = Emulator::start(vec![url_event(
        "r1",
        "POST",
        "/v1/authorize",
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        Some(&body),
    )])
    .await;
    emulator.freeze_when_idle();
    let mut child = emulator.spawn(
        Path::new(env!("CARGO_BIN_EXE_authorize")),
        &[
            ("PAYFENCE_SEALING_KEY", KEY),
            ("PAYFENCE_TABLE", &table),
            ("AWS_ENDPOINT_URL", &endpoint),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            // The emulator is slower than DynamoDB.
            ("PAYFENCE_DYNAMODB_ATTEMPT_TIMEOUT_MS", "10000"),
            ("PAYFENCE_DYNAMODB_TIMEOUT_MS", "30000"),
        ],
    );
    let answers = emulator.answers(1, Duration::from_secs(30)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !emulator.frozen() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let frozen = emulator.frozen();
    let page = store
        .query_audit(&site_id, &AuditFilter::default(), 10, None)
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();

    assert_eq!(emulator.init_error(), None);
    assert_eq!(answers.len(), 1);
    let (status, _, answer) = answers[0].http();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert!(frozen, "the function never asked for a second event");
    assert_eq!(
        page.items.len(),
        1,
        "audit records in the table when frozen"
    );
    assert_eq!(page.items[0].token_id.as_deref(), Some(token_id.as_str()));
    assert_eq!(page.items[0].decision, DecisionKind::Allow);
}
