//! What one decision costs without HTTP: the pure limits arithmetic, the audit path,
//! and a warm allow on the embedded store (token lookup, rate and quota check, the
//! write-ahead log entry), alone and 64 at a time up to their durable commit.
//! `cargo bench -p payfence-core --bench decision`; figures in docs/performance.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use futures_util::future::join_all;
use payfence_core::domain::{now_ms, Mode, Plan, Site, Token};
use payfence_core::gateway::{audit_path, AuthorizeRequest, Gateway, SiteView};
use payfence_core::ids;
use payfence_core::limits::{evaluate, PlanLimits, SecondWindow, TokenUsage};
use payfence_core::seal::SealingKey;
use payfence_core::store::embedded::EmbeddedStore;
use payfence_core::store::Store;

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
}

struct Fixture {
    gateway: Gateway,
    site: SiteView,
    tokens: Vec<String>,
    _dir: tempfile::TempDir,
}

/// A site, a plan and [`TOKENS`] tokens in a fresh embedded store on disk (under the
/// target dir, so the log's syncs reach a real file system).
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("b.redb")).unwrap());
    let key = SealingKey::from_bytes(&[7; 32]);
    let (mut site, _) = Site::new("bench", "bench", "https://api.example.com", &key, 1);
    site.site_requests_per_second = 1_000_000_000;
    let site_id = site.site_id.clone();
    store.create_site(&site).await.unwrap();
    let plan = Plan {
        plan_id: ids::plan_id(),
        site_id: site_id.clone(),
        name: "pro".into(),
        requests_per_minute: LIMITS.requests_per_minute,
        monthly_quota: LIMITS.monthly_quota,
        created_at: 1,
        updated_at: 1,
        revision: 0,
    };
    store.create_plan(&plan).await.unwrap();
    let mut tokens = Vec::with_capacity(TOKENS);
    for _ in 0..TOKENS {
        let secret = ids::consumer_token();
        let token = Token {
            token_id: ids::token_id(),
            site_id: site_id.clone(),
            plan_id: plan.plan_id.clone(),
            token_hash: ids::hash_secret(&secret),
            label: None,
            consumer: None,
            created_at: 1,
            revoked_at: None,
        };
        store.create_token(&token).await.unwrap();
        tokens.push(secret);
    }
    let site = SiteView::open(site, &key).unwrap();
    let gateway = Gateway::new(store, key, Duration::from_secs(60));
    Fixture {
        gateway,
        site,
        tokens,
        _dir: dir,
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
