//! What the decision bench and the purge example both start from: a fresh embedded
//! store with one site (no site-wide limit), one plan "pro" and some tokens.
// Each user reads only some fields.
#![allow(dead_code)]

use std::sync::Arc;

use payfence_core::domain::{Plan, Site, Token};
use payfence_core::ids;
use payfence_core::limits::PlanLimits;
use payfence_core::seal::SealingKey;
use payfence_core::store::embedded::EmbeddedStore;
use payfence_core::store::Store;

pub struct Fixture {
    pub store: Arc<dyn Store>,
    pub key: SealingKey,
    pub site: Site,
    /// Each token's secret and id.
    pub tokens: Vec<(String, String)>,
    pub _dir: tempfile::TempDir,
}

/// A store in a new directory under `parent` (which must be on a real disk, for the
/// log's syncs), holding the site, the plan with `limits`, and `tokens` tokens.
pub async fn fixture(parent: &str, limits: PlanLimits, tokens: usize) -> Fixture {
    let dir = tempfile::tempdir_in(parent).unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("f.redb")).unwrap());
    let key = SealingKey::from_bytes(&[7; 32]);
    let (mut site, _) = Site::new("bench", "bench", "https://api.example.com", &key, 1);
    site.site_requests_per_second = 1_000_000_000;
    store.create_site(&site).await.unwrap();
    let plan = Plan::new(
        &site.site_id,
        "pro",
        limits.requests_per_minute,
        limits.monthly_quota,
        1,
    );
    store.create_plan(&plan).await.unwrap();
    let mut issued = Vec::with_capacity(tokens);
    for _ in 0..tokens {
        let secret = ids::consumer_token();
        let token = Token {
            token_id: ids::token_id(),
            site_id: site.site_id.clone(),
            plan_id: plan.plan_id.clone(),
            token_hash: ids::hash_secret(&secret),
            label: None,
            consumer: None,
            created_at: 1,
            revoked_at: None,
        };
        store.create_token(&token).await.unwrap();
        issued.push((secret, token.token_id));
    }
    Fixture {
        store,
        key,
        site,
        tokens: issued,
        _dir: dir,
    }
}
