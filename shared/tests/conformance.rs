//! One store conformance suite, run against the embedded store and against
//! DynamoDB (the test server `scripts/test.sh` starts; `PAYFENCE_TEST_DYNAMODB`).

use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use payfence_core::domain::*;
use payfence_core::ids;
use payfence_core::limits::{PlanLimits, Verdict};
use payfence_core::seal::SealingKey;
use payfence_core::store::dynamo::DynamoStore;
use payfence_core::store::embedded::EmbeddedStore;
use payfence_core::store::{
    parse_admin_cursor, parse_event_cursor, AuditStore, CountRequest, Counted, KeyStore,
    PlanDeletion, PlanStore, Store, StoreError, TokenStore,
};

const NOW: u64 = 1_795_000_020_000; // 2026-11, early in a minute

fn site(owner: &str) -> Site {
    Site::new(
        owner,
        "s",
        "https://api.example.com",
        &SealingKey::from_bytes(&[9; 32]),
        1,
    )
    .0
}

fn plan(site_id: &str, rpm: u64, quota: u64) -> Plan {
    Plan::new(site_id, "pro", rpm, quota, 1)
}

fn token(site_id: &str, plan_id: &str, consumer: Option<&str>) -> Token {
    Token {
        token_id: ids::token_id(),
        site_id: site_id.into(),
        plan_id: plan_id.into(),
        token_hash: ids::hash_secret(&ids::consumer_token()),
        label: None,
        consumer: consumer.map(Into::into),
        created_at: 1,
        revoked_at: None,
    }
}

fn audit(
    site_id: &str,
    ts_ms: u64,
    token_id: Option<&str>,
    decision: DecisionKind,
    path: &str,
) -> AuditRecord {
    AuditRecord {
        id: ids::log_id(ts_ms * 1000),
        timestamp: rfc3339_ms(ts_ms),
        ts_ms,
        site_id: site_id.into(),
        token_id: token_id.map(Into::into),
        plan: token_id.map(|_| "pro".into()),
        method: "GET".into(),
        path: path.into(),
        decision,
        reason: (decision == DecisionKind::Deny).then_some(Reason::InvalidToken),
        remaining: None,
        latency_ms: 0.5,
        mode: Mode::Proxy,
        expires_at: ts_ms / 1000 + AUDIT_RETENTION_SECS,
    }
}

fn count_req(site: &Site, t: &Token, p: &Plan, now_ms: u64) -> CountRequest {
    CountRequest {
        site_id: site.site_id.clone(),
        token_id: t.token_id.clone(),
        plan_name: p.name.clone(),
        limits: PlanLimits {
            requests_per_minute: p.requests_per_minute,
            monthly_quota: p.monthly_quota,
        },
        site_requests_per_second: site.site_requests_per_second,
        now_ms,
        audit: audit(
            &site.site_id,
            now_ms,
            Some(&t.token_id),
            DecisionKind::Allow,
            "/x",
        ),
    }
}

async fn count(store: &Arc<dyn Store>, req: CountRequest) -> Counted {
    let c = store.count_request(req).await.unwrap();
    c.durable.await.unwrap();
    c.counted
}

fn allowed(c: &Counted) -> bool {
    matches!(c, Counted::Evaluated(e) if e.verdict == Verdict::Allow)
}

async fn sites_and_plans(store: Arc<dyn Store>) {
    let owner = format!("o-{}", ids::request_id());
    let a = site(&owner);
    let b = site(&owner);
    store.create_site(&a).await.unwrap();
    store.create_site(&b).await.unwrap();
    // An owner whose name starts with this owner's and `/` is someone else.
    store
        .create_site(&site(&format!("{owner}/x")))
        .await
        .unwrap();
    assert!(matches!(
        store.create_site(&a).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.get_site(&a.site_id).await.unwrap(), Some(a.clone()));
    assert_eq!(store.get_site("site_0000000000000000").await.unwrap(), None);
    // Updates apply over the revision they were made from, and count it up; one
    // made from a site someone changed since is refused, whatever it changes.
    let mut a2 = a.clone();
    a2.name = "renamed".into();
    store.update_site(&a2).await.unwrap();
    let stored = store.get_site(&a.site_id).await.unwrap().unwrap();
    assert_eq!((stored.name.as_str(), stored.revision), ("renamed", 1));
    let mut stale = a.clone();
    stale.signing_secret_sealed = "rotated".into();
    assert!(matches!(
        store.update_site(&stale).await,
        Err(StoreError::Changed(_))
    ));
    let mut again = stored.clone();
    again.signing_secret_sealed = "rotated".into();
    store.update_site(&again).await.unwrap();
    let stored = store.get_site(&a.site_id).await.unwrap().unwrap();
    assert_eq!(
        (
            stored.name.as_str(),
            stored.signing_secret_sealed.as_str(),
            stored.revision
        ),
        ("renamed", "rotated", 2)
    );
    let mut unknown = site(&owner);
    unknown.revision = 0;
    assert!(matches!(
        store.update_site(&unknown).await,
        Err(StoreError::Changed(_))
    ));
    assert_eq!(store.get_site(&unknown.site_id).await.unwrap(), None);
    // An owner's sites and every site, in pages, in site-id order.
    let mut mine = vec![a.site_id.clone(), b.site_id.clone()];
    mine.sort();
    let site_id = |s: &Site| s.site_id.clone();
    for (owner, limit) in [(Some(&owner), 1), (Some(&owner), 2), (None, 1), (None, 3)] {
        let seen = pages(limit, site_id, |after| {
            let (store, owner) = (store.clone(), owner.cloned());
            async move {
                let page = store.list_sites_page(owner.as_deref(), limit, after.as_deref());
                page.await.unwrap()
            }
        })
        .await;
        assert!(
            seen.is_sorted() && seen.windows(2).all(|w| w[0] != w[1]),
            "{seen:?}"
        );
        match owner {
            Some(_) => assert_eq!(seen, mine, "limit {limit}"),
            // Other tests' sites may share the table.
            None => assert!(mine.iter().all(|s| seen.contains(s)), "{seen:?}"),
        }
    }
    let nobody = store
        .list_sites_page(Some("nobody"), 10, None)
        .await
        .unwrap();
    assert!(nobody.items.is_empty() && nobody.next_cursor.is_none());

    let p = plan(&a.site_id, 60, 1000);
    store.create_plan(&p).await.unwrap();
    store.create_plan(&plan(&a.site_id, 10, 5)).await.unwrap();
    assert_eq!(
        store.get_plan(&a.site_id, &p.plan_id).await.unwrap(),
        Some(p.clone())
    );
    assert_eq!(store.get_plan(&b.site_id, &p.plan_id).await.unwrap(), None);
    assert_eq!(store.list_plans(&a.site_id).await.unwrap().len(), 2);
    assert!(store.list_plans(&b.site_id).await.unwrap().is_empty());
    assert!(matches!(
        store.create_plan(&p).await,
        Err(StoreError::Conflict(_))
    ));
    // Plans are updated over the revision they were read at, as sites are.
    let mut p2 = p.clone();
    p2.monthly_quota = 2000;
    store.update_plan(&p2).await.unwrap();
    let mut stale = p.clone();
    stale.requests_per_minute = 120;
    assert!(matches!(
        store.update_plan(&stale).await,
        Err(StoreError::Changed(_))
    ));
    let stored = store
        .get_plan(&a.site_id, &p.plan_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            stored.monthly_quota,
            stored.requests_per_minute,
            stored.revision
        ),
        (2000, 60, 1)
    );
    assert!(matches!(
        store.update_plan(&plan(&a.site_id, 10, 5)).await,
        Err(StoreError::Changed(_))
    ));
    let deleted = store.delete_plan(&a.site_id, &p.plan_id).await;
    assert_eq!(deleted.unwrap(), PlanDeletion::Deleted);
    assert_eq!(store.get_plan(&a.site_id, &p.plan_id).await.unwrap(), None);
    assert_eq!(store.list_plans(&a.site_id).await.unwrap().len(), 1);
    let again = store.delete_plan(&a.site_id, &p.plan_id).await;
    assert_eq!(again.unwrap(), PlanDeletion::NotFound);
    let none = store.delete_plan(&b.site_id, "plan_0000000000000000").await;
    assert_eq!(none.unwrap(), PlanDeletion::NotFound);
    assert!(store.delete_site(&b.site_id).await.unwrap());
    assert_eq!(store.get_site(&b.site_id).await.unwrap(), None);
    assert!(!store.delete_site(&b.site_id).await.unwrap());
    let left = store.list_sites_page(Some(&owner), 10, None).await.unwrap();
    let left: Vec<&str> = left.items.iter().map(|s| s.site_id.as_str()).collect();
    assert_eq!(left, [a.site_id.as_str()]);
    store.ping().await.unwrap();
}

