//! `main.rs` wiring: the real binary against a Lambda Runtime API.

use std::path::Path;

use payfence_runtime_api::{url_event, Emulator};

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

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
