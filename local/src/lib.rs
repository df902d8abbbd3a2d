//! `payfence-local`: every PayFence function's routes on one port, on the embedded
//! store in a data directory, with its own JWT issuer for the dashboard.

pub mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::middleware::from_fn;
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{EncodingKey, Header};
use payfence_core::auth::{IssuedClaims, JwtVerifier, Role};
use payfence_core::config::Config;
use payfence_core::domain::{now_ms, Plan, Site, Token};
use payfence_core::http::request_context;
use payfence_core::seal::SealingKey;
use payfence_core::store::dynamo::DynamoStore;
use payfence_core::store::embedded::EmbeddedStore;
use payfence_core::store::Store;
use payfence_core::{ids, AppState};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde_json::json;
use tokio::net::TcpListener;

/// `iss` of locally issued tokens.
pub const ISSUER: &str = "payfence-local";
/// `client_id` (audience) of locally issued tokens.
pub const AUDIENCE: &str = "payfence-dashboard";

/// The local JWT issuer: an RSA key kept in the data directory (mode 0600).
pub struct Issuer {
    key: EncodingKey,
    kid: String,
    pub jwks: JwkSet,
}

impl Issuer {
    pub fn load_or_create(data_dir: &Path) -> anyhow_like::Result<Self> {
        let path = data_dir.join("jwt-signing-key.pem");
        let private = match read_private(&path)? {
            Some(pem) => std::str::from_utf8(&pem)
                .map_err(|e| e.to_string())
                .and_then(|pem| RsaPrivateKey::from_pkcs8_pem(pem).map_err(|e| e.to_string()))
                .map_err(|e| format!("{}: not a PKCS#8 PEM private key ({e})", path.display()))?,
            None => {
                let key =
                    RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).map_err(|e| e.to_string())?;
                let pem = key
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| e.to_string())?;
                write_private(&path, pem.as_bytes())?;
                key
            }
        };
        let pem = private
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| e.to_string())?;
        let key = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
        let public = private.to_public_key();
        let n = URL_SAFE_NO_PAD.encode(public.n().to_bytes_be());
        let e = URL_SAFE_NO_PAD.encode(public.e().to_bytes_be());
        let kid = ids::hash_secret(&n)[..16].to_owned();
        let jwks: JwkSet = serde_json::from_value(json!({
            "keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": n, "e": e}]
        }))
        .map_err(|e| e.to_string())?;
        Ok(Self { key, kid, jwks })
    }

    /// A signed access token for `sub` in `role`'s group, valid `ttl`.
    pub fn token(&self, sub: &str, role: Role, ttl: Duration) -> String {
        let now = now_ms() / 1000;
        let claims = IssuedClaims {
            sub,
            iss: ISSUER,
            client_id: AUDIENCE,
            token_use: "access",
            groups: vec![role.as_str()],
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
        };
        let mut header = Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).expect("RS256 signing with a valid key")
    }

    /// Sign arbitrary claims with the issuer's key (for tests of token checks).
    pub fn sign_claims(&self, claims: &serde_json::Value) -> String {
        let mut header = Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).expect("RS256 signing with a valid key")
    }

    pub fn verifier(&self) -> JwtVerifier {
        JwtVerifier::with_jwks(ISSUER, AUDIENCE, &self.jwks)
    }
}

/// A tiny error alias: messages for the command line.
pub mod anyhow_like {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;
}

/// A builder of directories open to their owner only (mode 0700, as `~/.ssh`): a
/// data directory holds the database and the keys.
fn private_dirs() -> std::fs::DirBuilder {
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
}

/// Create `dir` and any missing parent, each new one open to its owner only. One
/// that exists keeps its mode.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    private_dirs().recursive(true).create(dir)
}

/// A secret file of the data directory (the sealing key, the JWT key): its bytes,
/// or `None` if it does not exist yet. One that other users may read or write is
/// refused, as ssh refuses such a private key.
fn read_private(path: &Path) -> anyhow_like::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(at(e).into()),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(at)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{} holds a secret but other users may access it (mode {mode:03o}); \
                 run: chmod 600 {}",
                path.display(),
                path.display()
            )
            .into());
        }
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(at)?;
    Ok(Some(bytes))
}

