//! `payfence-local [--listen ADDR] [--data-dir DIR] [--demo] [--allow-http-origins]`
//! `payfence-local dev-token [--data-dir DIR] --sub SUB --role ROLE`
//! SIGUSR1 backs the data directory up while serving ([`Local::backup`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use payfence_core::auth::Role;
use payfence_core::config::Config;
use payfence_local::{server, start_demo, Issuer, Local};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "payfence-local",
    version,
    about = "PayFence on one port, on the embedded store"
)]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// Data directory (created if missing; state survives restarts).
    #[arg(long, default_value = "./.payfence")]
    data_dir: PathBuf,
    /// Also start a demo origin and provision a demo site, plan, token and API key.
    /// Implies --allow-http-origins.
    #[arg(long)]
    demo: bool,
    /// Allow http:// and loopback/private origins (local development only).
    #[arg(long)]
    allow_http_origins: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print a signed dashboard JWT for a user and role.
    DevToken {
        /// The server's data directory: its JWT signing key signs the token.
        #[arg(long, default_value = "./.payfence")]
        data_dir: PathBuf,
        /// The user (the JWT's sub claim): owner of the sites this user creates.
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        sub: String,
        /// The user's role (the JWT's cognito:groups claim).
        #[arg(long, value_parser = ["site_owner", "admin", "consumer"])]
        role: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

/// Raise the soft limit on open files to the hard limit, as Go's runtime does: every
/// proxied request holds two sockets, and many systems start processes with a soft
/// limit of 1,024 (macOS: 256) and a far higher hard one. Best effort.
#[cfg(unix)]
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let soft = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                // macOS refuses more than OPEN_MAX (10,240) whatever the hard limit.
                limit.rlim_cur = limit.rlim_max.min(10_240).max(soft);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

/// `s` as one shell word: as it is when that is safe, else in single quotes.
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:=,@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::DevToken {
        data_dir,
        sub,
        role,
        ttl,
    }) = cli.command
    {
        if let Err(e) = payfence_local::create_private_dir(&data_dir) {
            eprintln!("error: --data-dir {}: {e}", data_dir.display());
            return ExitCode::FAILURE;
        }
        return match Issuer::load_or_create(&data_dir) {
            Ok(issuer) => {
                let role = Role::parse(&role).expect("clap checked the role");
                println!("{}", issuer.token(&sub, role, Duration::from_secs(ttl)));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    #[cfg(unix)]
    raise_open_files_limit();
    match server::runtime().expect("tokio runtime").block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> payfence_local::anyhow_like::Result<()> {
    // JSON logs go to stderr (batched); stdout carries the human messages.
    let (writer, _guard) = payfence_core::telemetry::batched(std::io::stderr());
    payfence_core::telemetry::init_with_writer(writer);
    let mut config = Config::from_env()?;
    config.allow_http_origins |= cli.allow_http_origins || cli.demo;
    let local = match payfence_core::config::env_var("PAYFENCE_TABLE") {
        Some(table) => Local::open_dynamodb(&cli.data_dir, config, &table, None).await?,
        None => Local::open(&cli.data_dir, config)?,
    };
    local.spawn_retention();
    let listener = server::bind(cli.listen).map_err(|e| format!("--listen {}: {e}", cli.listen))?;
    let addr = listener.local_addr()?;
    let base = format!("http://{addr}");
    if cli.demo {
        let demo = start_demo(&local).await?;
        // The commands name this very binary, so they work however it was started
        // (`cargo run` puts nothing on the PATH).
        let exe = std::env::current_exe().map_or("payfence-local".into(), |p| {
            shell_quote(&p.display().to_string())
        });
        let dir = shell_quote(&cli.data_dir.display().to_string());
        println!(
            "Demo origin (verifies PayFence signatures) on http://{origin}
Demo site {site}: plan \"demo\" (60 requests/minute, 1000 a month)

Call the API through the proxy:
  curl -i '{base}/p/{site}/v1/hello?city=Oslo' -H 'Authorization: Bearer {token}'
Call the origin directly, unsigned (rejected with 401):
  curl -i http://{origin}/v1/hello
Middleware mode (what an origin asks):
  curl -s {base}/v1/authorize -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{{\"token\":\"{token}\",\"method\":\"GET\",\"path\":\"/v1/hello\"}}'
Audit log, as the demo site owner:
  JWT=$({exe} dev-token --data-dir {dir} --sub demo --role site_owner)
  curl -s {base}/api/sites/{site}/logs -H \"Authorization: Bearer $JWT\"
This month's use of the site, by plan (with the JWT above):
  curl -s {base}/api/sites/{site}/usage -H \"Authorization: Bearer $JWT\"
Health:
  curl -s {base}/api/health
",
            origin = demo.origin,
            site = demo.site_id,
            token = demo.token,
            key = demo.api_key,
        );
    }
    // Ctrl-C or SIGTERM: stop accepting, let requests in flight finish (within
    // PAYFENCE_SHUTDOWN_GRACE_MS), flush the logs. A second one: close at once.
    let (count, signals) = tokio::sync::watch::channel(0u32);
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            count.send_modify(|n| *n += 1);
        }
    });
    let nth_signal = |n: u32| {
        let mut signals = signals.clone();
        async move {
            let _ = signals.wait_for(|seen| *seen >= n).await;
        }
    };
    // SIGUSR1: back the data directory up, while serving.
    let local = Arc::new(local);
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let backing_up = local.clone();
    let backups = payfence_core::config::env_var("PAYFENCE_BACKUP_DIR").map(PathBuf::from);
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            match backing_up.backup(backups.as_deref()).await {
                Ok(dir) => tracing::info!(dir = %dir.display(), "backup written"),
                Err(e) => tracing::error!(error = %e, "backup failed"),
            }
        }
    });
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (shutdown, force) = (nth_signal(1), nth_signal(2));
    // Only once every signal has its handler: one sent on seeing this line must not
    // meet the default action, which ends the process.
    println!("PayFence listening on {base}");
    server::run(listener, local, threads, shutdown, force).await?;
    Ok(())
}
