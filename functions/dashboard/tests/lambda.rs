//! `main.rs` wiring: the real binary against a Lambda Runtime API.

use std::path::Path;

use payfence_runtime_api::{url_event, Emulator};

const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

#[tokio::test]
async fn dashboard_needs_a_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let emulator = Emulator::start(vec![url_event("r1", "GET", "/api/sites", &[], None)]).await;
    let answers = emulator
        .run(
        Path::new(env!("CARGO_BIN_EXE_dashboard")),
        &[
            ("PAYFENCE_SEALING_KEY", KEY),
            ("PAYFENCE_DATA_DIR", dir.path().to_str().unwrap()),
            (
                "PAYFENCE_JWT_ISSUER",
                "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_test",
            ),
            ("PAYFENCE_JWT_AUDIENCE", "client"),
            (
                "PAYFENCE_JWKS_URL",
                "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_test/.well-known/jwks.json",
            ),
        ],
        1,
        )
        .await;
    assert_eq!(emulator.init_error(), None);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(
        answers[0].streaming,
        "the dashboard answers in response-streaming mode (logs exports past 6 MB)"
    );
    let (status, headers, _) = answers[0].http();
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer");
}

#[tokio::test]
async fn missing_configuration_is_an_init_error_naming_the_variable() {
    let emulator = Emulator::start(vec![]).await;
    let child = emulator.spawn(
        Path::new(env!("CARGO_BIN_EXE_dashboard")),
        &[("PAYFENCE_SEALING_KEY", KEY)],
    );
    // Lambda logs a failed init's stderr and reports Runtime.ExitError.
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PAYFENCE_JWT_ISSUER"), "{err}");
    assert!(
        emulator.first_next().is_none(),
        "no event is taken before the configuration is valid"
    );
}
