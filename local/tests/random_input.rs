//! Random requests to every route: whatever a client sends, the answer is a clear
//! response, never a 5xx of our own, and the server keeps serving.
//!
//! The requests come from a seeded generator; a failure prints the seed, and
//! `PAYFENCE_TEST_SEED=<seed> cargo test -p payfence-local --test random_input`
//! replays the same requests (with fresh ids).

mod common;

use common::*;
use payfence_core::auth::Role;
use payfence_core::config::Config;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::Value;

/// Requests per worker, and workers sending at once.
const REQUESTS: usize = 500;
const WORKERS: u64 = 4;

const FIELDS: &[&str] = &[
    "name",
    "origin_url",
    "site_requests_per_second",
    "replay_window_seconds",
    "failed_attempts_per_minute",
    "secret_query_params",
    "requests_per_minute",
    "monthly_quota",
    "plan_id",
    "label",
    "consumer",
    "url",
    "rotate_secret",
    "overlap_seconds",
    "token",
    "site_id",
    "method",
    "path",
    "client_ip",
    "x",
];

const VALUES: &[&str] = &[
    "null",
    "true",
    "0",
    "-1",
    "1.5",
    "1e309",
    "18446744073709551616",
    "-9223372036854775809",
    "99999999999999999999999999",
    "[]",
    "{}",
    "[1,{\"a\":null}]",
    "\"\"",
    "\"ok\"",
    "\"GET\"",
    "\"/a/b?c=d\"",
    "\"1.2.3.4\"",
    "\"::1\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"\\r\\nX-Injected: 1\"",
    "\"../../etc/passwd\"",
    "\"http://127.0.0.1:9\"",
    "\"https://api.example.com\"",
    "\"http://169.254.169.254/latest\"",
    "\"https://[::1]/\"",
    "\"https://0x7f.1/\"",
    "\"https://user:pw@api.example.com/\"",
    "\"https://api.example.com:99999/\"",
    "\"ftp://api.example.com\"",
    "\"javascript:alert(1)\"",
];

const QUERY_KEYS: &[&str] = &[
    "limit",
    "cursor",
    "from",
    "to",
    "decision",
    "reason",
    "token_id",
    "plan",
    "path_prefix",
    "mode",
    "format",
    "plan_id",
    "status",
    "consumer",
    "x",
];

const QUERY_VALUES: &[&str] = &[
    "",
    "0",
    "-1",
    "1",
    "1000",
    "1001",
    "99999999999999999999",
    "abc",
    "%00",
    "%ff",
    "%E2%82%AC",
    "%",
    "%zz",
    "allow",
    "deny",
    "proxy",
    "middleware",
    "csv",
    "json",
    "active",
    "revoked",
    "plan_0000000000000000",
    "2026-01-01T00:00:00Z",
    "2026-13-45T99:00:00Z",
    "1700000000",
    "%2F..%2F",
];