/// The ids of a listing read to its end, `limit` at a time from `page(after)`.
async fn pages<T, F, Fut>(limit: usize, id: impl Fn(&T) -> String, page: F) -> Vec<String>
where
    F: Fn(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Page<T>>,
{
    let (mut seen, mut after) = (Vec::new(), None);
    loop {
        let page = page(after.take()).await;
        assert!(page.items.len() <= limit);
        seen.extend(page.items.iter().map(&id));
        match page.next_cursor {
            Some(c) => after = Some(c),
            None => return seen,
        }
    }
}

async fn tokens_and_keys(store: Arc<dyn Store>) {
    let s = site("o");
    store.create_site(&s).await.unwrap();
    let p = plan(&s.site_id, 60, 1000);
    store.create_plan(&p).await.unwrap();
    let consumer = format!("c-{}", ids::request_id());
    let t1 = token(&s.site_id, &p.plan_id, Some(&consumer));
    let t2 = token(&s.site_id, &p.plan_id, None);
    store.create_token(&t1).await.unwrap();
    store.create_token(&t2).await.unwrap();
    let mut dup = token(&s.site_id, &p.plan_id, None);
    dup.token_hash = t1.token_hash.clone();
    assert!(matches!(
        store.create_token(&dup).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        store.token_by_hash(&t1.token_hash).await.unwrap(),
        Some(t1.clone())
    );
    assert_eq!(
        store
            .token_by_hash(&ids::hash_secret("nope"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.get_token(&s.site_id, &t2.token_id).await.unwrap(),
        Some(t2.clone())
    );
    assert_eq!(
        store
            .get_token("site_0000000000000000", &t2.token_id)
            .await
            .unwrap(),
        None
    );
    let listed = store.list_tokens_page(&s.site_id, 10, None).await.unwrap();
    assert_eq!(listed.items.len(), 2);
    // Pages: every token once, in id order, whatever the page size.
    let mut more = Vec::new();
    for _ in 0..3 {
        let t = token(&s.site_id, &p.plan_id, None);
        store.create_token(&t).await.unwrap();
        more.push(t.token_id);
    }
    let mut all: Vec<String> = [&t1.token_id, &t2.token_id]
        .into_iter()
        .cloned()
        .chain(more)
        .collect();
    all.sort();
    for limit in [1, 2, 5, 10] {
        let seen = pages(
            limit,
            |t: &Token| t.token_id.clone(),
            |after| {
                let (store, site_id) = (store.clone(), s.site_id.clone());
                async move {
                    let page = store.list_tokens_page(&site_id, limit, after.as_deref());
                    page.await.unwrap()
                }
            },
        )
        .await;
        assert_eq!(seen, all, "limit {limit}");
    }
    let exactly = store
        .list_tokens_page(&s.site_id, all.len(), None)
        .await
        .unwrap();
    assert_eq!(exactly.items.len(), all.len());
    assert_eq!(exactly.next_cursor, None, "a full last page has no cursor");
    let other_site = store
        .list_tokens_page("site_0000000000000000", 10, None)
        .await
        .unwrap();
    assert!(other_site.items.is_empty() && other_site.next_cursor.is_none());
    // A consumer's tokens, on any site, and no one else's, in pages.
    let s2 = site("o");
    store.create_site(&s2).await.unwrap();
    let p2 = plan(&s2.site_id, 60, 1000);
    store.create_plan(&p2).await.unwrap();
    let mut mine = vec![t1.token_id.clone()];
    for c in [
        Some(consumer.as_str()),
        Some(consumer.as_str()),
        Some("someone-else"),
        Some(&format!("{consumer}/x")),
    ] {
        let t = token(&s2.site_id, &p2.plan_id, c);
        store.create_token(&t).await.unwrap();
        if c == Some(&consumer) {
            mine.push(t.token_id);
        }
    }
    mine.sort();
    for limit in [1, 2, 3, 10] {
        let seen = pages(
            limit,
            |t: &Token| t.token_id.clone(),
            |after| {
                let (store, consumer) = (store.clone(), consumer.clone());
                async move {
                    let page = store.list_consumer_tokens_page(&consumer, limit, after.as_deref());
                    page.await.unwrap()
                }
            },
        )
        .await;
        assert_eq!(seen, mine, "limit {limit}");
    }
    let nobody = store.list_consumer_tokens_page("nobody", 10, None).await;
    let nobody = nobody.unwrap();
    assert!(nobody.items.is_empty() && nobody.next_cursor.is_none());
    let revoked = store
        .revoke_token(&s.site_id, &t1.token_id, 99)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(revoked.revoked_at, Some(99));
    assert_eq!(
        store
            .get_token(&s.site_id, &t1.token_id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at,
        Some(99)
    );
    assert_eq!(
        store
            .revoke_token(&s.site_id, "tok_0000000000000000", 99)
            .await
            .unwrap(),
        None
    );

    let (k, _) = ApiKey::new(&s.site_id, Some("billing server".into()), 1);
    store.create_key(&k).await.unwrap();
    assert_eq!(
        store.key_by_hash(&k.key_hash).await.unwrap(),
        Some(k.clone())
    );
    assert_eq!(store.list_keys(&s.site_id).await.unwrap().len(), 1);
    assert_eq!(
        store
            .revoke_key(&s.site_id, &k.key_id, 7)
            .await
            .unwrap()
            .unwrap()
            .revoked_at,
        Some(7)
    );
    assert_eq!(
        store
            .key_by_hash(&k.key_hash)
            .await
            .unwrap()
            .unwrap()
            .revoked_at,
        Some(7)
    );
    assert_eq!(
        store
            .revoke_key(&s.site_id, "key_0000000000000000", 7)
            .await
            .unwrap(),
        None
    );
}

async fn setup(store: &Arc<dyn Store>, rpm: u64, quota: u64) -> (Site, Plan, Token) {
    let s = site("o");
    store.create_site(&s).await.unwrap();
    let p = plan(&s.site_id, rpm, quota);
    store.create_plan(&p).await.unwrap();
    let t = token(&s.site_id, &p.plan_id, None);
    store.create_token(&t).await.unwrap();
    (s, p, t)
}

async fn rate_limit_exact_under_concurrency(store: Arc<dyn Store>) {
    let (s, p, t) = setup(&store, 60, 100_000).await;
    let tasks: Vec<_> = (0..64u64)
        .flat_map(|i| (0..2u64).map(move |j| (i, j)))
        .map(|(i, j)| {
            let store = store.clone();
            let req = count_req(&s, &t, &p, NOW + i * 3 + j);
            tokio::spawn(async move { allowed(&count(&store, req).await) })
        })
        .collect();
    let mut n = 0;
    for task in tasks {
        n += task.await.unwrap() as u32;
    }
    assert_eq!(n, 60);
    let usage = store.token_usage(&t.token_id).await.unwrap();
    let _ = usage; // counters are at "now", not at NOW; exactness is checked above
}

/// Many tokens' usage read at once equals each token's own, in the order asked:
/// past 100 tokens (DynamoDB reads 100 a call), for an id asked twice and for one
/// that does not exist.
async fn usage_of_many_tokens_at_once(store: Arc<dyn Store>) {
    let (s, p, first) = setup(&store, 600, 1000).await;
    let mut tokens = vec![first];
    for _ in 0..119 {
        let t = token(&s.site_id, &p.plan_id, None);
        store.create_token(&t).await.unwrap();
        tokens.push(t);
    }
    // Uses counted now, read back within the same minute.
    let now = payfence_core::domain::now_ms();
    if now % 60_000 > 40_000 {
        tokio::time::sleep(std::time::Duration::from_millis(60_100 - now % 60_000)).await;
    }
    let now = payfence_core::domain::now_ms();
    for (i, t) in tokens.iter().enumerate().filter(|(i, _)| i % 7 == 0) {
        for _ in 0..=(i / 7 % 3) {
            assert!(allowed(&count(&store, count_req(&s, t, &p, now)).await));
        }
    }
    let mut ids: Vec<String> = tokens.iter().map(|t| t.token_id.clone()).collect();
    ids.extend([ids[7].clone(), "tok_0000000000000000".into()]);
    let many = store.token_usages(&ids).await.unwrap();
    let mut one = Vec::new();
    for id in &ids {
        one.push(store.token_usage(id).await.unwrap());
    }
    assert_eq!(many, one);
    let used: Vec<u64> = many.iter().map(|u| u.quota.used).collect();
    assert_eq!((used[0], used[7], used[14], used[120]), (1, 2, 3, 2));
    assert_eq!(used.iter().filter(|&&n| n > 0).count(), 18 + 1, "{used:?}");
}

async fn quota_exact_under_concurrency_and_events_once(store: Arc<dyn Store>) {
    let (s, p, t) = setup(&store, 10_000, 100).await;
    let tasks: Vec<_> = (0..64u64)
        .map(|i| {
            let store = store.clone();
            let (s, p, t) = (s.clone(), p.clone(), t.clone());
            tokio::spawn(async move {
                let mut n = 0;
                for j in 0..3u64 {
                    n += allowed(&count(&store, count_req(&s, &t, &p, NOW + i * 7 + j)).await)
                        as u32;
                }
                n
            })
        })
        .collect();
    let mut n = 0;
    for task in tasks {
        n += task.await.unwrap();
    }
    assert_eq!(n, 100);
    let denied = count(&store, count_req(&s, &t, &p, NOW + 5_000)).await;
    assert!(
        matches!(denied, Counted::Evaluated(e) if e.verdict == Verdict::QuotaExceeded && e.remaining_quota == 0)
    );
    let events = store.list_events(&s.site_id, 10, None).await.unwrap();
    assert_eq!(events.next_cursor, None);
    let kinds: Vec<(String, u64)> = events
        .items
        .iter()
        .map(|e| (format!("{:?}", e.kind), e.used))
        .collect();
    // In key order: by token, month, then kind.
    assert_eq!(
        kinds,
        vec![("Exhausted".to_string(), 100), ("Warning".to_string(), 80)]
    );
    // One at a time: each page continues where the last ended.
    let first = store.list_events(&s.site_id, 1, None).await.unwrap();
    assert_eq!(first.items, events.items[..1]);
    let cursor = first.next_cursor.unwrap();
    let after = parse_event_cursor(&cursor).unwrap();
    let second = store.list_events(&s.site_id, 1, Some(after)).await.unwrap();
    assert_eq!(second.items, events.items[1..]);
    assert_eq!(second.next_cursor, None);
}

/// Deleting a site deletes its quota events, and not another site's.
async fn deleting_a_site_deletes_its_quota_events(store: Arc<dyn Store>) {
    delete_site_with_events(store, 3).await;
}

/// As [`deleting_a_site_deletes_its_quota_events`], with more events than one of the
/// embedded store's delete transactions takes (1,024). (The DynamoDB store's
/// pages of deletes are tested in its own module, on events written directly:
/// made by requests, 1,000 take its test server a minute.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_deletes_more_quota_events_than_a_transaction_takes() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("db.redb")).unwrap();
    delete_site_with_events(Arc::new(store), 520).await;
}

/// A site whose `tokens` tokens each made one request on a quota of 1 (so crossed
/// 80 % and 100 % at once: two events each), beside another site with two events;
/// deleting the first leaves the second's.
async fn delete_site_with_events(store: Arc<dyn Store>, tokens: usize) {
    use futures_util::{stream, StreamExt};
    let events_of = |site_id: String| {
        let store = store.clone();
        async move {
            let (mut n, mut after) = (0, None::<String>);
            loop {
                let cursor = after.as_deref().map(|c| parse_event_cursor(c).unwrap());
                let page = store.list_events(&site_id, 1000, cursor).await.unwrap();
                n += page.items.len();
                match page.next_cursor {
                    Some(c) => after = Some(c),
                    None => return n,
                }
            }
        }
    };
    let (s, p, _) = setup(&store, 60, 1).await;
    let (other, other_plan, other_token) = setup(&store, 60, 1).await;
    let req = count_req(&other, &other_token, &other_plan, NOW);
    assert!(allowed(&count(&store, req).await));
    stream::iter(0..tokens)
        .for_each_concurrent(16, |_| {
            let (store, t) = (store.clone(), token(&s.site_id, &p.plan_id, None));
            let req = count_req(&s, &t, &p, NOW);
            async move {
                store.create_token(&t).await.unwrap();
                assert!(allowed(&count(&store, req).await));
            }
        })
        .await;
    assert_eq!(events_of(s.site_id.clone()).await, 2 * tokens);
    assert!(store.delete_site(&s.site_id).await.unwrap());
    assert_eq!(events_of(s.site_id.clone()).await, 0);
    assert_eq!(events_of(other.site_id.clone()).await, 2);
}

async fn revocation_and_missing_tokens(store: Arc<dyn Store>) {
    let (s, p, t) = setup(&store, 60, 1000).await;
    assert!(allowed(&count(&store, count_req(&s, &t, &p, NOW)).await));
    store
        .revoke_token(&s.site_id, &t.token_id, 1)
        .await
        .unwrap();
    assert_eq!(
        count(&store, count_req(&s, &t, &p, NOW + 1)).await,
        Counted::Revoked
    );
    let ghost = token(&s.site_id, &p.plan_id, None);
    assert_eq!(
        count(&store, count_req(&s, &ghost, &p, NOW + 2)).await,
        Counted::Revoked
    );
}

/// A token changes only over the token as read: never over a revocation, a
/// concurrent change, or a token that is not there.
async fn token_updates(store: Arc<dyn Store>) {
    let (s, p, was) = setup(&store, 60, 1000).await;
    let p2 = plan(&s.site_id, 10, 5);
    store.create_plan(&p2).await.unwrap();
    let consumer = format!("c-{}", ids::request_id());
    let now = Token {
        plan_id: p2.plan_id.clone(),
        label: Some("moved".into()),
        consumer: Some(consumer.clone()),
        ..was.clone()
    };
    store.update_token(&was, &now).await.unwrap();
    let stored = store.get_token(&s.site_id, &was.token_id).await;
    assert_eq!(stored.unwrap(), Some(now.clone()));
    assert_eq!(
        store.token_by_hash(&was.token_hash).await.unwrap(),
        Some(now.clone())
    );
    let mine = store.list_consumer_tokens_page(&consumer, 10, None).await;
    assert_eq!(mine.unwrap().items, vec![now.clone()]);
    // Over a token that is no longer as read: refused, and nothing changes.
    let stale = Token {
        label: Some("stale".into()),
        ..was.clone()
    };
    assert!(matches!(
        store.update_token(&was, &stale).await,
        Err(StoreError::Changed(_))
    ));
    // Passing to another consumer moves the token from one's list to the other's.
    let other = format!("c-{}", ids::request_id());
    let passed = Token {
        consumer: Some(other.clone()),
        ..now.clone()
    };
    store.update_token(&now, &passed).await.unwrap();
    let mine = store.list_consumer_tokens_page(&consumer, 10, None).await;
    assert!(mine.unwrap().items.is_empty());
    let theirs = store.list_consumer_tokens_page(&other, 10, None).await;
    assert_eq!(theirs.unwrap().items, vec![passed.clone()]);
    // Leaving the consumer takes the token off its list.
    let unassigned = Token {
        consumer: None,
        ..now.clone()
    };
    store.update_token(&passed, &unassigned).await.unwrap();
    let theirs = store.list_consumer_tokens_page(&other, 10, None).await;
    assert!(theirs.unwrap().items.is_empty());
    store
        .revoke_token(&s.site_id, &was.token_id, 7)
        .await
        .unwrap();
    assert!(matches!(
        store.update_token(&unassigned, &now).await,
        Err(StoreError::Changed(_))
    ));
    let stored = store.get_token(&s.site_id, &was.token_id).await.unwrap();
    assert_eq!(stored.unwrap().revoked_at, Some(7), "still revoked");
    let ghost = token(&s.site_id, &p.plan_id, None);
    assert!(matches!(
        store.update_token(&ghost, &ghost).await,
        Err(StoreError::Changed(_))
    ));
    assert_eq!(
        store.get_token(&s.site_id, &ghost.token_id).await.unwrap(),
        None
    );
}

/// A plan is deleted only while no active token is on it, checked in the same step
/// as the token writes: issuing, moving, relabelling and revoking tokens (twice)
/// keep its count, a plan's update does not reset it, and a token cannot be put on a
/// plan that is gone.
async fn plans_are_deleted_only_without_active_tokens(store: Arc<dyn Store>) {
    let (s, p, t) = setup(&store, 60, 1000).await;
    let p2 = plan(&s.site_id, 10, 5);
    store.create_plan(&p2).await.unwrap();
    let in_use = |plan: &Plan| {
        let (store, site_id, plan_id) = (store.clone(), s.site_id.clone(), plan.plan_id.clone());
        async move { store.delete_plan(&site_id, &plan_id).await.unwrap() }
    };
    let t2 = token(&s.site_id, &p.plan_id, None);
    store.create_token(&t2).await.unwrap();
    assert_eq!(in_use(&p).await, PlanDeletion::InUse(2));
    // A plan's update keeps its count.
    let mut renamed = p.clone();
    renamed.name = "renamed".into();
    store.update_plan(&renamed).await.unwrap();
    assert_eq!(in_use(&p).await, PlanDeletion::InUse(2));
    // A label change is no move; a move carries the token's count to the new plan.
    let labelled = Token {
        label: Some("l".into()),
        ..t.clone()
    };
    store.update_token(&t, &labelled).await.unwrap();
    assert_eq!(in_use(&p).await, PlanDeletion::InUse(2));
    let moved = Token {
        plan_id: p2.plan_id.clone(),
        ..labelled.clone()
    };
    store.update_token(&labelled, &moved).await.unwrap();
    assert_eq!(in_use(&p).await, PlanDeletion::InUse(1));
    assert_eq!(in_use(&p2).await, PlanDeletion::InUse(1));
    // Revoked twice, a token counts down once.
    for at in [5, 6] {
        store
            .revoke_token(&s.site_id, &t2.token_id, at)
            .await
            .unwrap();
    }
    assert_eq!(in_use(&p2).await, PlanDeletion::InUse(1));
    assert_eq!(in_use(&p).await, PlanDeletion::Deleted);
    // Onto a plan that is gone: neither issued nor moved.
    let orphan = token(&s.site_id, &p.plan_id, None);
    assert!(matches!(
        store.create_token(&orphan).await,
        Err(StoreError::Missing(_))
    ));
    let by_hash = store.token_by_hash(&orphan.token_hash).await.unwrap();
    assert_eq!(by_hash, None, "nothing of the refused token is stored");
    let back = Token {
        plan_id: p.plan_id.clone(),
        ..moved.clone()
    };
    assert!(matches!(
        store.update_token(&moved, &back).await,
        Err(StoreError::Missing(_))
    ));
    let stored = store.get_token(&s.site_id, &t.token_id).await.unwrap();
    assert_eq!(
        stored,
        Some(moved.clone()),
        "the refused move changed nothing"
    );
    store
        .revoke_token(&s.site_id, &t.token_id, 7)
        .await
        .unwrap();
    assert_eq!(in_use(&p2).await, PlanDeletion::Deleted);
}

/// Tokens issued on a plan while it is deleted: either the deletion comes first and
/// every token is refused, or a token comes first, the deletion is refused, and
/// every token is issued; never a token on a deleted plan. The deletion is sent
/// before, between and after the tokens. Revoked all at once, the tokens leave
/// the plan free to delete.
async fn plan_deletion_races_token_issue(store: Arc<dyn Store>) {
    let s = site("o");
    store.create_site(&s).await.unwrap();
    for round in 0..10 {
        let p = plan(&s.site_id, 60, 1000);
        store.create_plan(&p).await.unwrap();
        let tokens: Vec<Token> = (0..4)
            .map(|_| token(&s.site_id, &p.plan_id, None))
            .collect();
        let issue = |t: &Token| {
            let (store, t) = (store.clone(), t.clone());
            tokio::spawn(async move { store.create_token(&t).await })
        };
        let delete = || {
            let (store, site_id, plan_id) = (store.clone(), s.site_id.clone(), p.plan_id.clone());
            tokio::spawn(async move { store.delete_plan(&site_id, &plan_id).await })
        };
        let at = round % 5;
        let mut issued: Vec<_> = tokens[..at.min(4)].iter().map(issue).collect();
        let deleted = delete();
        issued.extend(tokens[at.min(4)..].iter().map(issue));
        let mut ok = 0;
        for i in issued {
            match i.await.unwrap() {
                Ok(()) => ok += 1,
                Err(StoreError::Missing(_)) => {}
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        match deleted.await.unwrap().unwrap() {
            PlanDeletion::Deleted => assert_eq!(ok, 0, "round {round}: tokens on a deleted plan"),
            PlanDeletion::InUse(n) => {
                assert_eq!(ok, 4, "round {round}: a token refused on a plan that stays");
                assert!((1..=4).contains(&n), "round {round}: {n} in use");
                let revokes = tokens.iter().map(|t| {
                    let (store, t) = (store.clone(), t.clone());
                    tokio::spawn(
                        async move { store.revoke_token(&t.site_id, &t.token_id, 9).await },
                    )
                });
                for r in revokes.collect::<Vec<_>>() {
                    assert!(r.await.unwrap().unwrap().is_some());
                }
                let deleted = store.delete_plan(&s.site_id, &p.plan_id).await.unwrap();
                assert_eq!(deleted, PlanDeletion::Deleted, "round {round}");
            }
            PlanDeletion::NotFound => panic!("round {round}: the plan was not found"),
        }
    }
}

/// A token revoked while it is moved to another plan: the revocation always goes
/// through, on whichever plan the token is by then; the move either comes first or
/// is refused as `Changed`; and each plan's count of active tokens ends at zero.
async fn revocation_races_a_move(store: Arc<dyn Store>) {
    let s = site("o");
    store.create_site(&s).await.unwrap();
    let (a, b) = (plan(&s.site_id, 60, 1000), plan(&s.site_id, 60, 1000));
    for p in [&a, &b] {
        store.create_plan(p).await.unwrap();
    }
    let mut moved_first = 0;
    for round in 0..40 {
        let t = token(&s.site_id, &a.plan_id, None);
        store.create_token(&t).await.unwrap();
        let to_b = Token {
            plan_id: b.plan_id.clone(),
            ..t.clone()
        };
        // One or the other sent a little later, by 0 to 5.7 ms in steps of 0.3 ms (finer
        // than a timer's millisecond): the revocation's read and write of the record
        // sometimes straddle the move.
        let later = |by: u64| async move {
            let until = std::time::Instant::now() + std::time::Duration::from_micros(by);
            while std::time::Instant::now() < until {
                tokio::task::yield_now().await;
            }
        };
        let lag = round / 2 * 300;
        let (move_lag, revoke_lag) = if round % 2 == 0 { (0, lag) } else { (lag, 0) };
        let moving = async {
            later(move_lag).await;
            store.update_token(&t, &to_b).await
        };
        let revoke = async {
            later(revoke_lag).await;
            store.revoke_token(&t.site_id, &t.token_id, 9).await
        };
        let (moved, revoked) = tokio::join!(moving, revoke);
        let revoked = (revoked.unwrap_or_else(|e| panic!("round {round}: not revoked: {e}")))
            .expect("the token exists");
        assert_eq!(revoked.revoked_at, Some(9), "round {round}");
        match moved {
            Ok(()) => {
                moved_first += 1;
                assert_eq!(
                    revoked.plan_id, b.plan_id,
                    "round {round}: revoked on its new plan"
                );
            }
            Err(StoreError::Changed(_)) => assert_eq!(revoked.plan_id, a.plan_id),
            Err(e) => panic!("round {round}: {e}"),
        }
        let stored = store.get_token(&s.site_id, &t.token_id).await.unwrap();
        assert_eq!(stored, Some(revoked), "round {round}");
    }
    assert!(moved_first > 0, "the move came first in no round");
    for p in [&a, &b] {
        let deleted = store.delete_plan(&s.site_id, &p.plan_id).await.unwrap();
        assert_eq!(deleted, PlanDeletion::Deleted, "a count left above zero");
    }
}

/// A key's label changes only over the key as read: never over a revocation.
async fn key_updates(store: Arc<dyn Store>) {
    let s = site("o");
    store.create_site(&s).await.unwrap();
    let (was, _) = ApiKey::new(&s.site_id, None, 1);
    store.create_key(&was).await.unwrap();
    let now = ApiKey {
        label: Some("billing".into()),
        ..was.clone()
    };
    store.update_key(&was, &now).await.unwrap();
    assert_eq!(
        store.key_by_hash(&was.key_hash).await.unwrap(),
        Some(now.clone())
    );
    assert_eq!(
        store.list_keys(&s.site_id).await.unwrap(),
        vec![now.clone()]
    );
    // Over a key no longer as read (the label changed, or it was revoked): refused.
    assert!(matches!(
        store.update_key(&was, &was).await,
        Err(StoreError::Changed(_))
    ));
    store.revoke_key(&s.site_id, &was.key_id, 7).await.unwrap();
    let relabelled = ApiKey {
        label: Some("again".into()),
        ..now.clone()
    };
    assert!(matches!(
        store.update_key(&now, &relabelled).await,
        Err(StoreError::Changed(_))
    ));
    let stored = store.key_by_hash(&was.key_hash).await.unwrap().unwrap();
    assert_eq!(
        (stored.revoked_at, stored.label.as_deref()),
        (Some(7), Some("billing")),
        "still revoked"
    );
    let (ghost, _) = ApiKey::new(&s.site_id, None, 1);
    assert!(matches!(
        store.update_key(&ghost, &ghost).await,
        Err(StoreError::Changed(_))
    ));
    assert_eq!(store.key_by_hash(&ghost.key_hash).await.unwrap(), None);
}

/// The store decides exactly as the pure limits arithmetic, across minute boundaries.
async fn sliding_window_matches_the_pure_model(store: Arc<dyn Store>) {
    use payfence_core::limits::{evaluate, SecondWindow, TokenUsage};
    let (s, p, t) = setup(&store, 10, 1000).await;
    let minute_end = NOW - NOW % 60_000 + 59_999;
    let mut times: Vec<u64> = (0..12).map(|i| minute_end - 20 + i).collect();
    times.extend((0..5).map(|i| minute_end + 2 + i));
    times.extend((0..10).map(|i| minute_end + 30_001 + i));
    times.extend((0..12).map(|i| minute_end + 61_000 + i * 100));
    let mut model = TokenUsage::default();
    let mut expected = Vec::new();
    for &now in &times {
        let e = evaluate(model, SecondWindow::default(), p.limits(), u64::MAX, now);
        expected.push(e.verdict == Verdict::Allow);
        model = e.usage;
    }
    let mut got = Vec::new();
    for &now in &times {
        got.push(allowed(&count(&store, count_req(&s, &t, &p, now)).await));
    }
    assert_eq!(got, expected);
    assert_eq!(expected.iter().filter(|a| **a).count(), 21);
}

async fn audit_filters_and_cursor(store: Arc<dyn Store>) {
    let s = site("o");
    store.create_site(&s).await.unwrap();
    for i in 0..30u64 {
        let (tok, d, path) = match i % 3 {
            0 => (
                Some("tok_aaaaaaaaaaaaaaaa"),
                DecisionKind::Allow,
                "/v1/flights",
            ),
            1 => (
                Some("tok_bbbbbbbbbbbbbbbb"),
                DecisionKind::Allow,
                "/v1/hotels",
            ),
            _ => (None, DecisionKind::Deny, "/v1/flights/x"),
        };
        store
            .append_audit(audit(&s.site_id, NOW + i * 1000, tok, d, path))
            .await
            .unwrap();
    }
    let q = |f: AuditFilter, limit, cursor: Option<String>| {
        let store = store.clone();
        let site_id = s.site_id.clone();
        async move {
            store
                .query_audit(&site_id, &f, limit, cursor.as_deref())
                .await
                .unwrap()
        }
    };
    let all = q(AuditFilter::default(), 100, None).await;
    assert_eq!(all.items.len(), 30);
    assert!(all.next_cursor.is_none());
    assert!(
        all.items.windows(2).all(|w| w[0].ts_ms > w[1].ts_ms),
        "newest first"
    );

    let f = |g: fn(&mut AuditFilter)| {
        let mut x = AuditFilter::default();
        g(&mut x);
        x
    };
    assert_eq!(
        q(
            f(|x| x.token_id = Some("tok_aaaaaaaaaaaaaaaa".into())),
            100,
            None
        )
        .await
        .items
        .len(),
        10
    );
    assert_eq!(
        q(f(|x| x.decision = Some(DecisionKind::Deny)), 100, None)
            .await
            .items
            .len(),
        10
    );
    assert_eq!(
        q(f(|x| x.reason = Some(Reason::InvalidToken)), 100, None)
            .await
            .items
            .len(),
        10
    );
    assert_eq!(
        q(f(|x| x.plan = Some("pro".into())), 100, None)
            .await
            .items
            .len(),
        20
    );
    assert_eq!(
        q(f(|x| x.path_prefix = Some("/v1/flights".into())), 100, None)
            .await
            .items
            .len(),
        20
    );
    let window = f(|x| {
        x.from_ms = Some(NOW + 5_000);
        x.to_ms = Some(NOW + 9_000);
    });
    assert_eq!(
        q(window, 100, None).await.items.len(),
        5,
        "from and to are inclusive"
    );

    // Pages of 7: everything once, in order.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = q(AuditFilter::default(), 7, cursor.clone()).await;
        assert!(page.items.len() <= 7);
        seen.extend(page.items.iter().map(|r| r.ts_ms));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(
        seen,
        (0..30u64).rev().map(|i| NOW + i * 1000).collect::<Vec<_>>()
    );
    // Filtered pages too.
    let deny = f(|x| x.decision = Some(DecisionKind::Deny));
    let first = q(deny.clone(), 4, None).await;
    let second = q(deny, 100, first.next_cursor.clone()).await;
    assert_eq!(first.items.len() + second.items.len(), 10);
    // Windows that hold nothing are empty pages, not errors: from after to (the
    // dashboard moves from up to the retention's start), or a cursor before from.
    let early = q(AuditFilter::default(), 25, None).await.next_cursor;
    let late = f(|x| x.from_ms = Some(NOW + 20_000));
    assert!(q(late, 100, early).await.items.is_empty());
    let inverted = f(|x| {
        x.from_ms = Some(NOW + 20_000);
        x.to_ms = Some(NOW + 10_000);
    });
    let page = q(inverted, 100, None).await;
    assert!(page.items.is_empty() && page.next_cursor.is_none());
    assert!(store
        .query_audit(&s.site_id, &AuditFilter::default(), 5, Some("garbage!"))
        .await
        .is_err());
    // Records carry their retention end.
    assert!(all
        .items
        .iter()
        .all(|r| r.expires_at == r.ts_ms / 1000 + 90 * 86_400));
}

/// Records of counted decisions, written in two concurrent waves whose timestamps
/// interleave (on the embedded store each wave is its own checkpoint, so blocks
/// overlap in time): queries still return them newest first, once each, across
/// pages, windows and filters.
async fn audit_of_decisions_from_overlapping_waves(store: Arc<dyn Store>) {
    let (s, p, t) = setup(&store, 10_000, 10_000).await;
    let other = token(&s.site_id, &p.plan_id, None);
    store.create_token(&other).await.unwrap();
    let ts = |i: u64| NOW + i * 100;
    for wave in 0..2 {
        let tasks: Vec<_> = (0..60u64)
            .filter(|i| i % 2 == wave)
            .map(|i| {
                let store = store.clone();
                let req = count_req(&s, if i % 3 == 0 { &other } else { &t }, &p, ts(i));
                tokio::spawn(async move { count(&store, req).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // Reads wait for what the decisions wrote: a checkpoint between the waves.
        store
            .query_audit(&s.site_id, &AuditFilter::default(), 1, None)
            .await
            .unwrap();
    }
    let pages = |f: AuditFilter, limit: usize| {
        let store = store.clone();
        let site_id = s.site_id.clone();
        async move {
            let (mut seen, mut cursor) = (Vec::new(), None::<String>);
            loop {
                let page = store
                    .query_audit(&site_id, &f, limit, cursor.as_deref())
                    .await
                    .unwrap();
                assert!(page.items.len() <= limit);
                seen.extend(page.items.iter().map(|r| r.ts_ms));
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => return seen,
                }
            }
        }
    };
    let newest_first = |is: &mut dyn Iterator<Item = u64>| is.map(ts).collect::<Vec<_>>();
    assert_eq!(
        pages(AuditFilter::default(), 100).await,
        newest_first(&mut (0..60).rev())
    );
    assert_eq!(
        pages(AuditFilter::default(), 7).await,
        newest_first(&mut (0..60).rev())
    );
    let window = AuditFilter {
        from_ms: Some(ts(10)),
        to_ms: Some(ts(25)),
        ..Default::default()
    };
    assert_eq!(
        pages(window.clone(), 5).await,
        newest_first(&mut (10..=25).rev())
    );
    let mine = AuditFilter {
        token_id: Some(other.token_id.clone()),
        ..window
    };
    assert_eq!(
        pages(mine, 2).await,
        newest_first(&mut (10..=25).rev().filter(|i| i % 3 == 0))
    );
}

async fn failed_attempts_and_admin_trail(store: Arc<dyn Store>) {
    let s = site("o");
    store.create_site(&s).await.unwrap();
    let client = hex::encode(ids::random_bytes::<8>());
    let mut last = 0;
    for i in 0..5 {
        last = store
            .record_failed_attempt(
                &s.site_id,
                Some(&client),
                audit(&s.site_id, NOW + i, None, DecisionKind::Deny, "/"),
            )
            .await
            .unwrap();
    }
    assert_eq!(last, 5);
    assert_eq!(
        store
            .record_failed_attempt(
                &s.site_id,
                None,
                audit(&s.site_id, NOW, None, DecisionKind::Deny, "/")
            )
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .query_audit(&s.site_id, &AuditFilter::default(), 100, None)
            .await
            .unwrap()
            .items
            .len(),
        6
    );

    // The site owner's trail holds the changes to its sites, whoever made them and
    // whether or not the site still exists.
    let gone = "site_0000000000000000".to_owned();
    for (i, (site_id, actor, owner)) in [
        (Some(s.site_id.clone()), "admin", Some("alice")),
        (None, "carol", None),
        (Some(s.site_id.clone()), "alice", Some("alice")),
        (Some(gone), "alice", Some("alice")),
        (Some("site_1111111111111111".into()), "bob", Some("bob")),
    ]
    .into_iter()
    .enumerate()
    {
        store
            .record_admin(&AdminEvent {
                id: ids::event_id(),
                ts_ms: NOW + i as u64,
                timestamp: rfc3339_ms(NOW),
                actor: actor.into(),
                role: "site_owner".into(),
                action: format!("a{i}"),
                site_id,
                target: None,
                owner: owner.map(Into::into),
            })
            .await
            .unwrap();
    }
    let actions =
        |page: Page<AdminEvent>| page.items.into_iter().map(|e| e.action).collect::<Vec<_>>();
    let list = |limit, owner, before| store.list_admin(limit, owner, before);
    assert_eq!(
        actions(list(10, Some("alice"), None).await.unwrap()),
        ["a3", "a2", "a0"]
    );
    assert_eq!(actions(list(10, Some("bob"), None).await.unwrap()), ["a4"]);
    assert!(list(10, Some("dave"), None).await.unwrap().items.is_empty());
    assert_eq!(
        actions(list(10, None, None).await.unwrap()),
        ["a4", "a3", "a2", "a1", "a0"]
    );

    // Pages: newest first, each continuing where the last ended, the last without a
    // cursor.
    for owner in [Some("alice"), None] {
        let mut seen = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let cursor = before.as_deref().map(|c| parse_admin_cursor(c).unwrap());
            let page = store.list_admin(2, owner, cursor).await.unwrap();
            assert!(page.items.len() <= 2);
            seen.extend(page.items.iter().map(|e| e.action.clone()));
            match page.next_cursor {
                Some(c) => before = Some(c),
                None => break,
            }
        }
        let all = actions(list(10, owner, None).await.unwrap());
        assert_eq!(seen, all, "{owner:?}");
    }
    let rest = list(3, Some("alice"), None).await.unwrap();
    assert_eq!(
        rest.next_cursor, None,
        "nothing follows a page that holds the rest"
    );
    assert_eq!(list(1, None, None).await.unwrap().items.len(), 1);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = super::EmbeddedStore::open(&dir.path().join("db.redb")).unwrap();
                    super::$name(super::Arc::new(store)).await;
                }
            )*
        }
        mod dynamodb_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(store) = super::dynamo().await else { return };
                    super::$name(store).await;
                }
            )*
        }
    };
}

/// A fresh table on the test server, or `None` (skipped) outside CI without one.
async fn dynamo() -> Option<Arc<dyn Store>> {
    let endpoint = match std::env::var("PAYFENCE_TEST_DYNAMODB") {
        Ok(e) if !e.is_empty() => e,
        _ if std::env::var_os("CI").is_some() => {
            panic!("PAYFENCE_TEST_DYNAMODB is not set: run the tests with scripts/test.sh")
        }
        _ => {
            eprintln!("SKIPPED: no DynamoDB test server (run scripts/test.sh)");
            return None;
        }
    };
    let table = format!("conformance-{}", hex::encode(ids::random_bytes::<6>()));
    let store = DynamoStore::connect(&table, Some(&endpoint)).await;
    store.ensure_table().await.unwrap();
    Some(Arc::new(store))
}

conformance!(
    sites_and_plans,
    tokens_and_keys,
    rate_limit_exact_under_concurrency,
    quota_exact_under_concurrency_and_events_once,
    deleting_a_site_deletes_its_quota_events,
    revocation_and_missing_tokens,
    token_updates,
    plans_are_deleted_only_without_active_tokens,
    plan_deletion_races_token_issue,
    revocation_races_a_move,
    key_updates,
    usage_of_many_tokens_at_once,
    sliding_window_matches_the_pure_model,
    audit_filters_and_cursor,
    audit_of_decisions_from_overlapping_waves,
    failed_attempts_and_admin_trail,
);

/// Counts, revocation and audit records survive closing and reopening, cycle after
/// cycle (through the write-ahead log's replay or its checkpoints, whichever ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_keeps_counts_and_audit_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let open = || -> Arc<dyn Store> { Arc::new(EmbeddedStore::open(&path).unwrap()) };
    let store = open();
    let (s, p, t) = setup(&store, 1000, 1000).await;
    let other = token(&s.site_id, &p.plan_id, None);
    store.create_token(&other).await.unwrap();
    drop(store);
    for cycle in 1..=3u64 {
        let store = open();
        for i in 0..25 {
            assert!(allowed(
                &count(&store, count_req(&s, &t, &p, NOW + i)).await
            ));
        }
        if cycle == 2 {
            store
                .revoke_token(&s.site_id, &other.token_id, 1)
                .await
                .unwrap();
        }
        drop(store);
        let store = open();
        assert_eq!(
            store.token_usage(&t.token_id).await.unwrap().quota.used,
            25 * cycle
        );
        let logs = store
            .query_audit(&s.site_id, &AuditFilter::default(), 1000, None)
            .await
            .unwrap();
        let mine = logs
            .items
            .iter()
            .filter(|r| r.token_id.as_deref() == Some(t.token_id.as_str()));
        assert_eq!(mine.count() as u64, 25 * cycle);
        let other_counted = count(&store, count_req(&s, &other, &p, NOW + 100)).await;
        assert_eq!(
            other_counted == Counted::Revoked,
            cycle >= 2,
            "cycle {cycle}"
        );
        drop(store);
    }
}

