//! Cold start: for each function binary, the time from exec to its first request
//! for an event on the Runtime API (init done), beside a hello-world
//! `lambda_runtime` binary, and the binary sizes.
//!
//! ```sh
//! cargo build --release -p payfence-authorize -p payfence-proxy -p payfence-health -p payfence-dashboard -p lambda-hello
//! cargo run --release -p payfence-runtime-api --example coldstart
//! ```
//! The functions run as in AWS but for two things: the sealing key comes from
//! `PAYFENCE_SEALING_KEY` (in AWS, one Secrets Manager call at init) and DynamoDB
//! points at a closed local port (the client makes no call before the first event).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use payfence_runtime_api::Emulator;

const RUNS: usize = 30;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("release")
}

#[tokio::main]
async fn main() {
    let env: &[(&str, &str)] = &[
        (
            "PAYFENCE_SEALING_KEY",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        ),
        ("PAYFENCE_TABLE", "payfence"),
        ("AWS_ENDPOINT_URL_DYNAMODB", "http://127.0.0.1:9"),
        ("AWS_ACCESS_KEY_ID", "x"),
        ("AWS_SECRET_ACCESS_KEY", "x"),
        (
            "PAYFENCE_JWT_ISSUER",
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_x",
        ),
        ("PAYFENCE_JWT_AUDIENCE", "x"),
        (
            "PAYFENCE_JWKS_URL",
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_x/.well-known/jwks.json",
        ),
    ];
    println!("| binary | init p50 | init p90 | × hello p50 | size (x86_64 release) |");
    println!("|---|---|---|---|---|");
    let mut hello_p50 = None;
    for name in ["lambda-hello", "authorize", "proxy", "health", "dashboard"] {
        let bin = target_dir().join(name);
        let size = std::fs::metadata(&bin)
            .map(|m| m.len())
            .unwrap_or_else(|_| panic!("build {} first", bin.display()));
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let emulator = Emulator::start(vec![]).await;
            let started = Instant::now();
            let mut child = emulator.spawn(&bin, env);
            let ready = loop {
                if let Some(t) = emulator.first_next() {
                    break t;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("{name} exited during init: {status}");
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            };
            times.push(ready - started);
            let _ = child.kill();
            let _ = child.wait();
        }
        times.sort();
        let p50 = times[RUNS / 2];
        let p90 = times[RUNS * 9 / 10];
        let base = *hello_p50.get_or_insert(p50);
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.2} | {:.1} MB |",
            p50.as_secs_f64() * 1e3,
            p90.as_secs_f64() * 1e3,
            p50.as_secs_f64() / base.as_secs_f64(),
            size as f64 / 1e6
        );
    }
}