/// Create a secret file only its owner may read (mode 0600), durably.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow_like::Result<()> {
    use std::io::Write;
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(at)?;
    f.write_all(bytes).map_err(at)?;
    f.sync_all().map_err(at)?;
    Ok(())
}

/// The sealing key in the data directory: 32 random bytes, created on first start.
fn load_or_create_sealing_key(data_dir: &Path) -> anyhow_like::Result<[u8; 32]> {
    let path = data_dir.join("sealing.key");
    match read_private(&path)? {
        Some(key) => key.try_into().map_err(|key: Vec<u8>| {
            format!(
                "{}: {} bytes, but a sealing key is 32",
                path.display(),
                key.len()
            )
            .into()
        }),
        None => {
            let mut key = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
            write_private(&path, &key)?;
            Ok(key)
        }
    }
}

/// Everything one local process serves.
pub struct Local {
    pub state: AppState,
    pub issuer: Arc<Issuer>,
    data_dir: PathBuf,
    /// The store, when it is the embedded one (which [`Local::backup`] copies).
    embedded: Option<EmbeddedStore>,
}

impl Local {
    /// Open (creating if needed) the data directory: embedded store, sealing key,
    /// JWT key.
    pub fn open(data_dir: &Path, config: Config) -> anyhow_like::Result<Self> {
        create_private_dir(data_dir)
            .map_err(|e| format!("--data-dir {}: {e}", data_dir.display()))?;
        let store = EmbeddedStore::open(&data_dir.join("payfence.redb"))?;
        let mut local = Self::open_with_store(data_dir, config, Arc::new(store.clone()))?;
        local.embedded = Some(store);
        Ok(local)
    }

    /// The DynamoDB table `table` (created with the documented schema if missing)
    /// instead of the embedded store; the keys still live in the data directory.
    pub async fn open_dynamodb(
        data_dir: &Path,
        config: Config,
        table: &str,
        endpoint: Option<&str>,
    ) -> anyhow_like::Result<Self> {
        let store = DynamoStore::connect(table, endpoint).await;
        store
            .ensure_table()
            .await
            .map_err(|e| format!("PAYFENCE_TABLE {table}: {e}"))?;
        Self::open_with_store(data_dir, config, Arc::new(store))
    }

    /// Keys from the data directory, state over `store`.
    pub fn open_with_store(
        data_dir: &Path,
        config: Config,
        store: Arc<dyn Store>,
    ) -> anyhow_like::Result<Self> {
        create_private_dir(data_dir)
            .map_err(|e| format!("--data-dir {}: {e}", data_dir.display()))?;
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(data_dir) {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(
                    dir = %data_dir.display(),
                    mode = format!("{mode:03o}"),
                    "the data directory is open to other users, who may read its database: run chmod 700 on it"
                );
            }
        }
        let key = load_or_create_sealing_key(data_dir)?;
        let issuer = Arc::new(Issuer::load_or_create(data_dir)?);
        let state = AppState::new(
            store,
            SealingKey::from_bytes(&key),
            config,
            Some(issuer.verifier()),
        );
        Ok(Self {
            state,
            issuer,
            data_dir: data_dir.to_owned(),
            embedded: None,
        })
    }

    /// Back the data directory up while serving: a consistent copy of the database
    /// (every decision acknowledged before it began) and the keys, in a new
    /// directory `<UTC time>` of `backups` (by default `backups` in the data
    /// directory), which a server can be started on. Its path.
    pub async fn backup(&self, backups: Option<&Path>) -> anyhow_like::Result<PathBuf> {
        let Some(store) = &self.embedded else {
            return Err("the store is DynamoDB: use its point-in-time recovery".into());
        };
        let backups = backups.map_or_else(|| self.data_dir.join("backups"), Path::to_path_buf);
        create_private_dir(&backups).map_err(|e| format!("{}: {e}", backups.display()))?;
        let name = payfence_core::domain::rfc3339_ms(now_ms()).replace(':', "");
        let dir = backups.join(name);
        // A new directory: two backups never share one.
        private_dirs()
            .create(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let written = async {
            store.backup(&dir.join("payfence.redb")).await?;
            for key in ["sealing.key", "jwt-signing-key.pem"] {
                let bytes = read_private(&self.data_dir.join(key))?
                    .ok_or_else(|| format!("{key} is missing from the data directory"))?;
                write_private(&dir.join(key), &bytes)?;
            }
            Ok(())
        };
        match written.await {
            Ok(()) => Ok(dir),
            Err(e) => {
                // Leave no half backup that could pass for a whole one.
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Every function's router, merged, plus the issuer's JWKS.
    pub fn router(&self) -> Router {
        let jwks = serde_json::to_value(&self.issuer.jwks).unwrap_or_default();
        let issuer_routes = Router::new()
            .route(
                "/.well-known/jwks.json",
                get(move || async move { Json(jwks) }),
            )
            .layer(from_fn(request_context));
        Router::new()
            .merge(payfence_health::router(self.state.clone()))
            .merge(payfence_authorize::router(self.state.clone()))
            .merge(payfence_proxy::router(self.state.clone()))
            .merge(payfence_dashboard::router(self.state.clone()))
            .merge(issuer_routes)
    }

    /// Purge audit records past their 90 days, now and every hour.
    pub fn spawn_retention(&self) {
        let store = self.state.store().clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                match store.purge_expired(now_ms() / 1000).await {
                    Ok(n) if n > 0 => tracing::info!(purged = n, "audit retention"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "audit retention failed"),
                }
            }
        });
    }
}

