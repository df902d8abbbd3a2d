//! Proxy mode: `ANY /p/{site_id}/{path…}`. Authorizes, then forwards to the hidden
//! origin with a PayFence signature, streaming bodies both ways (never buffered,
//! stored or logged).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::from_fn;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::Router;
use http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, HOST, LOCATION, WWW_AUTHENTICATE,
};
use http::{HeaderMap, StatusCode, Uri};
use http_body::Body as _;
use payfence_core::domain::{elapsed_ms, now_ms, Mode, Reason};
use payfence_core::gateway::{AuthorizeRequest, Decision};
use payfence_core::http::{
    bearer, bearer_token, caused_by, client_ip, credential, decision_headers, problem,
    request_context, ApiError, BodyStalled, LogFields, RequestId, REQUEST_ID_HEADER,
};
use payfence_core::origin::{origin_client, OriginClient};
use payfence_core::{ids, AppState};
use serde_json::json;
use tokio::sync::Notify;

/// Header a consumer may use for its token, so its own `Authorization` reaches the origin.
pub const TOKEN_HEADER: &str = "x-payfence-token";

// What the origin receives besides the request.
const TIMESTAMP: HeaderName = HeaderName::from_static(payfence_signing::TIMESTAMP_HEADER);
const SIGNATURE: HeaderName = HeaderName::from_static(payfence_signing::SIGNATURE_HEADER);
const TOKEN_ID: HeaderName = HeaderName::from_static("x-payfence-token-id");
const PLAN: HeaderName = HeaderName::from_static("x-payfence-plan");
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

struct ProxyState {
    app: AppState,
    client: OriginClient,
    timeout: Duration,
}

/// The methods proxied: those CloudFront passes to `/p/*` (`template.yaml`), so the
/// local server forwards what a deployment does. Any other gets `405` with `Allow`
/// (CloudFront's own answer is `403`), among them `TRACE`, whose echo would show the
/// consumer the signed request as the origin received it, the origin's host name too.
const PROXIED: MethodFilter = MethodFilter::GET
    .or(MethodFilter::HEAD)
    .or(MethodFilter::OPTIONS)
    .or(MethodFilter::PUT)
    .or(MethodFilter::PATCH)
    .or(MethodFilter::POST)
    .or(MethodFilter::DELETE);

pub fn router(state: AppState) -> Router {
    let client = origin_client(
        state.config.allow_http_origins,
        state.config.origin_connect_timeout,
    );
    let timeout = state.config.origin_timeout;
    Router::new()
        .route("/p/{site_id}", on(PROXIED, proxy))
        .route("/p/{site_id}/", on(PROXIED, proxy))
        .route("/p/{site_id}/{*rest}", on(PROXIED, proxy))
        // Shared, not cloned per request.
        .with_state(Arc::new(ProxyState {
            app: state,
            client,
            timeout,
        }))
        .layer(from_fn(request_context))
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// Remove hop-by-hop headers, including those named in `Connection`.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none (`Connection` is one): look before changing anything.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    let listed: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        h.remove(name);
    }
    for name in HOP_BY_HOP {
        h.remove(name);
    }
}

/// Is any segment `.` or `..`, also percent-encoded, or once `%2F`, `\\` and `%5C`
/// are read as `/`? An origin that decodes or normalises those before routing would
/// otherwise resolve `/base/..%2Fadmin` outside the site's base path. An encoded slash
/// inside a name (`group%2Fproject`) is kept.
fn has_dot_segment(path: &str) -> bool {
    let (mut rest, mut dots, mut other) = (path.as_bytes(), 0, false);
    loop {
        let (separator, tail) = match rest {
            [] => (true, rest),
            [b'/' | b'\\', tail @ ..] => (true, tail),
            [b'%', h, l, tail @ ..]
                if matches!((h, l.to_ascii_lowercase()), (b'2', b'f') | (b'5', b'c')) =>
            {
                (true, tail)
            }
            [b'.', tail @ ..] => {
                dots += 1;
                (false, tail)
            }
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => {
                dots += 1;
                (false, tail)
            }
            [_, tail @ ..] => {
                other = true;
                (false, tail)
            }
        };
        if separator {
            if !other && (dots == 1 || dots == 2) {
                return true;
            }
            if rest.is_empty() {
                return false;
            }
            (dots, other) = (0, false);
        }
        rest = tail;
    }
}

/// A header a client could send to pass for PayFence's word to the origin: the
/// `X-PayFence-*` family (the token header too), and the forwarding headers an origin
/// behind a proxy it trusts believes (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`).
/// PayFence sets `X-Forwarded-For` itself.
fn spoofable(name: &str) -> bool {
    name.starts_with("x-payfence-")
        || name.starts_with("x-forwarded-")
        || name == "forwarded"
        || name == "x-real-ip"
}

