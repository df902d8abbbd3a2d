//! How long decisions wait while the embedded store purges expired audit records
//! and old revoked tokens. Fills a fresh store (in `$TMPDIR`, which must be a real
//! disk) with `PURGE_RECORDS` (default 2,000,000) decisions made 91 days ago,
//! written by checkpoints as in the gateway, and `PURGE_TOKENS` (default 0) more
//! tokens, every tenth revoked 91 days ago; then makes decisions now, 16 at a time,
//! each awaited until durable: first alone, then while `purge_expired` drops the old
//! records and tokens.
//! `cargo run --release -p payfence-core --example purge`; figures in
//! docs/performance.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use payfence_core::domain::{
    audit_expires_at, now_ms, rfc3339_ms, AuditRecord, DecisionKind, Mode, Token,
};
use payfence_core::ids;
use payfence_core::limits::PlanLimits;
use payfence_core::store::{CountRequest, Store};

#[path = "../benches/common/mod.rs"]
mod common;

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

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let records = env("PURGE_RECORDS", 2_000_000);
    let idle_tokens = env("PURGE_TOKENS", 0);
    let tmp = std::env::temp_dir();
    let fixture = common::fixture(tmp.to_str().unwrap(), LIMITS, TOKENS).await;
    let f = Fixture {
        store: fixture.store,
        site_id: fixture.site.site_id,
        tokens: fixture.tokens.into_iter().map(|(_, id)| id).collect(),
    };

    // 91 days ago, 16 decisions a millisecond: 16,000 a second.
    let old = now_ms() - 91 * 86_400_000;
    let t = Instant::now();
    let plan_id = f.store.list_plans(&f.site_id).await.unwrap()[0]
        .plan_id
        .clone();
    for chunk in (0..idle_tokens).collect::<Vec<_>>().chunks(64) {
        join_all(chunk.iter().map(|&i| {
            let token = Token {
                token_id: ids::token_id(),
                site_id: f.site_id.clone(),
                plan_id: plan_id.clone(),
                token_hash: ids::hash_secret(&ids::consumer_token()),
                label: None,
                consumer: Some(format!("consumer-{}", i % 1000)),
                created_at: 1,
                revoked_at: (i % 10 == 0).then_some(old / 1000),
            };
            let store = f.store.clone();
            async move { store.create_token(&token).await.unwrap() }
        }))
        .await;
    }
    if idle_tokens > 0 {
        println!(
            "{idle_tokens} more tokens, {} revoked 91 days ago, written in {:.1?}",
            idle_tokens.div_ceil(10),
            t.elapsed()
        );
    }
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

    // The second purge finds nothing left to drop: what every later hour costs.
    for round in ["first purge", "second purge"] {
        let t = Instant::now();
        let store = f.store.clone();
        let purge = tokio::spawn(async move { store.purge_expired(now_ms() / 1000).await });
        let mut during = Vec::new();
        while !purge.is_finished() {
            during.extend(f.wave(during.len(), now_ms()).await);
        }
        let purged = purge.await.unwrap().unwrap();
        let kept = f.store.list_tokens_page(&f.site_id, 1_000_000, None).await;
        println!(
            "{round}: {purged} records purged in {:.1?}, {} tokens left",
            t.elapsed(),
            kept.unwrap().items.len()
        );
        println!("decisions during it: {}", summary(during));
    }
}