#[tokio::test]
async fn embedded_purges_expired_audit_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("db.redb")).unwrap();
    // At this time, records made before NOW + 1000 (a second after NOW's) are past
    // their retention.
    let now_s = NOW / 1000 + AUDIT_RETENTION_SECS;
    let s = site("o");
    for ts in [NOW + 1000, NOW - 1] {
        let r = audit(&s.site_id, ts, None, DecisionKind::Deny, "/");
        store.append_audit(r).await.unwrap();
    }
    // Records of decisions (written in blocks by checkpoints): two of three expired.
    let store: Arc<dyn Store> = Arc::new(store);
    let (s2, p, t) = setup(&store, 100, 100).await;
    for ts in [NOW + 998, NOW + 999, NOW + 1000] {
        count(&store, count_req(&s2, &t, &p, ts)).await;
    }
    store
        .query_audit(&s2.site_id, &AuditFilter::default(), 1, None)
        .await
        .unwrap(); // waits for the checkpoint
    assert_eq!(store.purge_expired(now_s).await.unwrap(), 3);
    let left = |site_id: String| {
        let store = store.clone();
        async move {
            let all = AuditFilter::default();
            let items = store
                .query_audit(&site_id, &all, 10, None)
                .await
                .unwrap()
                .items;
            items.iter().map(|r| r.ts_ms).collect::<Vec<_>>()
        }
    };
    assert_eq!(left(s.site_id.clone()).await, [NOW + 1000]);
    assert_eq!(left(s2.site_id.clone()).await, [NOW + 1000]);
    assert_eq!(store.purge_expired(now_s).await.unwrap(), 0);
}

