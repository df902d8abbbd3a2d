//! `main.rs` wiring: the real binary against a Lambda Runtime API, in response
//! streaming mode.

use std::path::Path;

use payfence_runtime_api::{url_event, Emulator};

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

#[tokio::test]
async fn proxy_streams_its_answers() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = Emulator::start(vec![url_event(
        "r1",
        "GET",
        "/p/site_0123456789abcdef/v1/x?a=1",
        &[("x-payfence-token", "pf_live_x")],
        None,
    )])
    .await;
    let answers = emulator
        .run(
            Path::new(env!("CARGO_BIN_EXE_proxy")),
            &[
                ("PAYFENCE_SEALING_KEY", KEY),
                ("PAYFENCE_DATA_DIR", dir.path().to_str().unwrap()),
            ],
            1,
        )
        .await;
    assert_eq!(emulator.init_error(), None);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(
        answers[0].streaming,
        "the proxy answers in response-streaming mode"
    );
    let (status, headers, body) = answers[0].http();
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["content-type"], "application/problem+json");
}
