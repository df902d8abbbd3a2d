//! HTTP conventions shared by every function: problem+json errors, the request
//! context middleware (request id, security headers, one log line per request),
//! rate-limit headers, client address and JSON bodies.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::gateway::{Decision, GatewayError};
use crate::store::StoreError;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-payfence-request-id");
/// Requests with more header bytes than this are refused with 431.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Request targets (path and query) longer than this are refused with 414, and so is
/// a longer `path` in `POST /v1/authorize` (422): CloudFront's limit on a URL, so
/// that the local server and AWS agree, and no audit record holds a path longer.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;
/// Requests whose method is longer than this are refused with 501 (RFC 9112 §3: a
/// method longer than any implemented): the longest registered method has 17 bytes,
/// and the method is kept in the audit record and the request log.
pub const MAX_METHOD_BYTES: usize = 32;
/// JSON request bodies (authorize, dashboard) larger than this are refused with 413.
pub const MAX_JSON_BODY_BYTES: usize = 64 * 1024;

/// An error answered as `application/problem+json` (RFC 9457).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{field}: {detail}")]
    Invalid { field: String, detail: String },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The client stalled in the middle of its request body (local server).
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A feature of HTTP the gateway does not implement (RFC 9110 §15.6.2).
    #[error("{0}")]
    NotImplemented(String),
    #[error("rate limited")]
    TooManyRequests { retry_after: u64 },
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    GatewayTimeout(String),
    /// A dependency is unreachable; details are logged, not returned.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// A bug or broken invariant; details are logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &str, detail: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_owned(),
            detail: detail.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad-request",
            Self::Invalid { .. } => "invalid-field",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not-found",
            Self::Conflict(_) => "conflict",
            Self::PayloadTooLarge(_) => "payload-too-large",
            Self::RequestTimeout(_) => "request-timeout",
            Self::UnsupportedMediaType(_) => "unsupported-media-type",
            Self::NotImplemented(_) => "not-implemented",
            Self::TooManyRequests { .. } => "rate-limited",
            Self::BadGateway(_) => "origin-unreachable",
            Self::GatewayTimeout(_) => "origin-timeout",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

