//! How long the embedded store takes to read a page of a consumer's tokens and of an
//! owner's sites when it holds many of them. Fills a fresh store (in `$TMPDIR`) with
//! 1,000 sites of 1,000 owners, each with 100 tokens held by 5,000 consumers in turn
//! (100,000 tokens, 20 a consumer), then reads consumer-42's tokens and owner-500's
//! sites 20 times and prints the median of each.
//! `cargo run --release -p payfence-core --example listing`; figures in
//! docs/performance.md.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use payfence_core::domain::{Plan, Site, Token};
use payfence_core::ids;
use payfence_core::seal::SealingKey;
use payfence_core::store::embedded::EmbeddedStore;
use payfence_core::store::{PlanStore, SiteStore, TokenStore};

const SITES: usize = 1_000;
const TOKENS_PER_SITE: usize = 100;
const CONSUMERS: usize = 5_000;
const READS: usize = 20;

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = EmbeddedStore::open(&dir.path().join("listing.redb")).expect("a fresh store");
    let key = SealingKey::from_bytes(&[9; 32]);
    for i in 0..SITES {
        let site = Site::new(
            &format!("owner-{i}"),
            "s",
            "https://api.example.com",
            &key,
            1,
        )
        .0;
        store.create_site(&site).await.expect("site stored");
        let plan = Plan::new(&site.site_id, "pro", 60, 1000, 1);
        store.create_plan(&plan).await.expect("plan stored");
        join_all((0..TOKENS_PER_SITE).map(|j| {
            let token = Token {
                token_id: ids::token_id(),
                site_id: site.site_id.clone(),
                plan_id: plan.plan_id.clone(),
                token_hash: ids::hash_secret(&ids::consumer_token()),
                label: None,
                consumer: Some(format!(
                    "consumer-{}",
                    (i * TOKENS_PER_SITE + j) % CONSUMERS
                )),
                created_at: 1,
                revoked_at: None,
            };
            let store = store.clone();
            async move { store.create_token(&token).await.expect("token stored") }
        }))
        .await;
    }
    let (mut tokens, mut sites) = (Vec::new(), Vec::new());
    let (mut listed_tokens, mut listed_sites) = (0, 0);
    for _ in 0..READS {
        let t0 = Instant::now();
        let page = store.list_consumer_tokens_page("consumer-42", 100, None);
        listed_tokens = page.await.expect("tokens listed").items.len();
        tokens.push(t0.elapsed());
        let t0 = Instant::now();
        let page = store.list_sites_page(Some("owner-500"), 100, None);
        listed_sites = page.await.expect("sites listed").items.len();
        sites.push(t0.elapsed());
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "{} tokens, {SITES} sites: a consumer's page ({listed_tokens} tokens) {:?}, an owner's page ({listed_sites} site) {:?} (medians of {READS})",
        SITES * TOKENS_PER_SITE,
        median(tokens),
        median(sites),
    );
}
