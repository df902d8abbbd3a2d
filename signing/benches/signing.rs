//! What signing costs the gateway and verifying costs an origin, per request.
//! `cargo bench -p payfence-signing`; figures in docs/performance.md.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use payfence_signing::{sign, Verifier, SIGNATURE_HEADER, TIMESTAMP_HEADER};

const NEW: &str = "pfsig_3q2-7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const OLD: &str = "pfsig_old-secret-still-in-its-overlap-window-0000";
const PATH: &str = "/v1/flights?from=OSL&to=SFO&date=2026-12-01";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn benches(c: &mut Criterion) {
    let ts = now();
    c.bench_function("sign, one secret", |b| {
        b.iter(|| sign(black_box(&[NEW]), "GET", black_box(PATH), ts))
    });
    c.bench_function("sign, two secrets (rotation overlap)", |b| {
        b.iter(|| sign(black_box(&[NEW, OLD]), "GET", black_box(PATH), ts))
    });

    let one = Verifier::new(NEW);
    let signed = sign(&[NEW], "GET", PATH, ts);
    let request = http::Request::get(PATH)
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(SIGNATURE_HEADER, &signed)
        .body(())
        .unwrap();
    assert_eq!(one.verify_request(&request), Ok(()));
    c.bench_function("verify_request, one secret, one signature", |b| {
        b.iter(|| one.verify_request(black_box(&request)))
    });

    // Both sides mid-rotation: every (secret, signature) pair is checked.
    let two = Verifier::new(NEW).with_secret(OLD);
    let both = sign(&[NEW, OLD], "GET", PATH, ts);
    let ts_s = ts.to_string();
    assert_eq!(
        two.verify("GET", PATH, Some(&ts_s), Some(&both), ts),
        Ok(())
    );
    c.bench_function("verify, two secrets, two signatures", |b| {
        b.iter(|| two.verify("GET", black_box(PATH), Some(&ts_s), Some(&both), ts))
    });
}

criterion_group!(signing, benches);
criterion_main!(signing);
