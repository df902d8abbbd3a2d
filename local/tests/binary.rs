//! The real `payfence-local` binary: start-up line, dev-token, restarts (also a hard
//! kill under load), privacy of bodies, and bad input on the wire.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::{json, Value};

struct Server {
    child: Child,
    base: String,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn sigterm(&self) {
        self.signal("TERM");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Wait (up to 30 s) for the server to exit: its status and its logs.
    async fn exited(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running 30 s later"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        std::thread::sleep(std::time::Duration::from_millis(100)); // the last lines
        (status, self.stderr.lock().unwrap().clone())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(
    r: impl std::io::Read + Send + 'static,
    into: Arc<Mutex<String>>,
    ready: Option<std::sync::mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if let (Some(tx), Some(url)) = (&ready, line.strip_prefix("PayFence listening on ")) {
                let _ = tx.send(url.to_owned());
            }
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
}

fn start(dir: &Path) -> Server {
    start_command(server_command(dir))
}

/// The command that starts the server on `dir`, on a free port.
fn server_command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_payfence-local"));
    command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--allow-http-origins",
            "--data-dir",
        ])
        .arg(dir);
    command
}

/// Start `command` (the binary, or a shell that runs it) and wait for its
/// listening line.
fn start_command(mut command: Command) -> Server {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    collect(child.stdout.take().unwrap(), stdout.clone(), Some(tx));
    collect(child.stderr.take().unwrap(), stderr.clone(), None);
    let base = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the listening line");
    assert!(base.starts_with("http://127.0.0.1:"));
    Server {
        child,
        base,
        stdout,
        stderr,
    }
}

fn dev_token(dir: &Path, sub: &str, role: &str) -> String {
    dev_token_with(dir, &["--sub", sub, "--role", role])
}

fn dev_token_with(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_payfence-local"))
        .arg("dev-token")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file()
            && std::fs::read(&path)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
        {
            hits.push(path.display().to_string());
        }
    }
    hits
}