/// The run's seed: `PAYFENCE_TEST_SEED` if set, else a fresh one; printed either way.
fn seed() -> u64 {
    let seed = std::env::var("PAYFENCE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("PAYFENCE_TEST_SEED={seed}");
    seed
}

/// What the random requests are aimed at; made again when a request deletes it.
struct Target {
    site_id: String,
    plan_id: String,
    token_id: String,
    token: String,
    key: String,
    _origin: Origin,
}

async fn target(app: &App, owner: &str) -> Target {
    let (listener, addr) = bind_origin().await;
    let site = app.create_site(owner, &format!("http://{addr}")).await;
    let site_id = site["site_id"].as_str().unwrap().to_owned();
    let secret = site["signing_secret"].as_str().unwrap();
    let origin = serve_origin(listener, payfence_signing::Verifier::new(secret));
    let plan_id = app.create_plan(owner, &site_id, 10_000, 1_000_000).await;
    let (token_id, token) = app.create_token(owner, &site_id, &plan_id).await;
    let key = app.create_key(owner, &site_id).await;
    Target {
        site_id,
        plan_id,
        token_id,
        token,
        key,
        _origin: origin,
    }
}

fn json_body(rng: &mut StdRng, t: &Target) -> Vec<u8> {
    let plan = format!("\"{}\"", t.plan_id);
    let token = format!("\"{}\"", t.token);
    let site = format!("\"{}\"", t.site_id);
    let mut fields = Vec::new();
    let count = rng.gen_range(0..6);
    let names: Vec<&str> = FIELDS.choose_multiple(rng, count).copied().collect();
    for name in names {
        let value = match rng.gen_range(0..8) {
            0 => plan.clone(),
            1 => token.clone(),
            2 => site.clone(),
            3 => format!("\"{}\"", "a".repeat(rng.gen_range(200..5000))),
            _ => VALUES.choose(rng).unwrap().to_string(),
        };
        fields.push(format!("\"{name}\":{value}"));
    }
    let mut body = format!("{{{}}}", fields.join(",")).into_bytes();
    if rng.gen_bool(0.15) {
        // Break it: a stray byte somewhere, or cut it short.
        let at = rng.gen_range(0..=body.len());
        match rng.gen_range(0..4) {
            0 => body.truncate(at),
            1 => body.insert(at, 0xff),
            2 => body.insert(at, b'"'),
            _ => body.insert(at, b'\\'),
        }
    }
    body
}

fn query(rng: &mut StdRng) -> String {
    let pairs: Vec<String> = (0..rng.gen_range(1..4))
        .map(|_| {
            format!(
                "{}={}",
                QUERY_KEYS.choose(rng).unwrap(),
                QUERY_VALUES.choose(rng).unwrap()
            )
        })
        .collect();
    pairs.join("&")
}

/// One random request, mostly well aimed (a route's own methods, a valid JWT).
fn request(
    rng: &mut StdRng,
    app: &App,
    t: &Target,
    jwts: &[String],
) -> (Method, String, reqwest::RequestBuilder) {
    let s = format!("/api/sites/{}", t.site_id);
    let routes: Vec<(String, &[&str])> = vec![
        ("/api/sites".into(), &["GET", "POST"]),
        (s.clone(), &["GET", "PATCH", "DELETE"]),
        (format!("{s}/plans"), &["GET", "POST"]),
        (
            format!("{s}/plans/{}", t.plan_id),
            &["GET", "PATCH", "DELETE"],
        ),
        (format!("{s}/tokens"), &["GET", "POST"]),
        (
            format!("{s}/tokens/{}", t.token_id),
            &["GET", "PATCH", "DELETE"],
        ),
        (
            format!("{s}/tokens/tok_0000000000000000"),
            &["GET", "PATCH", "DELETE"],
        ),
        (format!("{s}/api-keys"), &["GET", "POST"]),
        (
            format!("{s}/api-keys/key_0000000000000000"),
            &["GET", "PATCH", "DELETE"],
        ),
        (format!("{s}/signing-secret/rotate"), &["POST"]),
        (format!("{s}/webhook"), &["GET", "PUT"]),
        (format!("{s}/logs"), &["GET"]),
        (format!("{s}/logs/export"), &["GET"]),
        (format!("{s}/events"), &["GET"]),
        (format!("{s}/usage"), &["GET"]),
        ("/api/sites/site_0000000000000000/plans".into(), &["GET"]),
        ("/api/me/tokens".into(), &["GET"]),
        ("/api/audit-trail".into(), &["GET"]),
        ("/api/health".into(), &["GET"]),
        ("/v1/authorize".into(), &["POST"]),
        (format!("/p/{}/a/b", t.site_id), &["GET", "POST", "PUT"]),
        ("/.well-known/jwks.json".into(), &["GET"]),
    ];
    let (path, methods) = routes.choose(rng).unwrap();
    let method = if rng.gen_bool(0.85) {
        methods.choose(rng).unwrap().to_string()
    } else {
        ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
            .choose(rng)
            .unwrap()
            .to_string()
    };
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let mut url = path.clone();
    if rng.gen_bool(0.4) {
        url = format!("{url}?{}", query(rng));
    }
    let mut req = app.http.request(method.clone(), app.url(&url));
    // Credentials: the route's own kind mostly, sometimes another or a broken one.
    let credential = if path.starts_with("/v1/") {
        [t.key.as_str(), "sk_garbage", ""]
            .choose(rng)
            .unwrap()
            .to_string()
    } else if path.starts_with("/p/") {
        [t.token.as_str(), "pf_live_garbage", "x"]
            .choose(rng)
            .unwrap()
            .to_string()
    } else {
        match rng.gen_range(0..8) {
            0 => String::new(),
            1 => "not.a.jwt".into(),
            _ => jwts.choose(rng).unwrap().clone(),
        }
    };
    if !credential.is_empty() {
        req = req.bearer_auth(credential);
    }
    if method != Method::GET && method != Method::HEAD && rng.gen_bool(0.9) {
        let content_type = if rng.gen_bool(0.9) {
            "application/json"
        } else {
            "text/plain"
        };
        req = req
            .header("content-type", content_type)
            .body(json_body(rng, t));
    }
    (method, url, req)
}

/// Check one answer: no 5xx of our own, a request id, and for our own endpoints a
/// problem+json body whose `status` is the response's (naming the field on 422).
async fn check(method: &Method, url: &str, res: reqwest::Response, seed: u64) {
    let status = res.status().as_u16();
    let what = format!("{method} {url} -> {status} (PAYFENCE_TEST_SEED={seed})");
    let proxied = url.starts_with("/p/");
    assert!(
        status < 500 || (proxied && matches!(status, 502 | 504)),
        "{what}: {}",
        res.text().await.unwrap_or_default()
    );
    assert!(
        header(&res, "x-payfence-request-id").is_some(),
        "{what}: no request id"
    );
    if status < 400 || method == Method::HEAD {
        return;
    }
    let content_type = header(&res, "content-type").unwrap_or_default().to_owned();
    let body = res.text().await.unwrap();
    if proxied && body == "invalid PayFence signature\n" {
        return; // the origin's own answer (its verifier rejects a rotated-out secret)
    }
    assert_eq!(content_type, "application/problem+json", "{what}: {body}");
    let problem: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(problem["status"], status, "{what}: {body}");
    assert!(problem["title"].is_string(), "{what}: {body}");
    if status == 422 {
        assert!(problem["field"].is_string(), "{what}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_to_every_route_get_a_clear_answer() {
    let seed = seed();
    let app = std::sync::Arc::new(
        spawn_app_with(Config {
            dashboard_requests_per_second: 1_000_000,
            health_requests_per_second: 1_000_000,
            ..test_config()
        })
        .await,
    );
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let app = app.clone();
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w));
                // Each worker is its own owner, so one worker deleting its site leaves
                // the others' alone; the admin and the consumer reach them all.
                let owner = app.jwt(&format!("owner{w}"), Role::SiteOwner);
                let jwts = [
                    owner.clone(),
                    owner.clone(),
                    app.jwt("root", Role::Admin),
                    app.jwt("carl", Role::Consumer),
                    app.jwt(&format!("other{w}"), Role::SiteOwner),
                ];
                let mut t = target(&app, &owner).await;
                for i in 0..REQUESTS {
                    let (method, url, req) = request(&mut rng, &app, &t, &jwts);
                    let res = req.send().await.unwrap();
                    check(&method, &url, res, seed).await;
                    // A fresh target when this one is gone, and every 50 requests, so
                    // no site stays revoked, rotated or renamed for the whole run.
                    if i % 50 == 49
                        || app
                            .get(&owner, &format!("/api/sites/{}", t.site_id))
                            .await
                            .status()
                            == 404
                    {
                        t = target(&app, &owner).await;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    // Still serving, and the store still answers.
    let health = app.http.get(app.url("/api/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let s = app.setup(60, 100).await;
    let res = app.proxy_get(&s.site_id, "/after", &s.token).await;
    assert_eq!(res.status(), 200);
}

/// Pieces of a request target: unreserved and reserved characters, encodings of
/// separators and of dots, spaces, non-ASCII, and bytes a request line may not carry.
const PATH_PIECES: &[&str] = &[
    "a", "Z9", "-", "_", "~", ".", "..", "...", ".x", "x.", "/", "//", "%2F", "%2f", "%2e",
    "%2E%2E", "%5C", "\\", "%25", "%20", "%00", "%C3%A4", "ä", ";", ",", "=", "+", "!", "$", "&",
    "'", "(", ")", "*", ":", "@", "[", "]", "{", "}", "|", "^", "`", "\"", "<", ">", "#", "%",
    "%zz", "?", "\t",
];

#[tokio::test]
async fn random_paths_reach_the_origin_exactly_as_signed() {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let app = spawn_app().await;
    let s = app.setup(10_000, 1_000_000).await;
    let mut forwarded = 0;
    for _ in 0..400 {
        let mut target = String::new();
        for _ in 0..rng.gen_range(1..8) {
            if rng.gen_bool(0.4) {
                target.push('/');
            }
            target.push_str(PATH_PIECES.choose(&mut rng).unwrap());
        }
        let target = format!("/{target}");
        let req = format!(
            "GET /p/{}{target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            s.site_id, s.token
        );
        let res = raw_request(&app.base, req.as_bytes()).await;
        let what = format!("{target:?} (PAYFENCE_TEST_SEED={seed}): {res}");
        if res.starts_with("HTTP/1.1 200") {
            // Signed as sent, received as signed: the origin's verifier let it through.
            forwarded += 1;
            assert_eq!(s.origin.count(), forwarded, "{what}");
            // (A fragment is not part of the target: hyper drops it, as it should.)
            let sent = target.split('#').next().unwrap();
            assert_eq!(s.origin.last().path_and_query, sent, "{what}");
        } else {
            // Refused before the origin: a request line hyper cannot parse, or a path
            // PayFence will not forward (dot segments), each a 400.
            assert!(res.starts_with("HTTP/1.1 400"), "{what}");
            assert_eq!(s.origin.count(), forwarded, "{what}");
        }
    }
    eprintln!("{forwarded} of 400 random targets forwarded");
    assert!(forwarded > 100, "too few forwarded to test anything");
}

/// Random header sets through the proxy: the origin gets every end-to-end header as
/// sent, and none of the hop-by-hop ones (also those `Connection` names), the
/// client's token or anything the client claims in PayFence's own headers.
#[tokio::test]
async fn random_headers_reach_the_origin_stripped_of_hop_by_hop_and_token() {
    const HOP_BY_HOP: &[(&str, &str)] = &[
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic eDp5"),
        ("TE", "trailers"),
        ("Trailer", "x-checksum"),
    ];
    const SPOOFED: &[(&str, &str)] = &[
        ("X-PayFence-Signature", "v1=forged"),
        ("X-PayFence-Timestamp", "1"),
        ("X-PayFence-Token-Id", "tok_forged"),
        ("X-PayFence-Plan", "gold"),
        ("X-PayFence-Anything", "forged"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9"),
        ("X-Real-IP", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
    ];
    const VALUES: &[&str] = &[
        "plain",
        "a, b, c",
        "\"quoted, with comma\"",
        "x=y; z",
        "",
        "  padded  ",
        "caf\u{e9}",
        "tab\there",
        "%0d%0a",
    ];
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let app = spawn_app().await;
    let s = app.setup(10_000, 1_000_000).await;
    for n in 0..150 {
        let via_token_header = rng.gen_bool(0.5);
        let mut head = vec![("Host".to_owned(), "x".to_owned())];
        if via_token_header {
            head.push(("X-PayFence-Token".into(), s.token.clone()));
            // The client's own credentials for the origin pass through.
            head.push(("Authorization".into(), "Basic b3JpZ2luOmNyZWRz".into()));
        } else {
            head.push(("Authorization".into(), format!("Bearer {}", s.token)));
        }
        // End-to-end headers, some repeated; some named in Connection.
        let mut end_to_end: Vec<(String, String)> = Vec::new();
        let mut listed = Vec::new();
        for i in 0..rng.gen_range(0..6) {
            let name = format!("X-E2e-{}", rng.gen_range(0..4));
            let value = format!("{}{i}", VALUES.choose(&mut rng).unwrap());
            if rng.gen_bool(0.2) {
                listed.push(name.to_ascii_lowercase());
            }
            end_to_end.push((name, value));
        }
        head.extend(end_to_end.iter().cloned());
        for (name, value) in HOP_BY_HOP.iter().chain(SPOOFED) {
            if rng.gen_bool(0.4) {
                head.push((name.to_string(), value.to_string()));
            }
        }
        head.shuffle(&mut rng);
        let connection = ["close"]
            .into_iter()
            .chain(listed.iter().map(|n| n.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let mut req = format!("GET /p/{}/h/{n} HTTP/1.1\r\n", s.site_id).into_bytes();
        for (name, value) in &head {
            req.extend_from_slice(format!("{name}: ").as_bytes());
            // Header values travel as bytes: `é` as ISO-8859-1 (obs-text).
            req.extend(value.chars().map(|c| c as u32 as u8));
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(format!("Connection: {connection}\r\n\r\n").as_bytes());
        let res = raw_request(&app.base, &req).await;
        let what = format!(
            "{} (PAYFENCE_TEST_SEED={seed}): {res}",
            String::from_utf8_lossy(&req)
        );
        assert!(res.starts_with("HTTP/1.1 200"), "{what}");
        let seen = s.origin.last();
        assert_eq!(seen.path_and_query, format!("/h/{n}"), "{what}");
        let got = |name: &str| -> Vec<Vec<u8>> {
            seen.headers
                .get_all(name)
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect()
        };
        for name in ["x-e2e-0", "x-e2e-1", "x-e2e-2", "x-e2e-3"] {
            let sent: Vec<Vec<u8>> = if listed.iter().any(|l| l == name) {
                vec![] // named in Connection: hop-by-hop
            } else {
                head.iter() // in the order sent
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().chars().map(|c| c as u32 as u8).collect())
                    .collect()
            };
            assert_eq!(got(name), sent, "{name}: {what}");
        }
        for (name, _) in HOP_BY_HOP {
            assert!(got(name).is_empty(), "{name}: {what}");
        }
        assert!(got("connection").is_empty(), "{what}");
        assert!(got("x-payfence-token").is_empty(), "{what}");
        for name in [
            "x-payfence-anything",
            "forwarded",
            "x-real-ip",
            "x-forwarded-proto",
        ] {
            assert!(got(name).is_empty(), "{name}: {what}");
        }
        let authorization = via_token_header.then(|| b"Basic b3JpZ2luOmNyZWRz".to_vec());
        assert_eq!(
            got("authorization"),
            Vec::from_iter(authorization),
            "{what}"
        );
        assert_eq!(
            got("x-payfence-token-id"),
            [s.token_id.as_bytes()],
            "{what}"
        );
        assert_eq!(got("x-payfence-plan"), [b"pro"], "{what}");
        assert_eq!(got("x-forwarded-for"), [b"127.0.0.1"], "{what}");
        // The origin's verifier accepted the one signature PayFence made.
        assert_eq!(got("x-payfence-signature").len(), 1, "{what}");
        assert_eq!(got("x-payfence-timestamp").len(), 1, "{what}");
    }
}
