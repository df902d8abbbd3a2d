//! How long decisions wait while the embedded store purges expired audit records.
//! Fills a fresh store (in `$TMPDIR`, which must be a real disk) with `PURGE_RECORDS` (default
//! 2,000,000) decisions made 91 days ago, written by checkpoints as in the
//! gateway, then makes decisions now, 16 at a time, each awaited until durable:
//! first alone, then while `purge_expired` drops the old records.
//! `cargo run --release -p payfence-core --example purge`; figures in
//! docs/performance.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use payfence_core::domain::{
    audit_expires_at, now_ms, rfc3339_ms, AuditRecord, DecisionKind, Mode, Plan, Site, Token,
};
use payfence_core::ids;
use payfence_core::limits::PlanLimits;
use payfence_core::seal::SealingKey;
use payfence_core::store::embedded::EmbeddedStore;
use payfence_core::store::{CountRequest, Store};

const TOKENS: usize = 1024;
const LIMITS: PlanLimits = PlanLimits {
    requests_per_minute: 10_000,
    monthly_quota: 1_000_000_000_000,
};

struct Fixture {
    store: Arc<dyn Store>,
    site_id: String,
    tokens: Vec<String>,
}

impl Fixture {
    fn request(&self, i: usize, ts_ms: u64) -> CountRequest {
        CountRequest {
            site_id: self.site_id.clone(),
            token_id: self.tokens[i % TOKENS].clone(),
            plan_name: "pro".into(),
            limits: LIMITS,
            site_requests_per_second: 1_000_000_000,
            now_ms: ts_ms,
            audit: AuditRecord {
                id: ids::log_id(ts_ms * 1000),
                timestamp: rfc3339_ms(ts_ms),
                ts_ms,
                site_id: self.site_id.clone(),
                token_id: Some(self.tokens[i % TOKENS].clone()),
                plan: Some("pro".into()),
                method: "GET".into(),
                path: "/v1/flights?from=OSL&to=SFO".into(),
                decision: DecisionKind::Allow,
                reason: None,
                remaining: None,
                latency_ms: 0.02,
                mode: Mode::Proxy,
                expires_at: audit_expires_at(ts_ms),
            },
        }
    }

    /// 16 decisions at once, each until durable; their latencies in µs.
    async fn wave(&self, i: usize, ts_ms: u64) -> Vec<u64> {
        join_all((0..16).map(|j| async move {
            let t = Instant::now();
            let counted = self.store.count_request(self.request(i + j, ts_ms)).await;
            counted.unwrap().durable.await.unwrap();
            t.elapsed().as_micros() as u64
        }))
        .await
    }
}

fn summary(mut us: Vec<u64>) -> String {
    us.sort_unstable();
    let at = |q: f64| us[((us.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    format!(
        "{} decisions, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        us.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let records: usize = std::env::var("PURGE_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("p.redb")).unwrap());
    let key = SealingKey::from_bytes(&[7; 32]);
    let (site, _) = Site::new("bench", "bench", "https://api.example.com", &key, 1);
    store.create_site(&site).await.unwrap();
    let plan = Plan {
        plan_id: ids::plan_id(),
        site_id: site.site_id.clone(),
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
        let token = Token {
            token_id: ids::token_id(),
            site_id: site.site_id.clone(),
            plan_id: plan.plan_id.clone(),
            token_hash: ids::hash_secret(&ids::consumer_token()),
            label: None,
            consumer: None,
            created_at: 1,
            revoked_at: None,
        };
        store.create_token(&token).await.unwrap();
        tokens.push(token.token_id);
    }
    let f = Fixture {
        store,
        site_id: site.site_id,
        tokens,
    };

    // 91 days ago, 16 decisions a millisecond: 16,000 a second.
    let old = now_ms() - 91 * 86_400_000;
    let t = Instant::now();
    for i in (0..records).step_by(16) {
        f.wave(i, old + (i / 16) as u64).await;
    }
    println!("{records} expired records written in {:.1?}", t.elapsed());

    let until = Instant::now() + Duration::from_secs(2);
    let mut alone = Vec::new();
    while Instant::now() < until {
        alone.extend(f.wave(alone.len(), now_ms()).await);
    }
    println!("decisions alone:        {}", summary(alone));

    let t = Instant::now();
    let store = f.store.clone();
    let purge = tokio::spawn(async move { store.purge_expired(now_ms() / 1000).await });
    let mut during = Vec::new();
    while !purge.is_finished() {
        during.extend(f.wave(during.len(), now_ms()).await);
    }
    let purged = purge.await.unwrap().unwrap();
    println!("purged {purged} records in {:.1?}", t.elapsed());
    println!("decisions during purge: {}", summary(during));
}