/// A backup taken while decisions go on holds every decision acknowledged before it
/// began, and opens as a store of its own; it never writes over an existing file.
#[tokio::test]
async fn embedded_backup_holds_every_acknowledged_decision_while_decisions_go_on() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(&dir.path().join("db.redb")).unwrap();
    let store: Arc<dyn Store> = Arc::new(embedded.clone());
    let (s, p, t) = setup(&store, 10_000, 1_000_000).await;
    let (acked, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    // Decisions 10 ms apart: within the site's 1,000 a second and the plan's limits.
    let tick = Arc::new(AtomicU64::new(0));
    let deciders: Vec<_> = (0..4)
        .map(|_| {
            let (store, acked, stop) = (store.clone(), acked.clone(), stop.clone());
            let (s, p, t, tick) = (s.clone(), p.clone(), t.clone(), tick.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let at = NOW + 10 * tick.fetch_add(1, Ordering::SeqCst);
                    assert!(allowed(&count(&store, count_req(&s, &t, &p, at)).await));
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    while acked.load(Ordering::SeqCst) < 200 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let copy = tempfile::tempdir().unwrap();
    let before = acked.load(Ordering::SeqCst);
    embedded.backup(&copy.path().join("db.redb")).await.unwrap();
    let during = acked.load(Ordering::SeqCst);
    stop.store(true, Ordering::Relaxed);
    for d in deciders {
        d.await.unwrap();
    }
    assert!(
        matches!(
            embedded.backup(&copy.path().join("db.redb")).await,
            Err(StoreError::Conflict(_))
        ),
        "an existing file is never written over"
    );

    let restored: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&copy.path().join("db.redb")).unwrap());
    assert_eq!(
        restored.get_token(&s.site_id, &t.token_id).await.unwrap(),
        Some(t.clone())
    );
    let used_in = |store: Arc<dyn Store>| {
        let token_id = t.token_id.clone();
        async move {
            store
                .token_usage(&token_id)
                .await
                .unwrap()
                .quota
                .at(NOW)
                .used
        }
    };
    let used = used_in(restored).await;
    assert!(
        (before..=during + 4).contains(&used),
        "{used} used in the copy; {before} acknowledged before it began, {during} when it ended"
    );
    let all = acked.load(Ordering::SeqCst);
    assert_eq!(
        used_in(store).await,
        all,
        "the original goes on with every decision"
    );
}

/// A revoked API key is kept (listed) for as long as audit records, then purged
/// with its hash; active keys and those revoked since stay.
#[tokio::test]
async fn embedded_purges_api_keys_revoked_past_their_keeping() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("db.redb")).unwrap();
    let s = site("o");
    let t0 = NOW / 1000;
    let keys: Vec<ApiKey> = (0..3)
        .map(|_| ApiKey::new(&s.site_id, None, t0).0)
        .collect();
    for k in &keys {
        store.create_key(k).await.unwrap();
    }
    for (k, at) in keys.iter().zip([t0, t0 + 10]) {
        store.revoke_key(&s.site_id, &k.key_id, at).await.unwrap();
    }
    let now_s = t0 + REVOKED_KEPT_SECS;
    let listed = || async {
        let mut ids: Vec<String> = (store.list_keys(&s.site_id).await.unwrap())
            .into_iter()
            .map(|k| k.key_id)
            .collect();
        ids.sort();
        ids
    };
    let mut all: Vec<String> = keys.iter().map(|k| k.key_id.clone()).collect();
    all.sort();
    store.purge_expired(now_s - 1).await.unwrap();
    assert_eq!(listed().await, all, "kept until the time is up");
    store.purge_expired(now_s).await.unwrap();
    let mut left = vec![keys[1].key_id.clone(), keys[2].key_id.clone()];
    left.sort();
    assert_eq!(listed().await, left);
    assert_eq!(store.key_by_hash(&keys[0].key_hash).await.unwrap(), None);
    for k in &keys[1..] {
        let found = store.key_by_hash(&k.key_hash).await.unwrap().unwrap();
        assert_eq!(found.key_id, k.key_id);
    }
}

