//! Process-wide state, built once and shared by every request.

use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha2::Digest;

use crate::auth::JwtVerifier;
use crate::config::{env_var, Config, ConfigError};
use crate::gateway::Gateway;
use crate::http::KeyedLimiter;
use crate::seal::SealingKey;
use crate::store::dynamo::DynamoStore;
use crate::store::embedded::EmbeddedStore;
use crate::store::Store;

#[derive(Clone)]
pub struct AppState {
    pub gateway: Arc<Gateway>,
    pub config: Arc<Config>,
    /// Dashboard JWT verification (absent in functions that serve no dashboard).
    pub jwt: Option<Arc<JwtVerifier>>,
    pub limiter: Arc<KeyedLimiter>,
}

impl AppState {
    pub fn new(
        store: Arc<dyn Store>,
        sealing: SealingKey,
        config: Config,
        jwt: Option<JwtVerifier>,
    ) -> Self {
        Self {
            gateway: Arc::new(Gateway::new(store, sealing, config.cache_ttl)),
            config: Arc::new(config),
            jwt: jwt.map(Arc::new),
            limiter: Arc::default(),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        self.gateway.store()
    }

    /// State for a Lambda function, from the environment:
    /// `PAYFENCE_SEALING_KEY` (base64 of 32 bytes); `PAYFENCE_TABLE` (DynamoDB, with
    /// the SDK's standard region/credentials/endpoint variables; the table must
    /// exist) or else `PAYFENCE_DATA_DIR` (embedded store); and for the dashboard
    /// `PAYFENCE_JWT_ISSUER`, `PAYFENCE_JWT_AUDIENCE`, `PAYFENCE_JWKS_URL`.
    pub async fn from_env(with_jwt: bool) -> Result<Self, ConfigError> {
        let config = Config::from_env()?;
        let key = sealing_key_from_env().await?;
        let store: Arc<dyn Store> = match env_var("PAYFENCE_TABLE") {
            Some(table) => Arc::new(DynamoStore::from_env(&table).await),
            None => {
                let dir = env_var("PAYFENCE_DATA_DIR").unwrap_or_else(|| "/tmp/payfence".into());
                std::fs::create_dir_all(&dir).map_err(|e| ConfigError::Invalid {
                    var: "PAYFENCE_DATA_DIR",
                    problem: e.to_string(),
                })?;
                Arc::new(
                    EmbeddedStore::open(&Path::new(&dir).join("payfence.redb")).map_err(|e| {
                        ConfigError::Invalid {
                            var: "PAYFENCE_DATA_DIR",
                            problem: e.to_string(),
                        }
                    })?,
                )
            }
        };
        let jwt = if with_jwt {
            let need = |var| {
                env_var(var).ok_or(ConfigError::Invalid {
                    var,
                    problem: "required by the dashboard".into(),
                })
            };
            let issuer = need("PAYFENCE_JWT_ISSUER")?;
            let audience = need("PAYFENCE_JWT_AUDIENCE")?;
            let url = need("PAYFENCE_JWKS_URL")?;
            let client = crate::origin::origin_client(
                config.allow_http_origins,
                config.origin_connect_timeout,
            );
            Some(JwtVerifier::with_url(&issuer, &audience, &url, client))
        } else {
            None
        };
        Ok(Self::new(store, SealingKey::from_bytes(&key), config, jwt))
    }
}

/// The key for secrets at rest: from Secrets Manager (`PAYFENCE_SEALING_KEY_SECRET_ARN`;
/// the key is SHA-256 of the secret's value, so any generated string of enough
/// entropy works), or `PAYFENCE_SEALING_KEY` (base64 of exactly 32 bytes).
async fn sealing_key_from_env() -> Result<[u8; 32], ConfigError> {
    if let Some(arn) = env_var("PAYFENCE_SEALING_KEY_SECRET_ARN") {
        let config = crate::aws::loader(None).load().await;
        let value = aws_sdk_secretsmanager::Client::new(&config)
            .get_secret_value()
            .secret_id(&arn)
            .send()
            .await
            .map_err(|e| ConfigError::Invalid {
                var: "PAYFENCE_SEALING_KEY_SECRET_ARN",
                problem: format!(
                    "cannot read the secret: {}",
                    aws_sdk_secretsmanager::error::DisplayErrorContext(e)
                ),
            })?;
        let secret = value.secret_string().unwrap_or_default();
        if secret.len() < 32 {
            return Err(ConfigError::Invalid {
                var: "PAYFENCE_SEALING_KEY_SECRET_ARN",
                problem: "the secret must be a string of at least 32 characters".into(),
            });
        }
        return Ok(sha2::Sha256::digest(secret.as_bytes()).into());
    }
    let key_b64 = env_var("PAYFENCE_SEALING_KEY").ok_or(ConfigError::Invalid {
        var: "PAYFENCE_SEALING_KEY",
        problem: "required (or PAYFENCE_SEALING_KEY_SECRET_ARN): base64 of 32 random bytes".into(),
    })?;
    STANDARD
        .decode(key_b64.trim())
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or(ConfigError::Invalid {
            var: "PAYFENCE_SEALING_KEY",
            problem: "must be base64 of exactly 32 bytes".into(),
        })
}
