//! What one decision costs without HTTP: the pure limits arithmetic, the audit path,
//! and a warm allow on the embedded store (token lookup, rate and quota check, the
//! write-ahead log entry), alone and 64 at a time up to their durable commit; and
//! parsing an authorize request's body.
//! `cargo bench -p payfence-core --bench decision`; figures in docs/performance.md.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use futures_util::future::join_all;
use payfence_core::domain::{now_ms, Mode};
use payfence_core::gateway::{audit_path, AuthorizeRequest, Gateway, SiteView};
use payfence_core::http::parse_json;
use payfence_core::limits::{evaluate, PlanLimits, SecondWindow, TokenUsage};

/// Tokens used in turn, so that none nears its 10,000 a minute in a bench run.
const TOKENS: usize = 4096;
const LIMITS: PlanLimits = PlanLimits {
    requests_per_minute: 10_000,
    monthly_quota: 1_000_000_000_000,
};

fn pure(c: &mut Criterion) {
    let now = now_ms();
    let usage = TokenUsage::default();
    c.bench_function("limits::evaluate, allow", |b| {
        b.iter(|| {
            evaluate(
                black_box(usage),
                black_box(SecondWindow::default()),
                LIMITS,
                1000,
                now,
            )
        })
    });
    let secret = ["api_key".to_owned()];
    c.bench_function("audit_path, one secret query value", |b| {
        b.iter(|| {
            audit_path(
                black_box("/v1/flights?from=OSL&api_key=abc&to=SFO"),
                &secret,
            )
        })
    });
    // The shape of `POST /v1/authorize`'s body.
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct AuthorizeBody {
        token: Option<String>,
        method: String,
        path: String,
        client_ip: Option<String>,
    }
    let body = br#"{"token":"pf_live_gha8uz6HK4QL_P_H46eL_ffs7qyxA5sgkrA3vr5y6dk","method":"GET","path":"/v1/flights"}"#;
    c.bench_function("parse_json, an authorize body", |b| {
        b.iter(|| parse_json::<AuthorizeBody>(black_box(body)).unwrap())
    });
}

mod common;

struct Fixture {
    gateway: Gateway,
    site: SiteView,
    tokens: Vec<String>,
    _dir: tempfile::TempDir,
}

/// A site, a plan and [`TOKENS`] tokens in a fresh embedded store on disk (under the
/// target dir, so the log's syncs reach a real file system).
async fn fixture() -> Fixture {
    let f = common::fixture(env!("CARGO_TARGET_TMPDIR"), LIMITS, TOKENS).await;
    let site = SiteView::open(f.site, &f.key).unwrap();
    Fixture {
        gateway: Gateway::new(f.store, f.key, Duration::from_secs(60)),
        site,
        tokens: f.tokens.into_iter().map(|(secret, _)| secret).collect(),
        _dir: f._dir,
    }
}

impl Fixture {
    /// One warm allow; `durable` resolves once its log entry is on disk.
    async fn decide(&self, i: usize) -> payfence_core::gateway::Authorized {
        let a = self
            .gateway
            .authorize(AuthorizeRequest {
                site: &self.site,
                token: Some(&self.tokens[i % TOKENS]),
                method: "GET",
                path_and_query: "/v1/flights?from=OSL&to=SFO",
                client_ip: None,
                mode: Mode::Proxy,
                started: Instant::now(),
            })
            .await
            .unwrap();
        assert!(a.decision.allowed, "the bench must measure allows");
        a
    }
}

fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let f = rt.block_on(fixture());
    // Every token's lookup cached, as in a warm gateway.
    rt.block_on(async {
        for i in 0..TOKENS {
            f.decide(i).await.durable.await.unwrap();
        }
    });

    let mut n = 0;
    c.bench_function(
        "authorize, warm allow (commit left to the log thread)",
        |b| {
            b.iter(|| {
                n += 1;
                rt.block_on(f.decide(n))
            })
        },
    );

    let mut group = c.benchmark_group("authorize, warm allow");
    group.throughput(Throughput::Elements(64));
    group.bench_function("64 at a time, each awaited until durable", |b| {
        b.iter(|| {
            rt.block_on(join_all((0..64).map(|_| {
                n += 1;
                let i = n;
                let f = &f;
                async move { f.decide(i).await.durable.await.unwrap() }
            })))
        })
    });
    group.finish();
}

criterion_group!(decision, pure, store);
criterion_main!(decision);