#[tokio::test]
async fn restart_keeps_tokens_and_counts_and_bodies_are_never_kept() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let http = client();
    let jwt = dev_token(dir.path(), "alice", "site_owner"); // while the server runs

    let (site, token, origin) = provision(&http, &server.base, &jwt).await;
    let site_id = site["site_id"].as_str().unwrap().to_owned();

    let marker = format!("MARKER-{}", uuid_like());
    for i in 0..7 {
        let res = http
            .post(format!("{}/p/{site_id}/v1/book?n={i}", server.base))
            .bearer_auth(&token)
            .header("x-respond-with", format!("response-{marker}"))
            .body(format!("request-{marker}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), format!("response-{marker}"));
    }
    assert_eq!(origin.count(), 7);

    // Kill hard: acknowledged decisions must already be on disk.
    let (stdout, stderr) = (server.stdout.clone(), server.stderr.clone());
    drop(server); // SIGKILL
    std::thread::sleep(std::time::Duration::from_millis(300));
    let logs = format!("{}{}", stdout.lock().unwrap(), stderr.lock().unwrap());
    assert!(
        logs.contains("\"target\":\"payfence::request\""),
        "one JSON line per request"
    );
    assert!(!logs.contains(&marker), "a body marker reached the logs");
    assert!(!logs.contains(&token), "a token reached the logs");
    assert!(
        grep_dir(dir.path(), marker.as_bytes()).is_empty(),
        "a body marker reached the data dir"
    );
    assert!(
        grep_dir(dir.path(), token.as_bytes()).is_empty(),
        "a raw token reached the data dir"
    );
    assert!(
        grep_dir(
            dir.path(),
            site["signing_secret"].as_str().unwrap().as_bytes()
        )
        .is_empty(),
        "the signing secret is sealed"
    );
    #[cfg(unix)]
    for key in ["sealing.key", "jwt-signing-key.pem"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }

    let server = start(dir.path());
    let res = http
        .get(format!("{}/p/{site_id}/again", server.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "the token survives a restart");
    assert_eq!(
        header(&res, "ratelimit").map(|r| r.contains("\"month\";r=42")),
        Some(true),
        "{:?}",
        header(&res, "ratelimit")
    );
    let logs = get_json(
        &http,
        &format!("{}/api/sites/{site_id}/logs", server.base),
        &jwt,
    )
    .await;
    assert_eq!(logs["items"].as_array().unwrap().len(), 8);
}

/// The README's backups: a copy of the data directory taken while the server is
/// stopped, and the one it writes on SIGUSR1 while serving, each start a server
/// elsewhere with everything in it (tokens, this month's counts, audit records, the
/// sealed signing secret, the JWT key), once the original is gone. A decision made
/// after the live backup is not in it. The live one is written to
/// `PAYFENCE_BACKUP_DIR` (created if needed), outside the data directory.
#[tokio::test]
async fn a_backup_taken_stopped_or_while_serving_restores_everything() {
    for live in [false, true] {
        let original = tempfile::tempdir().unwrap();
        // A live backup goes where PAYFENCE_BACKUP_DIR says.
        let backups = tempfile::tempdir().unwrap();
        let mut command = server_command(original.path());
        if live {
            command.env("PAYFENCE_BACKUP_DIR", backups.path().join("here"));
        }
        let mut server = start_command(command);
        let http = client();
        let jwt = dev_token(original.path(), "alice", "site_owner");
        let (site, token, origin) = provision(&http, &server.base, &jwt).await;
        let site_id = site["site_id"].as_str().unwrap().to_owned();
        let call = |base: String| {
            let request = http
                .get(format!("{base}/p/{site_id}/v1/flights"))
                .bearer_auth(&token);
            async move { request.send().await.unwrap() }
        };
        for _ in 0..5 {
            assert_eq!(call(server.base.clone()).await.status(), 200);
        }
        let from = if live {
            server.signal("USR1");
            let dir = backup_written(&server).await;
            assert_eq!(dir.parent(), Some(backups.path().join("here").as_path()));
            assert!(!original.path().join("backups").exists());
            assert_eq!(call(server.base.clone()).await.status(), 200);
            dir
        } else {
            server.sigterm();
            assert!(server.exited().await.0.success());
            original.path().to_owned()
        };
        drop(server);
        let copy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != "backups" {
                assert!(entry.file_type().unwrap().is_file(), "{entry:?}");
                std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
            }
        }
        drop(original);

        let server = start(copy.path());
        let res = call(server.base.clone()).await;
        assert_eq!(
            res.status(),
            200,
            "the token, and a signature the origin accepts"
        );
        assert_eq!(origin.count(), if live { 7 } else { 6 });
        let ratelimit = header(&res, "ratelimit").unwrap_or_default();
        assert!(
            ratelimit.contains("\"month\";r=44"),
            "live {live}: {ratelimit}"
        );
        let logs = get_json(
            &http,
            &format!("{}/api/sites/{site_id}/logs", server.base),
            &jwt,
        )
        .await;
        assert_eq!(
            logs["items"].as_array().unwrap().len(),
            6,
            "live {live}: {logs}"
        );
    }
}

/// A backup that fails part-way (here: a key gone from the data directory) is
/// logged, leaves no directory behind that could pass for a backup, and the server
/// serves on.
#[tokio::test]
async fn a_failed_backup_leaves_nothing_behind_and_the_server_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    std::fs::remove_file(dir.path().join("jwt-signing-key.pem")).unwrap();
    server.signal("USR1");
    let line = log_line(&server, "backup failed").await;
    assert!(line.contains("jwt-signing-key.pem is missing"), "{line}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("backups"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let health = client()
        .get(format!("{}/api/health", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

/// A data directory the server creates (parents too), and each backup it writes,
/// are open to their owner only: directories 0700, the database, its log and the
/// keys 0600, whatever the umask. (`dev-token` on a new directory does the same.) An
/// existing directory that others may enter is used as it is, with a warning.
#[tokio::test]
async fn the_data_directory_and_its_backups_are_private_to_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| {
        format!(
            "{:o}",
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        )
    };
    let root = tempfile::tempdir().unwrap();
    let (dir, backups) = (root.path().join("a/data"), root.path().join("b/backups"));
    let mut command = server_command(&dir);
    command.env("PAYFENCE_BACKUP_DIR", &backups);
    let server = start_command(command);
    server.signal("USR1");
    let backup = backup_written(&server).await;
    for d in [
        root.path().join("a"),
        dir.clone(),
        root.path().join("b"),
        backups,
        backup.clone(),
    ] {
        assert_eq!(mode(&d), "700", "{}", d.display());
    }
    let files = [
        "payfence.redb",
        "payfence.wal0",
        "payfence.wal1",
        "sealing.key",
        "jwt-signing-key.pem",
    ];
    for f in files {
        assert_eq!(mode(&dir.join(f)), "600", "{f}");
    }
    for f in ["payfence.redb", "sealing.key", "jwt-signing-key.pem"] {
        assert_eq!(mode(&backup.join(f)), "600", "backup {f}");
    }
    let other = root.path().join("c/data");
    dev_token(&other, "alice", "site_owner");
    assert_eq!(mode(&other), "700");
    // One made open to others is used, with a warning.
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = start(&other);
    let line = log_line(&server, "the data directory is open to other users").await;
    assert!(line.contains("\"mode\":\"755\""), "{line}");
}

/// Wait (up to 30 s) for the server's "backup written" log line: the backup's
/// directory.
async fn backup_written(server: &Server) -> std::path::PathBuf {
    let line = log_line(server, "backup written").await;
    let v: Value = serde_json::from_str(&line).unwrap();
    v["dir"].as_str().unwrap_or_else(|| panic!("{line}")).into()
}

/// Wait (up to 30 s) for a log line holding `message`.
async fn log_line(server: &Server, message: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let logs = server.stderr.lock().unwrap().clone();
        if let Some(line) = logs.lines().find(|l| l.contains(message)) {
            return line.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {message:?}: {logs}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// One JSON line per request on stderr, with the fields the runbooks query, under
/// the response's request id; a line for each dashboard change; no key twice in a
/// line; and no query, token, key, JWT or address anywhere in the logs.
#[tokio::test]
async fn log_lines_carry_their_fields_and_nothing_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let http = client();
    let jwt = dev_token(dir.path(), "alice", "site_owner");
    let (site, token, _origin) = provision(&http, &server.base, &jwt).await;
    let (base, site_id) = (&server.base, site["site_id"].as_str().unwrap());
    let key = post_json(
        &http,
        &format!("{base}/api/sites/{site_id}/api-keys"),
        &jwt,
        &json!({}),
    )
    .await;
    let key = key["key"].as_str().unwrap();
    let secret = "QUERYVALUE4711";

    let mut ids = Vec::new();
    let mut sent = |res: reqwest::Response, status: u16| {
        assert_eq!(res.status(), status, "{}", res.url());
        ids.push(header(&res, "x-payfence-request-id").unwrap().to_owned());
        res
    };
    let proxied = format!("{base}/p/{site_id}/v1/flights?card={secret}");
    sent(
        http.get(&proxied).bearer_auth(&token).send().await.unwrap(),
        200,
    );
    let bad = format!("pf_live_{}", "A".repeat(43));
    sent(
        http.get(&proxied).bearer_auth(&bad).send().await.unwrap(),
        401,
    );
    let decided: Value = sent(
        http.post(format!("{base}/v1/authorize"))
            .bearer_auth(key)
            .json(&json!({"token": token, "method": "GET", "path": format!("/v1/a?card={secret}")}))
            .send()
            .await
            .unwrap(),
        200,
    )
    .json()
    .await
    .unwrap();
    let token_id = decided["token_id"].as_str().unwrap();
    let plans = format!("{base}/api/sites/{site_id}/plans");
    sent(
        http.get(&plans).bearer_auth(&jwt).send().await.unwrap(),
        200,
    );
    sent(http.get(&plans).send().await.unwrap(), 401);
    sent(
        http.get(format!("{base}/api/health")).send().await.unwrap(),
        200,
    );

    // The lines are written in batches: wait for the last one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let logs = loop {
        let logs = server.stderr.lock().unwrap().clone();
        if logs.contains(ids.last().unwrap().as_str()) || std::time::Instant::now() > deadline {
            break logs;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            for k in v.as_object().unwrap().keys() {
                // A quoted key followed by `:` can only be a key (a value's quotes are escaped).
                assert_eq!(l.matches(&format!("\"{k}\":")).count(), 1, "{k} twice: {l}");
            }
            v
        })
        .collect();
    let line = |id: &str| {
        let mine: Vec<&Value> = lines
            .iter()
            .filter(|l| l["target"] == "payfence::request" && l["request_id"] == id)
            .collect();
        assert_eq!(mine.len(), 1, "one line for request {id}");
        mine[0].clone()
    };
    let numbers = |l: &Value, fields: &[&str]| {
        for f in fields {
            assert!(l[f].as_f64().is_some_and(|ms| ms >= 0.0), "{f}: {l}");
        }
    };
    let absent = |l: &Value, fields: &[&str]| {
        for f in fields {
            assert!(l.get(f).is_none(), "{f}: {l}");
        }
    };

    let allowed = line(&ids[0]);
    assert_eq!(allowed["level"], "INFO");
    assert_eq!(allowed["method"], "GET");
    assert_eq!(allowed["route"], "/p/{site_id}/{*rest}");
    assert_eq!(allowed["status"], 200);
    assert_eq!(allowed["site_id"], site_id);
    assert_eq!(allowed["token_id"], token_id);
    assert_eq!(allowed["decision"], "allow");
    numbers(&allowed, &["auth_ms", "origin_ms", "total_ms"]);
    absent(&allowed, &["reason"]);

    let denied = line(&ids[1]);
    assert_eq!(denied["status"], 401);
    assert_eq!(denied["site_id"], site_id);
    assert_eq!(
        (&denied["decision"], &denied["reason"]),
        (&json!("deny"), &json!("invalid_token"))
    );
    numbers(&denied, &["auth_ms", "total_ms"]);
    absent(&denied, &["token_id", "origin_ms"]);

    let authorized = line(&ids[2]);
    assert_eq!(authorized["route"], "/v1/authorize");
    assert_eq!(authorized["site_id"], site_id);
    assert_eq!(authorized["token_id"], token_id);
    assert_eq!(authorized["decision"], "allow");
    numbers(&authorized, &["auth_ms", "total_ms"]);

    for (i, status) in [(3, 200), (4, 401)] {
        let dashboard = line(&ids[i]);
        assert_eq!(dashboard["route"], "/api/sites/{site_id}/plans");
        assert_eq!(dashboard["status"], status);
        assert_eq!(
            dashboard["site_id"], site_id,
            "the site a dashboard call is about"
        );
        numbers(&dashboard, &["total_ms"]);
        absent(&dashboard, &["decision", "token_id"]);
    }
    let health = line(&ids[5]);
    assert_eq!(
        (&health["route"], &health["status"]),
        (&json!("/api/health"), &json!(200))
    );
    absent(&health, &["site_id"]);

    let changes: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "payfence::admin")
        .collect();
    let actions: Vec<&str> = changes
        .iter()
        .map(|l| l["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "site.create",
            "plan.create",
            "token.create",
            "api_key.create"
        ]
    );
    for change in &changes {
        assert_eq!(
            (&change["actor"], &change["site_id"]),
            (&json!("alice"), &json!(site_id))
        );
    }
    assert_eq!(changes[2]["target_id"], token_id, "what was changed");

    for needle in [
        secret,
        token.as_str(),
        bad.as_str(),
        key,
        jwt.as_str(),
        "127.0.0.1",
    ] {
        assert!(!logs.contains(needle), "{needle} reached the logs");
    }
}

/// Killed hard in the middle of a load: every decision a client was told of is
/// there after the restart, counted and in the audit log, and nothing more than was
/// sent. (A process crash: it shows that no answer goes out before its decision is in
/// the log and that the log is replayed; surviving power loss is the log's
/// `fdatasync`, which no test here can cut.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_kill_under_load_loses_no_acknowledged_decision() {
    use std::sync::atomic::{AtomicU64, Ordering};
    const QUOTA: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let http = client();
    let jwt = dev_token(dir.path(), "alice", "site_owner");
    let base = server.base.clone();
    let site = post_json(
        &http,
        &format!("{base}/api/sites"),
        &jwt,
        &json!({"name": "Load", "origin_url": "http://127.0.0.1:9",
                "site_requests_per_second": 100_000}),
    )
    .await;
    let site_id = site["site_id"].as_str().unwrap().to_owned();
    let plan = post_json(
        &http,
        &format!("{base}/api/sites/{site_id}/plans"),
        &jwt,
        &json!({"name": "pro", "requests_per_minute": 10_000, "monthly_quota": QUOTA}),
    )
    .await;
    let token = post_json(
        &http,
        &format!("{base}/api/sites/{site_id}/tokens"),
        &jwt,
        &json!({"plan_id": plan["plan_id"]}),
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = post_json(
        &http,
        &format!("{base}/api/sites/{site_id}/api-keys"),
        &jwt,
        &json!({}),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let caller = http.clone();
    let authorize = move |base: String, path: String| {
        let (http, key, token) = (caller.clone(), key.clone(), token.clone());
        async move {
            let res = http
                .post(format!("{base}/v1/authorize"))
                .bearer_auth(key)
                .json(&json!({"token": token, "method": "GET", "path": path}))
                .send()
                .await
                .ok()?;
            assert_eq!(res.status(), 200);
            let v: Value = res.json().await.ok()?;
            assert_eq!(v["decision"], "allow", "{v}");
            v["remaining"]["quota"].as_u64()
        }
    };

    // 32 clients, each path used once, until the kill cuts them off.
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..32)
        .map(|c| {
            let (authorize, sent, acked, base) =
                (authorize.clone(), sent.clone(), acked.clone(), base.clone());
            tokio::spawn(async move {
                for n in 0.. {
                    let path = format!("/k/{c}/{n}");
                    sent.fetch_add(1, Ordering::SeqCst);
                    match authorize(base.clone(), path.clone()).await {
                        Some(_) => acked.lock().unwrap().push(path),
                        None => break, // the server is gone
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    drop(server); // SIGKILL, with requests in flight
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let sent = sent.load(Ordering::SeqCst);
    assert!(
        acked.len() > 100,
        "only {} decisions before the kill",
        acked.len()
    );

    let server = start(dir.path());
    let remaining = authorize(server.base.clone(), "/after".into())
        .await
        .expect("an answer after the restart");
    let counted = QUOTA - remaining - 1;
    assert!(
        counted >= acked.len() as u64 && counted <= sent,
        "{counted} counted; {} acknowledged, {sent} sent",
        acked.len()
    );
    let export = http
        .get(format!(
            "{}/api/sites/{site_id}/logs/export?format=ndjson",
            server.base
        ))
        .bearer_auth(&jwt)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let logged: std::collections::HashSet<String> = export
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["path"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .filter(|p| p != "/after")
        .collect();
    assert_eq!(
        logged.len() as u64,
        counted,
        "one audit record per counted decision"
    );
    let missing: Vec<_> = acked.iter().filter(|p| !logged.contains(*p)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not logged: {missing:?}"
    );
}

/// A site in front of a fresh verifying origin, a plan (600/min, 50 a month) and a
/// token: the site as created (with its signing secret), the token, the origin.
async fn provision(http: &reqwest::Client, base: &str, jwt: &str) -> (Value, String, Origin) {
    let (listener, addr) = bind_origin().await;
    let site: Value = post_json(
        http,
        &format!("{base}/api/sites"),
        jwt,
        &json!({"name": "Travel", "origin_url": format!("http://{addr}")}),
    )
    .await;
    let site_id = site["site_id"].as_str().unwrap();
    let origin = serve_origin(
        listener,
        payfence_signing::Verifier::new(site["signing_secret"].as_str().unwrap()),
    );
    let plan: Value = post_json(
        http,
        &format!("{base}/api/sites/{site_id}/plans"),
        jwt,
        &json!({"name": "pro", "requests_per_minute": 600, "monthly_quota": 50}),
    )
    .await;
    let tok: Value = post_json(
        http,
        &format!("{base}/api/sites/{site_id}/tokens"),
        jwt,
        &json!({"plan_id": plan["plan_id"]}),
    )
    .await;
    let token = tok["token"].as_str().unwrap().to_owned();
    (site, token, origin)
}

async fn get_json(http: &reqwest::Client, url: &str, jwt: &str) -> Value {
    let res = http.get(url).bearer_auth(jwt).send().await.unwrap();
    assert!(res.status().is_success(), "{url}: {}", res.status());
    res.json().await.unwrap()
}

async fn post_json(http: &reqwest::Client, url: &str, jwt: &str, body: &Value) -> Value {
    let res = http
        .post(url)
        .bearer_auth(jwt)
        .json(body)
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{url}: {}", res.status());
    res.json().await.unwrap()
}

fn uuid_like() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        payfence_core::domain::now_ms()
    )
}

#[tokio::test]
async fn bad_input_on_the_wire_gets_a_clear_4xx_and_never_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let b = &server.base;
    let status = |res: &str| res.split(' ').nth(1).unwrap_or("").to_owned();

    let huge = "a".repeat(200 * 1024);
    let res = raw_request(
        b,
        format!(
            "GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(
        res.is_empty() || status(&res) == "431",
        "{}",
        &res[..res.len().min(200)]
    );
    // A connection buffers at most 64 KiB of a request head: room for the gateway's
    // own limits (a header block over 32 KiB gets its 431 problem answer), while a head
    // that fills the buffer is refused at once, not held until the header timeout.
    let big = "a".repeat(40 * 1024);
    let res = raw_request(
        b,
        format!("GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status(&res), "431", "{}", &res[..res.len().min(200)]);
    assert!(res.contains("headers-too-large"), "{res}");
    let mut unfinished = b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    unfinished.resize(64 * 1024, b'a');
    let res = raw_request(b, &unfinished).await;
    assert_eq!(
        status(&res),
        "431",
        "a full head buffer is refused at once: {res:?}"
    );
    let res = raw_request(
        b,
        b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\n\r\n",
    )
    .await;
    assert_eq!(status(&res), "400");
    let res = raw_request(b, b"GARBAGE\r\n\r\n").await;
    assert_eq!(status(&res), "400");
    // RFC 9112 §3.2: an HTTP/1.1 request carries exactly one Host (HTTP/1.0 may omit it).
    for head in [
        "GET /api/health HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /api/health HTTP/1.1\r\nHost: x\r\nHost: y\r\nConnection: close\r\n\r\n",
    ] {
        let res = raw_request(b, head.as_bytes()).await;
        assert_eq!(status(&res), "400", "{head:?}: {res}");
        assert!(res.contains("exactly one Host header"), "{res}");
    }
    let res = raw_request(b, b"GET /api/health HTTP/1.0\r\n\r\n").await;
    assert_eq!(status(&res), "200", "{res}");
    // Past the HTTP server's own limits: more than 100 header fields, a request
    // target over 64 KiB. It answers these itself, with an empty body.
    let fields: String = (0..150).map(|i| format!("X-F{i}: v\r\n")).collect();
    let res = raw_request(
        b,
        format!("GET /api/health HTTP/1.1\r\nHost: x\r\n{fields}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status(&res), "431", "{res}");
    let long = "a".repeat(70 * 1024);
    let res = raw_request(
        b,
        format!("GET /p/{long} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status(&res), "414", "{}", &res[..res.len().min(200)]);
    let res = raw_request(b, "GET /p/site_0123456789abcdef/x HTTP/1.1\r\nHost: x\r\nX-PayFence-Token: pf_live_\u{e9}\r\nConnection: close\r\n\r\n".as_bytes()).await;
    assert_eq!(status(&res), "404"); // unknown site, checked first
    let res = raw_request(b, b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 3\r\nConnection: close\r\n\r\n{{{").await;
    assert_eq!(status(&res), "401");
    let res = raw_request(
        b,
        b"GET /p/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status(&res).starts_with('4'), "{res}");

    // Still healthy.
    let res = client()
        .get(format!("{b}/api/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(!server.stderr.lock().unwrap().contains("panicked"));
}

#[tokio::test]
async fn sigterm_finishes_requests_in_flight_on_every_thread_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path());
    let jwt = dev_token(dir.path(), "alice", "site_owner");
    let http = client();
    let (site, token, _origin) = provision(&http, &server.base, &jwt).await;
    let site_id = site["site_id"].as_str().unwrap().to_owned();

    // Eight connections (a client each), so every server thread holds some; each
    // request takes the origin 3 s.
    let in_flight: Vec<_> = (0..8)
        .map(|_| {
            let url = format!("{}/p/{site_id}/slow", server.base);
            let token = token.clone();
            tokio::spawn(async move { client().get(url).bearer_auth(token).send().await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    server.sigterm();
    for request in in_flight {
        assert_eq!(request.await.unwrap().unwrap().status(), 200);
    }
    let (status, logs) = server.exited().await;
    assert!(status.success(), "{status:?}");
    assert_eq!(logs.matches("\"route\":\"/p/").count(), 8, "{logs}");
}

/// Run the binary on `dir`, which must keep it from starting: its exit code and
/// standard error.
fn refused_start(dir: &Path) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_payfence-local"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    collect(child.stderr.take().unwrap(), stderr.clone(), None);
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(50)); // the last lines
            let stderr = stderr.lock().unwrap().clone();
            return (status.code().unwrap_or(-1), stderr);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("it started: {}", stderr.lock().unwrap());
}

#[test]
fn a_data_dir_in_use_exposed_or_damaged_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path());
    let (code, err) = refused_start(dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is in use by another process"), "{err}");
    drop(running);

    #[cfg(unix)]
    for key in ["sealing.key", "jwt-signing-key.pem"] {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join(key);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (code, err) = refused_start(dir.path());
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!("run: chmod 600 {}", path.display())),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let key = dir.path().join("sealing.key");
    let sealing = std::fs::read(&key).unwrap();
    std::fs::write(&key, &sealing[..16]).unwrap();
    let (code, err) = refused_start(dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("16 bytes, but a sealing key is 32"), "{err}");
    std::fs::write(&key, &sealing).unwrap();

    // A truncated database makes redb's own checks panic: still a clear error.
    let db = dir.path().join("payfence.redb");
    let file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    file.set_len(4096).unwrap();
    let (code, err) = refused_start(dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("payfence.redb is damaged"), "{err}");
    assert!(
        err.contains("\"target\":\"payfence::panic\""),
        "the panic is a JSON log line: {err}"
    );
    std::fs::write(&db, b"not a database at all").unwrap();
    let (code, err) = refused_start(dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("payfence.redb is damaged (not a database file)"),
        "{err}"
    );
}

#[test]
fn dev_token_takes_any_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let ttl = u64::MAX.to_string();
    let jwt = dev_token_with(
        dir.path(),
        &["--sub", "u", "--role", "admin", "--ttl", ttl.as_str()],
    );
    assert_eq!(jwt.split('.').count(), 3, "{jwt}");
    // A token for nobody is refused, with a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_payfence-local"))
        .args(["dev-token", "--sub", "", "--role", "admin", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--sub"), "{err}");
}

/// The server raises its soft limit on open files to the hard limit (every proxied
/// request holds two sockets).
#[cfg(target_os = "linux")]
#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let shell = |script: &str| {
        let out = Command::new("bash").args(["-c", script]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let Ok(hard) = shell("ulimit -Hn").parse::<u64>() else {
        return; // unlimited: nothing to compare with
    };
    if hard <= 256 {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new("bash");
    command
        .args([
            "-c",
            r#"ulimit -Sn 256 && exec "$0" --listen 127.0.0.1:0 --data-dir "$1""#,
            env!("CARGO_BIN_EXE_payfence-local"),
        ])
        .arg(dir.path());
    let server = start_command(command);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(soft, hard, "{limits}");
}

/// Once asked to stop, the server lets requests in flight finish for
/// `PAYFENCE_SHUTDOWN_GRACE_MS`, or until it is asked a second time; then it closes
/// the connections left and exits cleanly.
#[tokio::test]
async fn the_grace_period_or_a_second_signal_ends_requests_that_never_finish() {
    use futures_util::StreamExt;
    for (grace_ms, signals) in [("1000", 1), ("600000", 2)] {
        let dir = tempfile::tempdir().unwrap();
        let mut command = server_command(dir.path());
        command.env("PAYFENCE_SHUTDOWN_GRACE_MS", grace_ms);
        let mut server = start_command(command);
        let jwt = dev_token(dir.path(), "alice", "site_owner");
        let http = client();
        let (site, token, origin) = provision(&http, &server.base, &jwt).await;
        // An upload that never ends: the origin waits for the rest of the body.
        let body = futures_util::stream::once(async {
            Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"start"))
        })
        .chain(futures_util::stream::pending());
        let upload = http
            .post(format!(
                "{}/p/{}/upload",
                server.base,
                site["site_id"].as_str().unwrap()
            ))
            .bearer_auth(&token)
            .body(reqwest::Body::wrap_stream(body))
            .send();
        let upload = tokio::spawn(upload);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        for _ in 0..signals {
            server.sigterm();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        let (status, logs) = server.exited().await;
        assert!(status.success(), "{status:?}");
        let why = if signals == 1 {
            "at the end of the shutdown grace period"
        } else {
            "asked again to stop"
        };
        assert!(logs.contains(why), "{logs}");
        assert!(upload.await.unwrap().is_err(), "the upload was cut");
        assert_eq!(origin.count(), 0, "the origin never got the whole body");
    }
}

/// The commands `--demo` prints, grouped under their headings, in order.
fn demo_commands(stdout: &str) -> Vec<(String, String)> {
    let mut groups: Vec<(String, String)> = Vec::new();
    for line in stdout.lines() {
        if let Some(command) = line.strip_prefix("  ") {
            let (_, script) = groups.last_mut().expect("a heading before each command");
            script.push_str(command.trim_start());
            script.push('\n');
        } else if let Some(heading) = line.strip_suffix(':') {
            groups.push((heading.to_owned(), String::new()));
        }
    }
    groups
}

/// Run a printed command as a user would paste it: in bash, with curl.
fn run_pasted(script: &str) -> String {
    let out = Command::new("bash")
        .args(["-c", script])
        .output()
        .expect("bash and curl (the demo's commands use them)");
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run printed command groups as a user would paste them one after another into one
/// shell (a variable one sets serves the next): each group's output.
fn run_pasted_in_turn(groups: &[(String, String)]) -> Vec<String> {
    const NEXT: &str = "\n--- next group ---\n";
    let scripts: Vec<&str> = groups.iter().map(|(_, s)| s.as_str()).collect();
    let script = scripts.join(&format!("printf '{}'\n", NEXT.replace('\n', "\\n")));
    let out = run_pasted(&script);
    let outputs: Vec<String> = out.split(NEXT).map(String::from).collect();
    assert_eq!(outputs.len(), groups.len(), "{out}");
    outputs
}

fn demo_site_id(stdout: &str) -> String {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Demo site "))
        .expect("the demo site line");
    line.split(':').next().unwrap().to_owned()
}

/// `--demo`, the README's first command: every command it prints works as printed
/// (through bash and curl), and a restart on the same data directory keeps the site.
#[tokio::test]
async fn demo_prints_commands_that_work_as_printed() {
    assert!(
        Command::new("curl").arg("--version").output().is_ok(),
        "this test runs the demo's curl commands: install curl"
    );
    avoid_minute_boundary().await; // the counts below stay in one minute
    let dir = tempfile::tempdir().unwrap();
    let demo = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_payfence-local"));
        command
            .args(["--demo", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path());
        start_command(command)
    };
    let mut server = demo();
    let stdout = server.stdout.lock().unwrap().clone();
    let groups = demo_commands(&stdout);
    let headings: Vec<&str> = groups.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(
        headings,
        [
            "Call the API through the proxy",
            "Call the origin directly, unsigned (rejected with 401)",
            "Middleware mode (what an origin asks)",
            "Audit log, as the demo site owner",
            "This month's use of the site, by plan (with the JWT above)",
            "Health",
        ],
        "{stdout}"
    );
    let ran = run_pasted_in_turn(&groups);

    assert!(ran[0].starts_with("HTTP/1.1 200"), "{}", ran[0]);
    assert!(
        ran[0].contains("this request carried a valid PayFence signature"),
        "{}",
        ran[0]
    );
    assert!(ran[0].contains("x-ratelimit-remaining: 59"), "{}", ran[0]);
    assert!(ran[1].starts_with("HTTP/1.1 401"), "{}", ran[1]);
    let decision: Value = serde_json::from_str(&ran[2]).unwrap();
    assert_eq!(decision["decision"], "allow", "{decision}");
    assert_eq!(decision["remaining"]["minute"], 58, "{decision}");
    let logs: Value = serde_json::from_str(&ran[3]).unwrap();
    let modes: Vec<&str> = logs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["middleware", "proxy"], "newest first: {logs}");
    let usage: Value = serde_json::from_str(&ran[4]).unwrap();
    assert_eq!(usage["used"], 2, "{usage}");
    assert_eq!(usage["plans"][0]["name"], "demo", "{usage}");
    let health: Value = serde_json::from_str(&ran[5]).unwrap();
    assert_eq!(health["status"], "ok", "{health}");

    // Restart: the same site (new origin port, a new token), and its commands work.
    let site_id = demo_site_id(&stdout);
    server.sigterm();
    assert!(server.exited().await.0.success());
    let server = demo();
    let stdout = server.stdout.lock().unwrap().clone();
    assert_eq!(demo_site_id(&stdout), site_id, "{stdout}");
    let proxied = run_pasted(&demo_commands(&stdout)[0].1);
    assert!(proxied.starts_with("HTTP/1.1 200"), "{proxied}");
    assert!(proxied.contains("x-ratelimit-remaining: 59"), "{proxied}");
}