/// A revoked token is kept (listed, found by its hash, its usage readable) for as
/// long as audit records, then purged with its hash, its usage and its place in its
/// consumer's list; active tokens and those revoked since stay. Checked again
/// after reopening, so it is the database and not memory that lost it.
#[tokio::test]
async fn embedded_purges_tokens_revoked_past_their_keeping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).unwrap());
    let s = site("o");
    store.create_site(&s).await.unwrap();
    let p = plan(&s.site_id, 60, 1000);
    store.create_plan(&p).await.unwrap();
    let t0 = NOW / 1000;
    let tokens: Vec<Token> = (0..3)
        .map(|_| token(&s.site_id, &p.plan_id, Some("carol")))
        .collect();
    for t in &tokens {
        store.create_token(t).await.unwrap();
        assert!(allowed(&count(&store, count_req(&s, t, &p, NOW)).await));
    }
    for (t, at) in tokens.iter().zip([t0, t0 + 10]) {
        store
            .revoke_token(&s.site_id, &t.token_id, at)
            .await
            .unwrap();
    }
    let now_s = t0 + REVOKED_KEPT_SECS;
    let ids = |t: &[Token]| -> Vec<String> {
        let mut ids: Vec<String> = t.iter().map(|t| t.token_id.clone()).collect();
        ids.sort();
        ids
    };
    store.purge_expired(now_s - 1).await.unwrap();
    tokens_kept(&*store, &tokens, &ids(&tokens)).await;
    store.purge_expired(now_s).await.unwrap();
    let left = ids(&tokens[1..]);
    tokens_kept(&*store, &tokens, &left).await;
    drop(store);
    tokens_kept(&EmbeddedStore::open(&path).unwrap(), &tokens, &left).await;
}