/// Build a problem+json response.
pub fn problem(
    status: StatusCode,
    slug: &str,
    detail: &str,
    extra: Option<serde_json::Value>,
) -> Response {
    let mut body = serde_json::json!({
        "type": format!("https://payfence.io/problems/{slug}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Some(serde_json::Value::Object(extra)), Some(obj)) = (extra, body.as_object_mut()) {
        obj.extend(extra);
    }
    let mut res = (status, body.to_string()).into_response();
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = match &self {
            Self::Unavailable(e) => {
                tracing::error!(error = %e, "dependency unavailable");
                "a dependency is unavailable, try again shortly".to_owned()
            }
            Self::Internal(e) => {
                tracing::error!(error = %e, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let extra = match &self {
            Self::Invalid { field, .. } => Some(serde_json::json!({ "field": field })),
            _ => None,
        };
        let mut res = problem(status, self.slug(), &detail, extra);
        match self {
            Self::TooManyRequests { retry_after } => {
                res.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(retry_after));
            }
            // Every credential PayFence's own endpoints take is a bearer one (RFC 6750).
            Self::Unauthorized(_) => {
                res.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of the body may still come: the connection cannot be reused.
            Self::RequestTimeout(_) => {
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        res
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => Self::Conflict(format!("{what} already exists")),
            StoreError::Changed(what) => Self::Conflict(format!(
                "{what} was changed by another request meanwhile; read it again and retry"
            )),
            // The callers check first: only a deletion meanwhile gets here.
            StoreError::Missing(what) => {
                Self::Conflict(format!("the {what} was deleted meanwhile"))
            }
            StoreError::InvalidCursor => Self::invalid("cursor", "not a cursor from this query"),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

/// The error of a request body whose client sent nothing more of it for
/// `Config::client_body_timeout` (the local server's bodies carry it).
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing more of the request body for {} ms", .0.as_millis())]
pub struct BodyStalled(pub std::time::Duration);

impl BodyStalled {
    pub fn api_error() -> ApiError {
        ApiError::RequestTimeout("the client stopped sending the request body".into())
    }
}

/// Is `e`, or an error it came from (its sources), a `T`?
pub fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| e.is::<T>())
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        if caused_by::<BodyStalled>(&e) {
            BodyStalled::api_error()
        } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::PayloadTooLarge(format!(
                "the request body exceeds {} KiB",
                MAX_JSON_BODY_BYTES / 1024
            ))
        } else {
            Self::BadRequest(format!(
                "the request body could not be read: {}",
                e.body_text()
            ))
        }
    }
}

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Store(s) => s.into(),
            GatewayError::Internal(s) => Self::Internal(s),
        }
    }
}

/// The request id, put in request extensions by [`request_context`].
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Fields a handler adds to its request's log line (via response extensions).
#[derive(Clone, Debug, Default)]
pub struct LogFields {
    pub site_id: Option<String>,
    pub token_id: Option<String>,
    pub decision: Option<&'static str>,
    pub reason: Option<&'static str>,
    pub auth_ms: Option<f64>,
    pub origin_ms: Option<f64>,
    /// The response was relayed from an origin: leave its headers alone.
    pub relayed: bool,
}

const SECURITY_HEADERS: [(&str, &str); 5] = [
    (
        "strict-transport-security",
        "max-age=63072000; includeSubDomains",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("content-security-policy", "default-src 'none'"),
    ("referrer-policy", "no-referrer"),
];

/// Middleware for every router: assigns the request id, adds security headers to
/// the gateway's own responses, turns bare 404/405s into problem+json, and logs one
/// JSON line per request (never a body, token, secret, query or raw IP).
pub async fn request_context(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = crate::ids::request_id();
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    // Short enough to serve, record and log.
    let method_kept = method.as_str().len() <= MAX_METHOD_BYTES;
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    let mut res = if !from_edge(req.headers()) {
        problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            "requests must come through the gateway's public address",
            None,
        )
    } else if !method_kept {
        ApiError::NotImplemented("request methods longer than 32 bytes are not implemented".into())
            .into_response()
    } else if !one_host(&req) {
        ApiError::BadRequest("an HTTP/1.1 request must carry exactly one Host header".into())
            .into_response()
    } else if req.uri().path_and_query().map_or(0, |p| p.as_str().len()) > MAX_TARGET_BYTES {
        problem(
            StatusCode::URI_TOO_LONG,
            "uri-too-long",
            "the request target (path and query) exceeds 8 KiB",
            None,
        )
    } else if header_bytes > MAX_HEADER_BYTES {
        problem(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "request headers exceed 32 KiB",
            None,
        )
    } else {
        next.run(req).await
    };
    let fields = res
        .extensions_mut()
        .remove::<LogFields>()
        .unwrap_or_default();

    let status = res.status();
    if matches!(
        status,
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
    ) && !res.headers().contains_key(CONTENT_TYPE)
        && !fields.relayed
    {
        let allow = res.headers().get(http::header::ALLOW).cloned();
        let (kind, detail) = if status == StatusCode::NOT_FOUND {
            ("not-found", "no such route")
        } else {
            (
                "method-not-allowed",
                "this route does not accept this method (see Allow)",
            )
        };
        res = problem(status, kind, detail, None);
        if let Some(allow) = allow {
            res.headers_mut().insert(http::header::ALLOW, allow);
        }
    }
    let headers = res.headers_mut();
    if !fields.relayed {
        for (k, v) in SECURITY_HEADERS {
            headers
                .entry(HeaderName::from_static(k))
                .or_insert(HeaderValue::from_static(v));
        }
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(REQUEST_ID_HEADER, v);
    }
    tracing::info!(
        target: "payfence::request",
        request_id = %id,
        method = if method_kept { method.as_str() } else { "-" },
        route = route.as_deref().unwrap_or("-"),
        status = res.status().as_u16(),
        site_id = fields.site_id.as_deref(),
        token_id = fields.token_id.as_deref(),
        decision = fields.decision,
        reason = fields.reason,
        auth_ms = fields.auth_ms,
        origin_ms = fields.origin_ms,
        total_ms = crate::domain::elapsed_ms(started),
    );
    res
}

/// The value CloudFront adds to every request it sends to the functions
/// (`PAYFENCE_EDGE_SECRET`); unset when not behind CloudFront (local runs).
fn edge_secret() -> Option<&'static str> {
    static EDGE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    EDGE.get_or_init(|| crate::config::env_var("PAYFENCE_EDGE_SECRET"))
        .as_deref()
}

/// RFC 9112 §3.2: an HTTP/1.1 request with no `Host` or more than one is a `400`.
/// Checked where PayFence read the request off its own connection (the local server);
/// on AWS, CloudFront and API Gateway read it first.
fn one_host(req: &Request) -> bool {
    req.version() != http::Version::HTTP_11
        || req.extensions().get::<ConnectInfo<SocketAddr>>().is_none()
        || req.headers().get_all(http::header::HOST).iter().count() == 1
}

/// Did this request come through CloudFront (or is no edge configured)?
fn from_edge(h: &HeaderMap) -> bool {
    match edge_secret() {
        None => true,
        Some(secret) => h
            .get(EDGE_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| crate::ids::ct_eq(v, secret)),
    }
}

/// Header CloudFront sets with its shared secret.
pub const EDGE_HEADER: &str = "x-payfence-edge";
/// Header CloudFront's viewer-request function sets with the viewer's address.
pub const CLIENT_IP_HEADER: &str = "x-payfence-client-ip";

