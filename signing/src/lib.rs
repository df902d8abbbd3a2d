//! Sign and verify requests that PayFence forwards to an origin.
//!
//! PayFence adds two headers to every request it forwards in proxy mode:
//!
//! ```text
//! X-PayFence-Timestamp: <unix seconds>
//! X-PayFence-Signature: sha256=<lowercase hex HMAC-SHA256(secret, string_to_sign)>
//! string_to_sign = METHOD "\n" PATH_AND_QUERY "\n" TIMESTAMP
//! ```
//!
//! The key is the site's signing secret exactly as shown to the site owner (UTF-8
//! bytes, `pfsig_` prefix included). While a rotated secret is in its overlap window the
//! signature header carries several comma-separated signatures; one match is enough.
//!
//! Origins written in Rust use [`Verifier`] directly or the [`VerifyLayer`] tower layer:
//!
//! ```
//! use payfence_signing::{sign, Verifier};
//! let secret = "pfsig_example";
//! let header = sign(&[secret], "GET", "/v1/flights?from=OSL", 1_700_000_000);
//! let verifier = Verifier::new(secret);
//! assert!(verifier
//!     .verify("GET", "/v1/flights?from=OSL", Some("1700000000"), Some(&header), 1_700_000_010)
//!     .is_ok());
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header carrying the signature(s).
pub const SIGNATURE_HEADER: &str = "x-payfence-signature";
/// Header carrying the unix timestamp (seconds) the signature was made at.
pub const TIMESTAMP_HEADER: &str = "x-payfence-timestamp";
/// Default replay window: a signature more than this many seconds away from the
/// verifier's clock is rejected.
pub const DEFAULT_REPLAY_WINDOW_SECS: u64 = 300;
/// A verifier looks at no more than this many signatures in one header.
const MAX_SIGNATURES: usize = 4;

type HmacSha256 = Hmac<Sha256>;

/// `METHOD "\n" PATH_AND_QUERY "\n" TIMESTAMP`.
pub fn string_to_sign(method: &str, path_and_query: &str, timestamp: u64) -> String {
    format!("{method}\n{path_and_query}\n{timestamp}")
}

/// `n` in decimal, written to the end of `buf` (20 digits hold any `u64`).
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// HMAC-SHA256 keyed with `secret`, before any message.
fn keyed(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    HmacSha256::new_from_slice(secret).expect("HMAC takes any key length")
}

/// `string_to_sign`, fed in pieces rather than built.
fn feed(mut mac: HmacSha256, method: &str, path_and_query: &str, timestamp: u64) -> HmacSha256 {
    mac.update(method.as_bytes());
    mac.update(b"\n");
    mac.update(path_and_query.as_bytes());
    mac.update(b"\n");
    let mut digits = [0; 20];
    mac.update(decimal(timestamp, &mut digits));
    mac
}

/// Length of one `sha256=<hex>` signature.
const SIGNATURE_LEN: usize = 7 + 64;

/// One `sha256=<hex>` signature.
pub fn signature(secret: &str, method: &str, path_and_query: &str, timestamp: u64) -> String {
    let mut out = String::with_capacity(SIGNATURE_LEN);
    push_signature(&mut out, secret, method, path_and_query, timestamp);
    out
}

fn push_signature(
    out: &mut String,
    secret: &str,
    method: &str,
    path_and_query: &str,
    timestamp: u64,
) {
    let tag = feed(keyed(secret.as_bytes()), method, path_and_query, timestamp)
        .finalize()
        .into_bytes();
    let mut hex = [0; 64];
    hex::encode_to_slice(tag, &mut hex).expect("64 hex digits for 32 bytes");
    out.push_str("sha256=");
    out.push_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"));
}

/// The `X-PayFence-Signature` value for one or more secrets (newest first).
pub fn sign(secrets: &[&str], method: &str, path_and_query: &str, timestamp: u64) -> String {
    let mut out = String::with_capacity(secrets.len() * (SIGNATURE_LEN + 1));
    for (i, secret) in secrets.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_signature(&mut out, secret, method, path_and_query, timestamp);
    }
    out
}

