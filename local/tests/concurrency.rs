//! Exactness under concurrency: no rate-limit or quota overshoot, one event each.

mod common;

use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limit_is_exact_under_200_concurrent_requests() {
    let app = spawn_app().await;
    let s = app.setup(60, 100_000).await;
    avoid_minute_boundary().await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let http = client();
        let url = app.url(&format!("/p/{}/x", s.site_id));
        let token = s.token.clone();
        tasks.push(tokio::spawn(async move {
            http.get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => allowed += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(allowed, 60);
    assert_eq!(s.origin.count(), 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_is_exact_under_32_concurrent_clients_and_warns_once() {
    let app = spawn_app().await;
    let s = app.setup(10_000, 100).await;
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let http = client();
        let url = app.url(&format!("/p/{}/x", s.site_id));
        let token = s.token.clone();
        tasks.push(tokio::spawn(async move {
            let mut allowed = 0;
            for _ in 0..10 {
                let status = http
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .status();
                if status == 200 {
                    allowed += 1;
                } else {
                    assert_eq!(status, 429);
                }
            }
            allowed
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.unwrap();
    }
    assert_eq!(allowed, 100);

    let res = app
        .get(&s.owner, &format!("/api/sites/{}/events", s.site_id))
        .await;
    let events: Value = res.json().await.unwrap();
    let kinds: Vec<(&str, u64)> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["used"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| k.0 == "warning").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| k.0 == "exhausted").count(),
        1,
        "{kinds:?}"
    );
    assert!(kinds.contains(&("warning", 80)) && kinds.contains(&("exhausted", 100)));
    assert_eq!(events["next_cursor"], Value::Null);
    // In pages of one: the same events, then no cursor.
    let events_url = format!("/api/sites/{}/events?limit=1", s.site_id);
    let first: Value = app.get_json(&s.owner, &events_url).await;
    assert_eq!(first["items"][0], events["items"][0]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let second: Value = app
        .get_json(&s.owner, &format!("{events_url}&cursor={cursor}"))
        .await;
    assert_eq!(second["items"][0], events["items"][1]);
    assert_eq!(second["next_cursor"], Value::Null);
    let bad = app.get(&s.owner, &format!("{events_url}&cursor=x")).await;
    assert_eq!(bad.status(), 422);

    // Token usage agrees; the audit log has all 320 decisions.
    let t: Value = app
        .get_json(
            &s.owner,
            &format!("/api/sites/{}/tokens/{}", s.site_id, s.token_id),
        )
        .await;
    assert_eq!(t["usage"]["used"], 100);
    assert_eq!(t["usage"]["remaining"], 0);
    let logs = format!("/api/sites/{}/logs", s.site_id);
    let pages = app.pages(&s.owner, &logs, "limit=100").await;
    let n: usize = (pages.iter())
        .map(|page| page["items"].as_array().unwrap().len())
        .sum();
    assert_eq!(n, 320);
}