/// Of `tokens` (one site's, all `carol`'s, each with one request counted), the
/// store has exactly `kept` (sorted ids): listed, found and with their usage.
async fn tokens_kept(store: &dyn Store, tokens: &[Token], kept: &[String]) {
    let ids = |page: Page<Token>| {
        let mut ids: Vec<String> = page.items.into_iter().map(|t| t.token_id).collect();
        ids.sort();
        ids
    };
    let site_id = &tokens[0].site_id;
    let site_list = store.list_tokens_page(site_id, 10, None).await.unwrap();
    assert_eq!(ids(site_list), kept);
    let mine = store.list_consumer_tokens_page("carol", 10, None).await;
    assert_eq!(ids(mine.unwrap()), kept);
    for t in tokens {
        let is_kept = kept.contains(&t.token_id);
        let by_hash = store.token_by_hash(&t.token_hash).await.unwrap();
        assert_eq!(
            by_hash.map(|t| t.token_id),
            is_kept.then(|| t.token_id.clone())
        );
        let found = store.get_token(site_id, &t.token_id).await.unwrap();
        assert_eq!(found.is_some(), is_kept);
        let used = store.token_usage(&t.token_id).await.unwrap().quota.used;
        assert_eq!(used, u64::from(is_kept), "{}", t.token_id);
    }
}