fn put(h: &mut HeaderMap, name: HeaderName, value: String) {
    // Takes the string's buffer: no copy.
    if let Ok(v) = HeaderValue::try_from(value) {
        h.insert(name, v);
    }
}

const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

fn now_s() -> u64 {
    crate::domain::now_ms() / 1000
}

/// `X-RateLimit-*`, `RateLimit-Policy`, `RateLimit` (and `Retry-After` on denial)
/// for a decision whose token was resolved; nothing otherwise.
pub fn decision_headers(h: &mut HeaderMap, d: &Decision) {
    if let Some(retry) = d.retry_after {
        h.insert(RETRY_AFTER, retry.into());
    }
    let Some(limits) = d.limits else {
        return;
    };
    let now = now_s();
    h.insert(X_RATELIMIT_LIMIT, limits.requests_per_minute.into());
    h.insert(X_RATELIMIT_REMAINING, d.remaining_minute.into());
    h.insert(X_RATELIMIT_RESET, d.reset_minute.into());
    put(
        h,
        RATELIMIT_POLICY,
        format!(
            "\"minute\";q={};w=60, \"month\";q={};w={}",
            limits.requests_per_minute,
            limits.monthly_quota,
            d.reset_quota.saturating_sub(now).max(1)
        ),
    );
    put(
        h,
        RATELIMIT,
        format!(
            "\"minute\";r={};t={}, \"month\";r={};t={}",
            d.remaining_minute,
            d.reset_minute.saturating_sub(now),
            d.remaining_quota,
            d.reset_quota.saturating_sub(now)
        ),
    );
}

/// Simple headers for the gateway's own per-caller limits.
fn simple_rate_headers(h: &mut HeaderMap, limit: u64, remaining: u64, reset_unix: u64) {
    h.insert(X_RATELIMIT_LIMIT, limit.into());
    h.insert(X_RATELIMIT_REMAINING, remaining.into());
    h.insert(X_RATELIMIT_RESET, reset_unix.into());
    put(h, RATELIMIT_POLICY, format!("\"second\";q={limit};w=1"));
    put(
        h,
        RATELIMIT,
        format!(
            "\"second\";r={remaining};t={}",
            reset_unix.saturating_sub(now_s())
        ),
    );
}

/// Answer with `answer` while `key` has made at most `limit` requests this second,
/// else `429`; either way with the `X-RateLimit-*` and `RateLimit*` headers of a
/// one-second window. For the gateway's own endpoints: the dashboard per user,
/// health per client.
pub async fn per_second_limit(
    limiter: &KeyedLimiter,
    key: &str,
    limit: u64,
    answer: impl std::future::Future<Output = Response>,
) -> Response {
    let reset = now_s() + 1;
    let (mut res, remaining) = match limiter.check(key, limit) {
        Err(retry_after) => (ApiError::TooManyRequests { retry_after }.into_response(), 0),
        Ok(remaining) => (answer.await, remaining),
    };
    simple_rate_headers(res.headers_mut(), limit, remaining, reset);
    res
}

/// A per-key, per-second in-memory limiter for the gateway's own endpoints.
#[derive(Default)]
pub struct KeyedLimiter {
    windows: Mutex<HashMap<String, (u64, u64)>>,
}

impl KeyedLimiter {
    /// Count a request; `Ok(remaining)` or `Err(retry_after_secs)`.
    pub fn check(&self, key: &str, limit: u64) -> Result<u64, u64> {
        let sec = now_s();
        let mut w = self.windows.lock().unwrap();
        if w.len() > 100_000 {
            w.retain(|_, (s, _)| *s == sec);
        }
        let entry = w.entry(key.to_owned()).or_insert((sec, 0));
        if entry.0 != sec {
            *entry = (sec, 0);
        }
        if entry.1 >= limit {
            return Err(1);
        }
        entry.1 += 1;
        Ok(limit - entry.1)
    }
}

/// The caller's address: behind CloudFront the viewer address it passes (trusted
/// because the request carried the edge secret); else the Lambda request context;
/// else the TCP peer.
pub fn client_ip(req: &Request) -> Option<IpAddr> {
    if edge_secret().is_some() {
        if let Some(ip) = req
            .headers()
            .get(CLIENT_IP_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            return Some(ip);
        }
    }
    if let Some(lambda_http::request::RequestContext::ApiGatewayV2(ctx)) =
        req.extensions()
            .get::<lambda_http::request::RequestContext>()
    {
        return ctx.http.source_ip.as_deref().and_then(|s| s.parse().ok());
    }
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// A credential header's value, decoded lossily: a credential that is not ASCII is
/// judged invalid, not missing. A header sent more than once comes joined as an HTTP
/// list (`a, b`, as API Gateway presents it), which is no valid credential: a request
/// is never judged on whichever copy came first.
pub fn credential<'a>(headers: &'a HeaderMap, name: &str) -> Option<Cow<'a, str>> {
    let mut values = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()));
    let first = values.next()?;
    Some(values.fold(first, |joined, v| Cow::Owned(format!("{joined}, {v}"))))
}