/// A transfer coding other than `chunked` (which the server has already removed)?
/// Forwarding such a body would hand the origin, say, gzip-compressed bytes labelled
/// as the plain body; RFC 9112 §6.1 answers `501` instead.
fn unknown_transfer_coding(h: &HeaderMap) -> Option<String> {
    h.get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .find(|c| !c.is_empty() && !c.eq_ignore_ascii_case("chunked"))
        .map(str::to_owned)
}

fn denial(d: &Decision) -> Response {
    let reason = d.reason.map(|r| r.as_str()).unwrap_or("denied");
    let detail = match d.reason {
        Some(r) => match r.as_str() {
            "missing_token" => {
                "a token is required: Authorization: Bearer <token> or X-PayFence-Token"
            }
            "invalid_token" if d.wrong_site => "this token belongs to another site",
            "invalid_token" => "unknown token",
            "token_revoked" => "this token has been revoked",
            "rate_limited" => "the plan's per-minute rate limit is reached",
            "quota_exceeded" => "the plan's monthly quota is used up",
            _ => "the site's rate limit is reached",
        },
        None => "denied",
    };
    let mut res = problem(
        d.status(),
        reason.replace('_', "-").as_str(),
        detail,
        Some(json!({"reason": reason})),
    );
    decision_headers(res.headers_mut(), d);
    if d.status() == StatusCode::UNAUTHORIZED {
        // RFC 6750: a token that was sent but is not valid is named as such.
        let challenge = match d.reason {
            Some(Reason::MissingToken) => "Bearer",
            _ => "Bearer error=\"invalid_token\"",
        };
        res.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
    }
    res
}

async fn proxy(State(st): State<Arc<ProxyState>>, req: Request) -> Response {
    let started = Instant::now();
    let mut log = LogFields::default();
    let mut res = match handle(&st, req, started, &mut log).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    };
    res.extensions_mut().insert(log);
    res
}