#[tokio::test]
async fn dynamodb_table_has_ttl_on_expires_at_and_records_carry_it() {
    let Some(endpoint) = std::env::var("PAYFENCE_TEST_DYNAMODB")
        .ok()
        .filter(|e| !e.is_empty())
        .or_else(|| {
            assert!(
                std::env::var_os("CI").is_none(),
                "PAYFENCE_TEST_DYNAMODB is not set: run scripts/test.sh"
            );
            None
        })
    else {
        return;
    };
    let table = format!("ttl-{}", hex::encode(ids::random_bytes::<6>()));
    let store = DynamoStore::connect(&table, Some(&endpoint)).await;
    store.ensure_table().await.unwrap();
    let ttl = store
        .client()
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    let desc = ttl.time_to_live_description().unwrap();
    assert_eq!(desc.attribute_name(), Some("expires_at"));
    let s = site("o");
    let r = audit(&s.site_id, NOW, None, DecisionKind::Deny, "/");
    store.append_audit(r.clone()).await.unwrap();
    store
        .query_audit(&s.site_id, &AuditFilter::default(), 1, None)
        .await
        .unwrap(); // waits for the write
    let items = store
        .client()
        .scan()
        .table_name(&table)
        .send()
        .await
        .unwrap()
        .items
        .unwrap_or_default();
    let item = items
        .iter()
        .find(|i| {
            i.get("pk")
                .and_then(|v| v.as_s().ok())
                .is_some_and(|p| p.starts_with("AUDIT#"))
        })
        .unwrap();
    assert_eq!(
        item.get("expires_at").unwrap().as_n().unwrap(),
        &r.expires_at.to_string()
    );
    // A revoked API key expires too, once past the time it stays listed; an
    // active one never does.
    let (active, revoked) = (
        ApiKey::new(&s.site_id, None, 1).0,
        ApiKey::new(&s.site_id, None, 1).0,
    );
    for k in [&active, &revoked] {
        store.create_key(k).await.unwrap();
    }
    store
        .revoke_key(&s.site_id, &revoked.key_id, 7)
        .await
        .unwrap();
    // An item's `expires_at`, if it has one.
    let expiry_of = |pk: String, sk: &str| {
        let get = store
            .client()
            .get_item()
            .table_name(&table)
            .key("pk", AttributeValue::S(pk))
            .key("sk", AttributeValue::S(sk.into()))
            .consistent_read(true)
            .send();
        async move {
            let item = get.await.unwrap().item.unwrap();
            item.get("expires_at").map(|v| v.as_n().unwrap().clone())
        }
    };
    for (k, expiry) in [
        (&active, None),
        (&revoked, Some((7 + REVOKED_KEPT_SECS).to_string())),
    ] {
        let at = expiry_of(format!("KEYHASH#{}", k.key_hash), "KEY").await;
        assert_eq!(at, expiry);
    }
    // So does a revoked token: its record, usage and hash items, at the first
    // revocation's time + 90 days (a second one changes nothing); an active
    // token's never do.
    let p = plan(&s.site_id, 60, 1000);
    store.create_plan(&p).await.unwrap();
    let (active, revoked) = (
        token(&s.site_id, &p.plan_id, None),
        token(&s.site_id, &p.plan_id, None),
    );
    for t in [&active, &revoked] {
        store.create_token(t).await.unwrap();
    }
    for at in [7, 9] {
        let t = store
            .revoke_token(&s.site_id, &revoked.token_id, at)
            .await
            .unwrap();
        assert_eq!(t.unwrap().revoked_at, Some(7));
    }
    for (t, expiry) in [
        (&active, None),
        (&revoked, Some((7 + REVOKED_KEPT_SECS).to_string())),
    ] {
        for (pk, sk) in [
            (format!("TOKEN#{}", t.token_id), "TOKEN"),
            (format!("TOKEN#{}", t.token_id), "USAGE"),
            (format!("TOKENHASH#{}", t.token_hash), "TOKENHASH"),
        ] {
            assert_eq!(expiry_of(pk, sk).await, expiry, "{sk}");
        }
    }
}