/// Why a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing X-PayFence-Timestamp header")]
    MissingTimestamp,
    #[error("malformed X-PayFence-Timestamp header")]
    MalformedTimestamp,
    #[error("missing X-PayFence-Signature header")]
    MissingSignature,
    #[error("malformed X-PayFence-Signature header")]
    MalformedSignature,
    #[error("timestamp is {skew_secs} s away from now, outside the replay window")]
    Stale { skew_secs: u64 },
    #[error("signature does not match")]
    Mismatch,
}

/// Verifies PayFence signatures with one or more secrets.
#[derive(Clone)]
pub struct Verifier {
    /// An HMAC keyed with each secret, cloned for each check.
    secrets: Vec<HmacSha256>,
    replay_window_secs: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("secrets", &self.secrets.len())
            .field("replay_window_secs", &self.replay_window_secs)
            .finish()
    }
}

impl Verifier {
    /// A verifier for one signing secret with the default 300 s replay window.
    pub fn new(secret: impl AsRef<str>) -> Self {
        Self {
            secrets: vec![keyed(secret.as_ref().as_bytes())],
            replay_window_secs: DEFAULT_REPLAY_WINDOW_SECS,
        }
    }

    /// Also accept another secret (e.g. the new one while you roll a rotation out).
    pub fn with_secret(mut self, secret: impl AsRef<str>) -> Self {
        self.secrets.push(keyed(secret.as_ref().as_bytes()));
        self
    }

    /// Set the replay window in seconds.
    pub fn replay_window(mut self, secs: u64) -> Self {
        self.replay_window_secs = secs;
        self
    }

    /// Verify the parts of a request. `now` is the verifier's unix time in seconds.
    pub fn verify(
        &self,
        method: &str,
        path_and_query: &str,
        timestamp: Option<&str>,
        signature: Option<&str>,
        now: u64,
    ) -> Result<(), VerifyError> {
        let timestamp = timestamp.ok_or(VerifyError::MissingTimestamp)?;
        let signature = signature.ok_or(VerifyError::MissingSignature)?;
        let ts: u64 = timestamp
            .trim()
            .parse()
            .map_err(|_| VerifyError::MalformedTimestamp)?;
        let skew = now.abs_diff(ts);
        if skew > self.replay_window_secs {
            return Err(VerifyError::Stale { skew_secs: skew });
        }
        let mut tags = [[0; 32]; MAX_SIGNATURES];
        let mut n = 0;
        for part in signature.split(',').take(MAX_SIGNATURES) {
            let hex_tag = part
                .trim()
                .strip_prefix("sha256=")
                .ok_or(VerifyError::MalformedSignature)?;
            // Exactly 64 hex digits: anything else is malformed.
            hex::decode_to_slice(hex_tag, &mut tags[n])
                .map_err(|_| VerifyError::MalformedSignature)?;
            n += 1;
        }
        // Check every (secret, signature) pair without an early exit, in constant time.
        let mut ok = false;
        for secret in &self.secrets {
            for tag in &tags[..n] {
                ok |= feed(secret.clone(), method, path_and_query, ts)
                    .verify_slice(tag)
                    .is_ok();
            }
        }
        if ok {
            Ok(())
        } else {
            Err(VerifyError::Mismatch)
        }
    }

    /// Verify an [`http::Request`] as the origin received it, against the system clock.
    pub fn verify_request<B>(&self, req: &http::Request<B>) -> Result<(), VerifyError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let path_and_query = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        self.verify(
            req.method().as_str(),
            path_and_query,
            header(TIMESTAMP_HEADER),
            header(SIGNATURE_HEADER),
            now,
        )
    }
}

/// A tower layer that answers `401 Unauthorized` to any request without a valid
/// PayFence signature and passes the rest to the inner service.
///
/// ```no_run
/// # async fn run() {
/// use axum::{routing::get, Router};
/// use payfence_signing::{Verifier, VerifyLayer};
/// let app: Router = Router::new()
///     .route("/v1/flights", get(|| async { "flights" }))
///     .layer(VerifyLayer::new(Verifier::new(std::env::var("PAYFENCE_SIGNING_SECRET").unwrap())));
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await.unwrap();
/// axum::serve(listener, app).await.unwrap();
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct VerifyLayer {
    verifier: Arc<Verifier>,
}