async fn handle(
    st: &ProxyState,
    req: Request,
    started: Instant,
    log: &mut LogFields,
) -> Result<Response, ApiError> {
    // Use the raw path: the origin must receive the path exactly as sent.
    let raw = req
        .uri()
        .path()
        .strip_prefix("/p/")
        .unwrap_or_default()
        .to_owned();
    let (site_id, rest) = match raw.find('/') {
        Some(i) => (&raw[..i], &raw[i..]),
        None => (raw.as_str(), "/"),
    };
    if !ids::is_id(site_id, "site_") {
        return Err(ApiError::NotFound("unknown site".into()));
    }
    if has_dot_segment(rest) {
        return Err(ApiError::BadRequest(
            "path must not contain . or .. segments".into(),
        ));
    }
    if let Some(coding) = unknown_transfer_coding(req.headers()) {
        return Err(ApiError::NotImplemented(format!(
            "transfer coding {coding:?} is not supported: send the body with Content-Length or chunked only"
        )));
    }
    let site = st
        .app
        .gateway
        .site(site_id)
        .await?
        .ok_or_else(|| ApiError::NotFound("unknown site".into()))?;
    log.site_id = Some(site_id.to_owned());
    let rest_and_query = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    };

    let token_header = credential(req.headers(), TOKEN_HEADER);
    let via_header = token_header.is_some();
    let token = token_header.or_else(|| bearer(req.headers()));
    // The consumer's own `Authorization` reaches the origin, unless it repeats the token.
    let drop_authorization = !via_header
        || req
            .headers()
            .get_all(AUTHORIZATION)
            .iter()
            .any(|v| bearer_token(&String::from_utf8_lossy(v.as_bytes())) == token.as_deref());
    let ip = client_ip(&req);
    let authorized = st
        .app
        .gateway
        .authorize(AuthorizeRequest {
            site: &site,
            token: token.as_deref(),
            method: req.method().as_str(),
            path_and_query: &rest_and_query,
            client_ip: ip,
            mode: Mode::Proxy,
            started,
        })
        .await?;
    let (decision, durable) = (authorized.decision, authorized.durable);
    let auth_done = Instant::now();
    log.auth_ms = Some(elapsed_ms(started));
    log.token_id = decision.token_id.clone();
    log.decision = Some(if decision.allowed { "allow" } else { "deny" });
    log.reason = decision.reason.map(|r| r.as_str());
    if !decision.allowed {
        durable.await?;
        return Ok(denial(&decision));
    }

    // Build the upstream request.
    let origin: Uri =
        site.site.origin_url.parse().map_err(|_| {
            ApiError::Internal(format!("site {site_id} has an unparsable origin_url"))
        })?;
    let base = origin.path().trim_end_matches('/');
    let path_and_query = format!("{base}{rest_and_query}");
    let uri = Uri::builder()
        .scheme(origin.scheme_str().unwrap_or("https"))
        .authority(origin.authority().map(|a| a.as_str()).unwrap_or_default())
        .path_and_query(path_and_query.as_str())
        .build()
        .map_err(|_| ApiError::BadRequest("the request target cannot be forwarded".into()))?;

    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let (mut parts, body) = req.into_parts();
    let method = parts.method.clone();
    let client_version = parts.version;
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    headers.remove(HOST);
    if drop_authorization {
        headers.remove(AUTHORIZATION);
    }
    let claimed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| spoofable(k.as_str()))
        .cloned()
        .collect();
    for k in claimed {
        headers.remove(k);
    }
    let now_s = now_ms() / 1000;
    let signature = payfence_signing::sign(
        &site.signing_secrets(now_s),
        method.as_str(),
        &path_and_query,
        now_s,
    );
    // Static names and owned values: no copies of either.
    let mut add = |name: HeaderName, value: String| {
        if let Ok(v) = HeaderValue::try_from(value) {
            headers.insert(name, v);
        }
    };
    add(TIMESTAMP, now_s.to_string());
    add(SIGNATURE, signature);
    add(TOKEN_ID, decision.token_id.clone().unwrap_or_default());
    add(PLAN, decision.plan.clone().unwrap_or_default());
    add(REQUEST_ID_HEADER, request_id);
    // The address PayFence saw, replacing any the client claimed: one value the
    // origin can trust, as it trusts the rest of a signed request.
    if let Some(ip) = ip {
        add(FORWARDED_FOR, ip.to_string());
    }
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    parts.extensions = Default::default();
    // A body makes the origin's clock stop while the client is sending it.
    let (body, clock) = if body.is_end_stream() {
        (body, None)
    } else {
        let clock = Arc::new(OriginClock::new());
        let clocked = Clocked {
            body,
            clock: clock.clone(),
        };
        (Body::new(clocked), Some(clock))
    };
    let answer = st.client.request(http::Request::from_parts(parts, body));

    // The origin hop overlaps the commit, which the store's own thread carries out
    // whether or not `durable` is polled; nothing reaches the client before both.
    // Awaiting the commit second means no wake-up for it when it is already done
    // by the time the origin answers (see docs/performance.md).
    let result = match clock {
        None => tokio::time::timeout(st.timeout, answer).await.ok(),
        Some(clock) => tokio::select! {
            biased;
            answer = answer => Some(answer),
            () = clock.expired(st.timeout) => None,
        },
    };
    durable.await?;
    log.origin_ms = Some(elapsed_ms(auth_done));
    // Failures carry the decision's headers too: the request was counted.
    let failed = |e: ApiError| {
        let mut r = e.into_response();
        decision_headers(r.headers_mut(), &decision);
        Ok(r)
    };
    let mut res = match result {
        None => {
            tracing::warn!(site_id, "origin timed out");
            return failed(ApiError::GatewayTimeout(
                "the origin did not answer in time".into(),
            ));
        }
        Some(Err(e)) if caused_by::<BodyStalled>(&e) => return failed(BodyStalled::api_error()),
        // The client's body broke off or had bad chunked framing: its mistake. Its
        // errors are `axum::Error`s, which the client's error carries as a source.
        Some(Err(e)) if caused_by::<axum::Error>(&e) => {
            return failed(ApiError::BadRequest(
                "the request body ended early or was malformed".into(),
            ));
        }
        Some(Err(e)) => {
            tracing::warn!(site_id, error = %e, connect = e.is_connect(), "origin unreachable");
            return failed(ApiError::BadGateway(
                "the origin could not be reached".into(),
            ));
        }
        Some(Ok(res)) => res.map(Body::new),
    };
    // The version is per hop: an HTTP/1.0 origin must not turn the client's
    // keep-alive HTTP/1.1 connection into one that closes after each answer.
    *res.version_mut() = client_version;
    strip_hop_by_hop(res.headers_mut());
    if let Some(public) = res
        .headers()
        .get(LOCATION)
        .and_then(|l| public_location(l.to_str().ok()?, &origin, site_id))
    {
        res.headers_mut().insert(LOCATION, public);
    }
    decision_headers(res.headers_mut(), &decision);
    log.relayed = true;
    Ok(res)
}

/// The clock of `Config::origin_timeout` for a request with a body. It runs while the
/// origin owes us something: to take the next piece of the body, which we have, or
/// once the body is sent, its answer. It stops while we wait for the client's next
/// piece, so a slow upload is not the origin's delay, and an origin that stops
/// reading the body is timed out all the same.
struct OriginClock {
    start: Instant,
    /// Nanoseconds after `start` since which the origin owes us, or [`CLIENT_OWES`].
    owed_since: AtomicU64,
    /// Signalled when the origin owes us again after the client did.
    owing: Notify,
}

