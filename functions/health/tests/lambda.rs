//! `main.rs` wiring: the real binary against a Lambda Runtime API, answering
//! Function URL events.

use std::path::Path;

use payfence_runtime_api::{url_event, Emulator};

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // base64 of 32 bytes

#[tokio::test]
async fn answers_health_and_refuses_requests_that_bypass_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = Emulator::start(vec![
        url_event(
            "r1",
            "GET",
            "/api/health",
            &[("x-payfence-edge", "edge-secret")],
            None,
        ),
        url_event("r2", "GET", "/api/health", &[], None),
    ])
    .await;
    let answers = emulator
        .run(
            Path::new(env!("CARGO_BIN_EXE_health")),
            &[
                ("PAYFENCE_SEALING_KEY", KEY),
                ("PAYFENCE_DATA_DIR", dir.path().to_str().unwrap()),
                ("PAYFENCE_EDGE_SECRET", "edge-secret"),
            ],
            2,
        )
        .await;
    assert_eq!(emulator.init_error(), None);
    assert_eq!(answers.len(), 2, "{answers:?}");
    let (status, headers, body) = answers[0].http();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let (status, _, _) = answers[1].http();
    assert_eq!(status, 403, "requests without the edge secret are refused");
}
