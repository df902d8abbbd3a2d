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
    /// `/api/health` requests per second per client (each probes the store).
    pub health_requests_per_second: u64,
    /// How long the previous signing secret keeps signing after a rotation.
    pub rotation_overlap_secs: u64,
    /// Web origins (`https://host[:port]`) whose pages may call the dashboard API
    /// (CORS); none by default, so only same-origin pages can.
    pub dashboard_origins: Vec<String>,
    /// Local server: how long a client may take to send a request's headers, which
    /// also closes keep-alive connections idle that long (in AWS, CloudFront does this).
    pub client_header_timeout: Duration,
    /// Local server: how long a client may stall a body: send nothing more of a
    /// request body it has begun, or take nothing of an answer being sent to it. Then
    /// the request gets `408` (a stalled answer just has its connection closed).
    pub client_body_timeout: Duration,
    /// Local server: how long requests in flight may take to finish once it is asked
    /// to stop (Ctrl-C, SIGTERM); then their connections are closed.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            allow_http_origins: false,
            origin_connect_timeout: Duration::from_secs(5),
            origin_timeout: Duration::from_secs(30),
            cache_ttl: Duration::from_secs(10),
            dashboard_requests_per_second: 50,
            health_requests_per_second: 10,
            rotation_overlap_secs: 86_400,
            dashboard_origins: Vec::new(),
            client_header_timeout: Duration::from_secs(30),
            client_body_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
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

/// A comma-separated list of web origins, each `http(s)://host[:port]` (a trailing
/// `/` is allowed), as browsers send them in `Origin`: lowercase, no path.
pub fn parse_origins(list: &str) -> Result<Vec<String>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|o| {
            let bad = || format!("{o:?} is not an origin like https://app.example.com");
            let uri: http::Uri = o.parse().map_err(|_| bad())?;
            let scheme = uri.scheme_str().filter(|s| matches!(*s, "https" | "http"));
            match (scheme, uri.authority()) {
                (Some(scheme), Some(authority))
                    if uri.path() == "/"
                        && uri.query().is_none()
                        && !authority.as_str().contains('@') =>
                {
                    Ok(format!("{scheme}://{authority}").to_ascii_lowercase())
                }
                _ => Err(bad()),
            }
        })
        .collect()
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
            health_requests_per_second: env_parse(
                "PAYFENCE_HEALTH_RPS",
                d.health_requests_per_second,
            )?,
            rotation_overlap_secs: env_parse(
                "PAYFENCE_ROTATION_OVERLAP_SECS",
                d.rotation_overlap_secs,
            )?,
            dashboard_origins: match env_var("PAYFENCE_DASHBOARD_ORIGINS") {
                None => d.dashboard_origins,
                Some(list) => parse_origins(&list).map_err(|problem| ConfigError::Invalid {
                    var: "PAYFENCE_DASHBOARD_ORIGINS",
                    problem,
                })?,
            },
            client_header_timeout: ms(
                "PAYFENCE_CLIENT_HEADER_TIMEOUT_MS",
                d.client_header_timeout,
            )?,
            client_body_timeout: ms("PAYFENCE_CLIENT_BODY_TIMEOUT_MS", d.client_body_timeout)?,
            shutdown_grace: ms("PAYFENCE_SHUTDOWN_GRACE_MS", d.shutdown_grace)?,
        };
        if c.cache_ttl > Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                var: "PAYFENCE_CACHE_TTL_SECS",
                problem: "at most 60 (plan changes must be seen within a minute)".into(),
            });
        }
        for (var, zero) in [
            (
                "PAYFENCE_CLIENT_HEADER_TIMEOUT_MS",
                c.client_header_timeout.is_zero(),
            ),
            (
                "PAYFENCE_CLIENT_BODY_TIMEOUT_MS",
                c.client_body_timeout.is_zero(),
            ),
            (
                "PAYFENCE_DASHBOARD_RPS",
                c.dashboard_requests_per_second == 0,
            ),
            ("PAYFENCE_HEALTH_RPS", c.health_requests_per_second == 0),
        ] {
            if zero {
                return Err(ConfigError::Invalid {
                    var,
                    problem: "must be at least 1".into(),
                });
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashboard_origins() {
        assert_eq!(
            parse_origins(" https://App.example.com , http://localhost:5173/,").unwrap(),
            ["https://app.example.com", "http://localhost:5173"]
        );
        for bad in [
            "app.example.com",
            "https://app.example.com/dashboard",
            "https://app.example.com?x=1",
            "ftp://app.example.com",
            "https://user@app.example.com",
            "*",
        ] {
            assert!(parse_origins(bad).is_err(), "{bad}");
        }
    }
}
