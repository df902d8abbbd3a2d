//! `main.rs` wiring: the real binary against a Lambda Runtime API, answering
//! Function URL events.

use std::path::Path;

use payfence_runtime_api::{url_event, Emulator};

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // base64 of 32 bytes

#[tokio::test]
async fn answers_health_limited_per_viewer_and_refuses_requests_that_bypass_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    // Viewer addresses as CloudFront's viewer-request function passes them.
    let from = |id, viewer| {
        url_event(
            id,
            "GET",
            "/api/health",
            &[
                ("x-payfence-edge", "edge-secret"),
                ("x-payfence-client-ip", viewer),
            ],
            None,
        )
    };
    let emulator = Emulator::start(vec![
        from("r1", "203.0.113.7"),
        url_event("r2", "GET", "/api/health", &[], None),
        from("r3", "203.0.113.7"),
        from("r4", "203.0.113.7"),
        from("r5", "2001:db8::1"),
    ])
    .await;
    let answers = emulator
        .run(
            Path::new(env!("CARGO_BIN_EXE_health")),
            &[
                ("PAYFENCE_SEALING_KEY", KEY),
                ("PAYFENCE_DATA_DIR", dir.path().to_str().unwrap()),
                ("PAYFENCE_EDGE_SECRET", "edge-secret"),
                ("PAYFENCE_HEALTH_RPS", "1"),
            ],
            5,
        )
        .await;
    assert_eq!(emulator.init_error(), None);
    assert_eq!(answers.len(), 5, "{answers:?}");
    let (status, headers, body) = answers[0].http();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let (status, _, _) = answers[1].http();
    assert_eq!(status, 403, "requests without the edge secret are refused");
    // One a second per viewer: of three calls within a second or two, one is refused
    // at least; another viewer is not held back by them.
    let refused: Vec<_> = answers[2..4]
        .iter()
        .map(|a| a.http())
        .filter(|(status, _, _)| *status == 429)
        .collect();
    assert!(!refused.is_empty(), "{answers:?}");
    assert_eq!(refused[0].1["retry-after"], "1");
    assert_eq!(refused[0].1["x-ratelimit-limit"], "1");
    let (status, headers, _) = answers[4].http();
    assert_eq!(status, 200);
    assert_eq!(headers["x-ratelimit-remaining"], "0");
}
