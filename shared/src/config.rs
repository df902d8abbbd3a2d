//! Configuration from the environment, validated at start.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}: {problem}")]
    Invalid { var: &'static str, problem: String },
    #[error("{0}")]
    Other(String),
}

/// Gateway settings shared by every function.
#[derive(Clone, Debug)]
pub struct Config {
    /// Allow `http://` and loopback/private origins (local development only).
    pub allow_http_origins: bool,
    pub origin_connect_timeout: Duration,
    /// Time allowed for the origin's response headers.
    pub origin_timeout: Duration,
    /// How long site and plan settings are cached per process.
    pub cache_ttl: Duration,
    /// Dashboard requests per second per user.
    pub dashboard_requests_per_second: u64,
    /// How long the previous signing secret keeps signing after a rotation.
    pub rotation_overlap_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            allow_http_origins: false,
            origin_connect_timeout: Duration::from_secs(5),
            origin_timeout: Duration::from_secs(30),
            cache_ttl: Duration::from_secs(10),
            dashboard_requests_per_second: 50,
            rotation_overlap_secs: 86_400,
        }
    }
}

pub fn env_var(var: &'static str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

pub fn env_parse<T: std::str::FromStr>(var: &'static str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env_var(var) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError::Invalid {
            var,
            problem: format!("{v:?} is not valid ({e})"),
        }),
    }
}

impl Config {
    /// Read `PAYFENCE_*` settings; unset ones keep their defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        let d = Self::default();
        let ms = |var, default: Duration| {
            env_parse(var, default.as_millis() as u64).map(Duration::from_millis)
        };
        let c = Self {
            allow_http_origins: env_parse("PAYFENCE_ALLOW_HTTP_ORIGINS", d.allow_http_origins)?,
            origin_connect_timeout: ms(
                "PAYFENCE_ORIGIN_CONNECT_TIMEOUT_MS",
                d.origin_connect_timeout,
            )?,
            origin_timeout: ms("PAYFENCE_ORIGIN_TIMEOUT_MS", d.origin_timeout)?,
            cache_ttl: env_parse("PAYFENCE_CACHE_TTL_SECS", d.cache_ttl.as_secs())
                .map(Duration::from_secs)?,
            dashboard_requests_per_second: env_parse(
                "PAYFENCE_DASHBOARD_RPS",
                d.dashboard_requests_per_second,
            )?,
            rotation_overlap_secs: env_parse(
                "PAYFENCE_ROTATION_OVERLAP_SECS",
                d.rotation_overlap_secs,
            )?,
        };
        if c.cache_ttl > Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                var: "PAYFENCE_CACHE_TTL_SECS",
                problem: "at most 60 (plan changes must be seen within a minute)".into(),
            });
        }
        if c.dashboard_requests_per_second == 0 {
            return Err(ConfigError::Invalid {
                var: "PAYFENCE_DASHBOARD_RPS",
                problem: "must be at least 1".into(),
            });
        }
        Ok(c)
    }
}