impl VerifyLayer {
    pub fn new(verifier: Verifier) -> Self {
        Self {
            verifier: Arc::new(verifier),
        }
    }
}

impl<S> tower::Layer<S> for VerifyLayer {
    type Service = VerifyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        VerifyService {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// The service made by [`VerifyLayer`].
#[derive(Clone, Debug)]
pub struct VerifyService<S> {
    inner: S,
    verifier: Arc<Verifier>,
}

impl<S, ReqB, ResB> tower::Service<http::Request<ReqB>> for VerifyService<S>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    S::Future: Send + 'static,
    ResB: From<&'static str> + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<ResB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        match self.verifier.verify_request(&req) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(_) => {
                let mut res = http::Response::new(ResB::from("invalid PayFence signature\n"));
                *res.status_mut() = http::StatusCode::UNAUTHORIZED;
                res.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                Box::pin(async move { Ok(res) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &str = "pfsig_dGVzdC1zZWNyZXQtZG8tbm90LXVzZS1pbi1wcm9kdWN0aW9u";
    const TS: u64 = 1_700_000_000;

    /// The vectors published in docs/signing.md; other languages check against these.
    #[test]
    fn documented_vectors() {
        assert_eq!(
            string_to_sign("GET", "/v1/flights?from=OSL&to=SFO", TS),
            "GET\n/v1/flights?from=OSL&to=SFO\n1700000000"
        );
        assert_eq!(
            signature(SECRET, "GET", "/v1/flights?from=OSL&to=SFO", TS),
            VECTOR_GET
        );
        assert_eq!(signature(SECRET, "POST", "/v1/bookings", TS), VECTOR_POST);
    }

    const VECTOR_GET: &str =
        "sha256=3643540c2da1a9de847f07c5b6feca22e9319558927055a4e0e2fd6062a5f06a";
    const VECTOR_POST: &str =
        "sha256=1cde36cc2df8420b23c1ebcecfea8fcb8cb8737985cc51438e8579dee37ec49d";

    fn check(method: &str, pq: &str, ts: &str, sig: &str, now: u64) -> Result<(), VerifyError> {
        Verifier::new(SECRET).verify(method, pq, Some(ts), Some(sig), now)
    }

    #[test]
    fn accepts_valid_and_rejects_changes() {
        let sig = sign(&[SECRET], "GET", "/a/b?x=1", TS);
        assert_eq!(check("GET", "/a/b?x=1", "1700000000", &sig, TS), Ok(()));
        assert_eq!(
            check("POST", "/a/b?x=1", "1700000000", &sig, TS),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check("GET", "/a/c?x=1", "1700000000", &sig, TS),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check("GET", "/a/b?x=2", "1700000000", &sig, TS),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check("GET", "/a/b", "1700000000", &sig, TS),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check("GET", "/a/b?x=1", "1700000001", &sig, TS),
            Err(VerifyError::Mismatch)
        );
        let other = Verifier::new("pfsig_other");
        assert_eq!(
            other.verify("GET", "/a/b?x=1", Some("1700000000"), Some(&sig), TS),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn replay_window() {
        let sig = sign(&[SECRET], "GET", "/", TS);
        assert_eq!(check("GET", "/", "1700000000", &sig, TS + 300), Ok(()));
        assert_eq!(check("GET", "/", "1700000000", &sig, TS - 300), Ok(()));
        assert_eq!(
            check("GET", "/", "1700000000", &sig, TS + 301),
            Err(VerifyError::Stale { skew_secs: 301 })
        );
        assert_eq!(
            check("GET", "/", "1700000000", &sig, TS - 301),
            Err(VerifyError::Stale { skew_secs: 301 })
        );
        let short = Verifier::new(SECRET).replay_window(30);
        assert!(short
            .verify("GET", "/", Some("1700000000"), Some(&sig), TS + 31)
            .is_err());
    }

    #[test]
    fn rotation_accepts_any_signature() {
        let header = sign(&["pfsig_new", "pfsig_old"], "GET", "/", TS);
        assert_eq!(header.matches("sha256=").count(), 2);
        for secret in ["pfsig_new", "pfsig_old"] {
            assert_eq!(
                Verifier::new(secret).verify("GET", "/", Some("1700000000"), Some(&header), TS),
                Ok(())
            );
        }
        assert_eq!(
            Verifier::new("pfsig_neither").verify(
                "GET",
                "/",
                Some("1700000000"),
                Some(&header),
                TS
            ),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn garbled_headers() {
        let v = Verifier::new(SECRET);
        assert_eq!(
            v.verify("GET", "/", None, Some("sha256=00"), TS),
            Err(VerifyError::MissingTimestamp)
        );
        assert_eq!(
            v.verify("GET", "/", Some("1700000000"), None, TS),
            Err(VerifyError::MissingSignature)
        );
        assert_eq!(
            v.verify("GET", "/", Some("soon"), Some("sha256=00"), TS),
            Err(VerifyError::MalformedTimestamp)
        );
        for bad in ["", "sha1=abcd", "sha256=zz", "sha256=abcd", "sha256"] {
            assert_eq!(
                v.verify("GET", "/", Some("1700000000"), Some(bad), TS),
                Err(VerifyError::MalformedSignature),
                "{bad}"
            );
        }
    }

    /// The HMAC of `string_to_sign` as one string, hex-encoded: what the scheme
    /// says, computed without the pieces `feed` writes.
    fn reference_signature(secret: &str, method: &str, pq: &str, ts: u64) -> String {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(string_to_sign(method, pq, ts).as_bytes());
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn timestamps_at_the_edges_sign_as_the_scheme_says() {
        for ts in [0, 9, 10, 1_700_000_000, u64::MAX] {
            assert_eq!(
                signature(SECRET, "GET", "/", ts),
                reference_signature(SECRET, "GET", "/", ts)
            );
        }
    }

    proptest! {
        #[test]
        fn signs_the_string_to_sign(method in "[A-Z]{1,10}", pq in "/\\PC{0,40}", ts: u64, secrets in proptest::collection::vec("\\PC{0,30}", 1..4)) {
            let expected: Vec<String> = secrets
                .iter()
                .map(|s| reference_signature(s, &method, &pq, ts))
                .collect();
            let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            prop_assert_eq!(sign(&refs, &method, &pq, ts), expected.join(","));
        }

        #[test]
        fn any_change_is_rejected(method in "[A-Z]{3,7}", path in "/[a-z0-9/]{0,20}", query in "[a-z0-9=&]{0,10}", flip in 0usize..3) {
            let pq = if query.is_empty() { path.clone() } else { format!("{path}?{query}") };
            let sig = sign(&[SECRET], &method, &pq, TS);
            let v = Verifier::new(SECRET);
            prop_assert!(v.verify(&method, &pq, Some("1700000000"), Some(&sig), TS).is_ok());
            let (m, p) = match flip {
                0 => (format!("{method}X"), pq.clone()),
                1 => (method.clone(), format!("{pq}x")),
                _ => (method.clone(), format!("/x{pq}")),
            };
            prop_assert_eq!(v.verify(&m, &p, Some("1700000000"), Some(&sig), TS), Err(VerifyError::Mismatch));
        }
    }

    #[tokio::test]
    async fn layer_rejects_unsigned_and_passes_signed() {
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route("/x", axum::routing::get(|| async { "hello" }))
            .layer(VerifyLayer::new(Verifier::new(SECRET)));
        let unsigned = http::Request::get("/x")
            .body(axum::body::Body::empty())
            .unwrap();
        let res = app.clone().oneshot(unsigned).await.unwrap();
        assert_eq!(res.status(), http::StatusCode::UNAUTHORIZED);

        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let signed = http::Request::get("/x")
            .header(TIMESTAMP_HEADER, now.to_string())
            .header(SIGNATURE_HEADER, sign(&[SECRET], "GET", "/x", now))
            .body(axum::body::Body::empty())
            .unwrap();
        let res = app.oneshot(signed).await.unwrap();
        assert_eq!(res.status(), http::StatusCode::OK);
    }
}