const CLIENT_OWES: u64 = u64::MAX;

impl OriginClock {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            // The origin owes us from the start: a connection, then to take the body.
            owed_since: AtomicU64::new(0),
            owing: Notify::new(),
        }
    }

    fn client_owes(&self) {
        self.owed_since.store(CLIENT_OWES, Ordering::Release);
    }

    fn origin_owes(&self) {
        let now = self.start.elapsed().as_nanos() as u64;
        if self.owed_since.swap(now, Ordering::AcqRel) == CLIENT_OWES {
            self.owing.notify_one();
        }
    }

    /// Resolves once the origin has owed us something for `timeout` at a stretch.
    /// While it keeps taking the body, the deadline moves on, seen when it is reached.
    async fn expired(&self, timeout: Duration) {
        loop {
            let since = self.owed_since.load(Ordering::Acquire);
            if since == CLIENT_OWES {
                self.owing.notified().await;
                continue;
            }
            let deadline = self.start + Duration::from_nanos(since) + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A request body that keeps an [`OriginClock`]: the origin owes us once it is handed
/// a piece or the end, the client while the next piece has not arrived.
struct Clocked {
    body: Body,
    clock: Arc<OriginClock>,
}

impl http_body::Body for Clocked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Pending => self.clock.client_owes(),
            Poll::Ready(Some(Ok(_)) | None) => self.clock.origin_owes(),
            Poll::Ready(Some(Err(_))) => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A redirect into the origin (absolute, or a path on it) pointed at the same place
/// behind the proxy instead, so that following it goes through PayFence and the
/// origin's address is not revealed. Other locations are left as they are.
fn public_location(location: &str, origin: &Uri, site_id: &str) -> Option<HeaderValue> {
    let target: Uri = location.parse().ok()?;
    let same_origin = match (target.scheme_str(), target.authority()) {
        (None, None) => location.starts_with('/'),
        (Some(scheme), Some(authority)) => {
            scheme.eq_ignore_ascii_case(origin.scheme_str()?)
                && authority
                    .as_str()
                    .eq_ignore_ascii_case(origin.authority()?.as_str())
        }
        _ => false,
    };
    if !same_origin {
        return None;
    }
    let path_and_query = target.path_and_query().map_or("/", |p| p.as_str());
    let rest = path_and_query.strip_prefix(origin.path().trim_end_matches('/'))?;
    let rest = match rest.as_bytes().first() {
        None => "/",
        Some(b'/') => rest,
        Some(b'?') => return HeaderValue::try_from(format!("/p/{site_id}/{rest}")).ok(),
        Some(_) => return None,
    };
    HeaderValue::try_from(format!("/p/{site_id}{rest}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_into_the_origin_stay_behind_the_proxy() {
        let origin: Uri = "https://api.example.com/base".parse().unwrap();
        let public =
            |l: &str| public_location(l, &origin, "site_1").map(|v| v.to_str().unwrap().to_owned());
        for (location, expected) in [
            (
                "https://api.example.com/base/v1/x?a=1",
                Some("/p/site_1/v1/x?a=1"),
            ),
            ("HTTPS://API.example.com/base", Some("/p/site_1/")),
            ("https://api.example.com/base?a", Some("/p/site_1/?a")),
            ("/base/login", Some("/p/site_1/login")),
            ("/other", None),
            ("/basement", None),
            ("https://api.example.com:8443/base/x", None),
            ("http://api.example.com/base/x", None),
            ("https://elsewhere.example/base/x", None),
            ("//api.example.com/base/x", None),
            ("next", None),
        ] {
            assert_eq!(public(location).as_deref(), expected, "{location}");
        }
    }

    #[test]
    fn dot_segments() {
        for bad in [
            "/..",
            "/a/../b",
            "/%2e%2e/x",
            "/%2E./x",
            "/./a",
            "/a/%2e",
            "/a/.%2E/",
            "/base/..%2Fadmin",
            "/base/..%2fadmin",
            "/a/..\\..\\admin",
            "/a/..%5Cadmin",
            "/a/x%2f.%2fy",
        ] {
            assert!(has_dot_segment(bad), "{bad}");
        }
        for ok in [
            "/",
            "/a/b",
            "/a..b",
            "/...",
            "/v1/file.txt",
            "/%2e%2e%2e",
            "/%2",
            "/.%2",
            "/%2f",
            "/projects/group%2Fproject",
            "/a\\b",
            "/a/..x%2Fy",
            "/%2e%2e%2e%2f",
        ] {
            assert!(!has_dot_segment(ok), "{ok}");
        }
    }

    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