/// `Authorization: Bearer <x>` value, if any (see [`credential`]).
pub fn bearer(headers: &HeaderMap) -> Option<Cow<'_, str>> {
    match credential(headers, http::header::AUTHORIZATION.as_str())? {
        Cow::Borrowed(v) => bearer_token(v).map(Cow::Borrowed),
        Cow::Owned(v) => bearer_token(&v).map(|t| Cow::Owned(t.to_owned())),
    }
}

/// The token of one `Authorization` value, if its scheme is `Bearer`.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_ascii())
}

/// A JSON body (Content-Type: application/json) whose rejections are problem+json.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "expected Content-Type: application/json".into(),
            ));
        }
        let body = axum::body::Bytes::from_request(req, state).await?;
        parse_json(&body).map(Self)
    }
}

/// serde's message for a value of the wrong type or an unknown variant, without the
/// value (which may be a secret put in the wrong field): `invalid type: string "…",
/// expected u64` becomes `invalid type: a string, expected u64`. Messages about
/// field names (missing, unknown) are kept whole.
fn without_value(msg: &str) -> String {
    let what = ["invalid type: ", "invalid value: ", "unknown variant "]
        .into_iter()
        .find(|p| msg.starts_with(p));
    let (Some(what), Some(expected)) = (what, msg.rfind(", expected ")) else {
        return msg.to_owned();
    };
    let (head, rest) = (what.trim_end(), &msg[expected..]);
    if what == "unknown variant " {
        return format!("{head}{rest}");
    }
    let kind = match msg[what.len()..expected]
        .split([' ', '`'])
        .next()
        .unwrap_or("")
    {
        "string" => "a string",
        "integer" => "an integer",
        "floating" => "a number",
        "boolean" => "a boolean",
        "sequence" => "an array",
        "map" => "an object",
        "null" => "null",
        _ => "a value",
    };
    format!("{head} {kind}{rest}")
}

/// Path parameters whose rejections (such as percent-encoded bytes that are not
/// UTF-8) are problem+json.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|e: PathRejection| ApiError::BadRequest(e.body_text()))
    }
}

/// JSON response with a status.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (status, axum::Json(value)).into_response()
}

/// Parse a JSON object body: syntax errors and other JSON values are 400, wrong or
/// missing fields 422 naming them.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde would also take a struct from an array of its fields, and name a
    // top-level value of the wrong type as if it were a field.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    // The usual, valid body is parsed without tracking paths (which copies every key);
    // a body that fails is parsed again with them, for an error naming the field.
    let mut de = serde_json::Deserializer::from_slice(body);
    if let Ok(value) = T::deserialize(&mut de).and_then(|v| de.end().map(|()| v)) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let detail = without_value(&inner.to_string());
                // A missing or unknown field names itself in backticks at the top level.
                let field = if path == "." {
                    detail.split('`').nth(1).unwrap_or("body").to_owned()
                } else {
                    path
                };
                ApiError::Invalid { field, detail }
            }
            _ => ApiError::BadRequest(format!("malformed JSON body: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON body: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        n: Option<u64>,
        mode: Option<crate::domain::Mode>,
    }

    fn detail(body: &str) -> (String, String) {
        match parse_json::<Body>(body.as_bytes()) {
            Err(ApiError::Invalid { field, detail }) => (field, detail),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_field_details_never_echo_the_value() {
        let secret = "pf_live_s3cr3t, expected u64 \\\" `x`";
        for (body, field, expected) in [
            (
                format!(r#"{{"n": "{secret}"}}"#),
                "n",
                "invalid type: a string, expected u64 at line 1 column 43",
            ),
            (
                format!(r#"{{"mode": "{secret}"}}"#),
                "mode",
                "unknown variant, expected `proxy` or `middleware` at line 1 column 46",
            ),
            (
                r#"{"n": -12345}"#.to_owned(),
                "n",
                "invalid value: an integer, expected u64 at line 1 column 12",
            ),
            (
                r#"{"n": [1.5]}"#.to_owned(),
                "n",
                "invalid type: an array, expected u64 at line 1 column 6",
            ),
            (
                r#"{"nope": 1}"#.to_owned(),
                "nope",
                "unknown field `nope`, expected `n` or `mode` at line 1 column 7",
            ),
        ] {
            let (f, d) = detail(&body);
            assert_eq!((f.as_str(), d.as_str()), (field, expected), "{body}");
            assert!(!d.contains("s3cr3t") && !d.contains("12345"), "{d}");
        }
    }
}