/// Serve every router of `local` on `listener`, on the current runtime, with the
/// same connection settings as the `payfence-local` binary (see [`server::Connections`]).
pub async fn serve(listener: TcpListener, local: Arc<Local>) -> std::io::Result<()> {
    server::serve_listener(listener, &local).await
}

/// What `--demo` provisioned.
pub struct Demo {
    pub origin: SocketAddr,
    pub site_id: String,
    pub token: String,
    pub api_key: String,
}

/// Start a demo origin that verifies PayFence signatures, and provision a demo
/// site (pointing at it), plan, token and API key.
pub async fn start_demo(local: &Local) -> anyhow_like::Result<Demo> {
    const OWNER: &str = "demo";
    let store = local.state.store().clone();
    let sealing = local.state.gateway.sealing();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let origin = listener.local_addr()?;
    let now = now_ms() / 1000;

    let existing = store
        .list_sites_page(Some(OWNER), 1, None)
        .await?
        .items
        .pop();
    let (site, secret) = match existing {
        Some(mut site) => {
            let secret = sealing
                .open(&site.signing_secret_sealed, &site.site_id)?
                .to_string();
            site.origin_url = format!("http://{origin}");
            site.updated_at = now;
            store.update_site(&site).await?;
            local.state.gateway.invalidate_site(&site.site_id);
            (site, secret)
        }
        None => {
            let (mut site, secret) = Site::new(
                OWNER,
                "PayFence demo",
                &format!("http://{origin}"),
                sealing,
                now,
            );
            site.secret_query_params = vec!["api_key".into()];
            store.create_site(&site).await?;
            (site, secret)
        }
    };
    let plan = match store.list_plans(&site.site_id).await?.into_iter().next() {
        Some(p) => p,
        None => {
            let p = Plan::new(&site.site_id, "demo", 60, 1000, now);
            store.create_plan(&p).await?;
            p
        }
    };
    let token = ids::consumer_token();
    store
        .create_token(&Token {
            token_id: ids::token_id(),
            site_id: site.site_id.clone(),
            plan_id: plan.plan_id.clone(),
            token_hash: ids::hash_secret(&token),
            label: Some("demo".into()),
            consumer: None,
            created_at: now,
            revoked_at: None,
        })
        .await?;
    let (key, api_key) =
        payfence_core::domain::ApiKey::new(&site.site_id, Some("demo".into()), now);
    store.create_key(&key).await?;

    let app = demo_origin(&secret);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Demo {
        origin,
        site_id: site.site_id,
        token,
        api_key,
    })
}

/// The demo origin: answers only signed requests, echoing what it saw.
pub fn demo_origin(secret: &str) -> Router {
    use axum::extract::Request;
    Router::new()
        .fallback(|req: Request| async move {
            let h = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            Json(json!({
                "hello": "from the demo origin; this request carried a valid PayFence signature",
                "method": req.method().as_str(),
                "path": req.uri().path_and_query().map(|p| p.as_str()),
                "token_id": h("x-payfence-token-id"),
                "plan": h("x-payfence-plan"),
            }))
        })
        .layer(payfence_signing::VerifyLayer::new(
            payfence_signing::Verifier::new(secret),
        ))
}
