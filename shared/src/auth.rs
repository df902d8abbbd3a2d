//! Dashboard authentication: RS256 JWTs checked against a JWKS (Cognito in AWS,
//! the local server's own issuer locally). `iss`, `exp`, `token_use` and the audience
//! (`client_id` for access tokens, `aud` for id tokens) are all checked; roles come
//! from `cognito:groups`.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Limited};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::origin::OriginClient;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    SiteOwner,
    Admin,
    Consumer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::SiteOwner => "site_owner",
            Role::Admin => "admin",
            Role::Consumer => "consumer",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "site_owner" => Some(Role::SiteOwner),
            "admin" => Some(Role::Admin),
            "consumer" => Some(Role::Consumer),
            _ => None,
        }
    }
}

/// An authenticated dashboard user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub sub: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("the user is in none of the groups site_owner, admin, consumer")]
    NoRole,
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    token_use: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    aud: Option<serde_json::Value>,
    #[serde(rename = "cognito:groups", default)]
    groups: Vec<String>,
}

/// The claims the local issuer signs (Cognito access-token shape).
#[derive(Serialize)]
pub struct IssuedClaims<'a> {
    pub sub: &'a str,
    pub iss: &'a str,
    pub client_id: &'a str,
    pub token_use: &'static str,
    #[serde(rename = "cognito:groups")]
    pub groups: Vec<&'a str>,
    pub iat: u64,
    pub exp: u64,
}

/// After a fetch, keys are fetched again (for an unknown key id) no sooner than this.
const REFETCH_AFTER: Duration = Duration::from_secs(60);
/// After a failed fetch, the next try comes no sooner than this; meanwhile a token
/// signed with a key not yet known gets `KeysUnavailable`, not "unknown key".
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(5);

pub struct JwtVerifier {
    issuer: String,
    audience: String,
    jwks_url: Option<String>,
    client: Option<OriginClient>,
    keys: RwLock<HashMap<String, DecodingKey>>,
    /// When keys were last fetched, and whether that worked.
    last_fetch: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

fn keys_of(set: &JwkSet) -> HashMap<String, DecodingKey> {
    set.keys
        .iter()
        .filter_map(|k| Some((k.common.key_id.clone()?, DecodingKey::from_jwk(k).ok()?)))
        .collect()
}

impl JwtVerifier {
    /// A verifier with a fixed key set (the local issuer).
    pub fn with_jwks(issuer: &str, audience: &str, jwks: &JwkSet) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            jwks_url: None,
            client: None,
            keys: RwLock::new(keys_of(jwks)),
            last_fetch: Default::default(),
        }
    }

    /// A verifier that fetches keys from `jwks_url` on first use and when an unknown
    /// key id shows up (at most once a minute; after a failed fetch, at most every
    /// 5 s, and until one works such a token gets [`AuthError::KeysUnavailable`]).
    pub fn with_url(issuer: &str, audience: &str, jwks_url: &str, client: OriginClient) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            jwks_url: Some(jwks_url.into()),
            client: Some(client),
            keys: RwLock::default(),
            last_fetch: Default::default(),
        }
    }

    /// Fetch the keys again, unless that was done (or failed) too recently. Callers
    /// wait for a fetch in progress rather than start their own.
    async fn refresh(&self) -> Result<(), AuthError> {
        let (Some(url), Some(client)) = (&self.jwks_url, &self.client) else {
            return Ok(());
        };
        let mut last = self.last_fetch.lock().await;
        match *last {
            Some((at, true)) if at.elapsed() < REFETCH_AFTER => return Ok(()),
            Some((at, false)) if at.elapsed() < RETRY_FAILED_AFTER => {
                return Err(AuthError::KeysUnavailable(
                    "the last JWKS fetch failed; retrying shortly".into(),
                ))
            }
            _ => {}
        }
        let fetched = Self::fetch(url, client).await;
        *last = Some((Instant::now(), fetched.is_ok()));
        *self.keys.write().unwrap() = keys_of(&fetched?);
        Ok(())
    }

    async fn fetch(url: &str, client: &OriginClient) -> Result<JwkSet, AuthError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| AuthError::KeysUnavailable(format!("bad JWKS URL: {e}")))?;
        let res = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
            .await
            .map_err(|_| AuthError::KeysUnavailable("JWKS fetch timed out".into()))?
            .map_err(|e| AuthError::KeysUnavailable(e.to_string()))?;
        if !res.status().is_success() {
            return Err(AuthError::KeysUnavailable(format!(
                "JWKS answered {}",
                res.status()
            )));
        }
        let body = Limited::new(res.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| AuthError::KeysUnavailable(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&body)
            .map_err(|e| AuthError::KeysUnavailable(format!("bad JWKS: {e}")))
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        self.keys.read().unwrap().get(kid).cloned()
    }

    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthError::Invalid("algorithm must be RS256".into()));
        }
        let kid = header
            .kid
            .ok_or_else(|| AuthError::Invalid("missing kid".into()))?;
        let key = match self.key(&kid) {
            Some(k) => k,
            None => {
                self.refresh().await?;
                self.key(&kid)
                    .ok_or_else(|| AuthError::Invalid("unknown signing key".into()))?
            }
        };
        let mut v = Validation::new(Algorithm::RS256);
        v.set_issuer(&[&self.issuer]);
        v.validate_aud = false; // checked below: Cognito access tokens carry client_id
        v.set_required_spec_claims(&["exp", "iss", "sub"]);
        v.leeway = 30;
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &v)
            .map_err(|e| AuthError::Invalid(e.to_string()))?
            .claims;
        let audience_ok = match claims.token_use.as_deref() {
            Some("access") => claims.client_id.as_deref() == Some(self.audience.as_str()),
            Some("id") => match &claims.aud {
                Some(serde_json::Value::String(a)) => a == &self.audience,
                Some(serde_json::Value::Array(a)) => a.iter().any(|x| x == self.audience.as_str()),
                _ => false,
            },
            _ => return Err(AuthError::Invalid("token_use must be access or id".into())),
        };
        if !audience_ok {
            return Err(AuthError::Invalid("token is for another audience".into()));
        }
        if claims.sub.is_empty() {
            // The user every owner check compares: an empty one names nobody.
            return Err(AuthError::Invalid("sub must not be empty".into()));
        }
        // Highest privilege first.
        let role = [Role::Admin, Role::SiteOwner, Role::Consumer]
            .into_iter()
            .find(|r| claims.groups.iter().any(|g| g == r.as_str()))
            .ok_or(AuthError::NoRole)?;
        Ok(Principal {
            sub: claims.sub,
            role,
        })
    }
}
