//! What happened, read-only: the audit log and its export, the quota events,
//! the admin audit trail.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::Response;
use axum::Extension;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::StatusCode;
use payfence_core::auth::Role;
use payfence_core::domain::{
    audit_kept_since_ms, now_ms, AuditFilter, AuditRecord, DecisionKind, Mode, Reason,
};
use payfence_core::http::{json, ApiError, ApiPath};
use payfence_core::store::{parse_admin_cursor, parse_event_cursor};
use payfence_core::AppState;
use serde_json::Value;

use super::input::{params, parse_cursor, parse_limit};
use super::{managed_site, ApiResult, P};

/// The logs query's filters ([`parse_filter`]).
const FILTERS: [&str; 8] = [
    "token_id",
    "plan",
    "decision",
    "reason",
    "from",
    "to",
    "path_prefix",
    "mode",
];

/// `from`/`to`: RFC 3339, or unix seconds.
fn parse_time(field: &str, v: &str) -> Result<u64, ApiError> {
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(secs.saturating_mul(1000));
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis().max(0) as u64)
        .map_err(|_| {
            ApiError::invalid(
                field,
                "must be RFC 3339 (2026-01-31T14:22:08Z) or unix seconds",
            )
        })
}

fn parse_filter(q: &HashMap<String, String>) -> Result<AuditFilter, ApiError> {
    let get = |k: &str| q.get(k).map(|s| s.as_str());
    let from_ms = get("from").map(|v| parse_time("from", v)).transpose()?;
    let to_ms = get("to").map(|v| parse_time("to", v)).transpose()?;
    if let (Some(from), Some(to)) = (from_ms, to_ms) {
        if from > to {
            // An empty answer would read as "nothing happened".
            return Err(ApiError::invalid("from", "must not be after to"));
        }
    }
    // Records past their retention are gone, even where the store has not deleted
    // them yet (DynamoDB's TTL takes up to two days, the local server purges hourly).
    let kept_since = audit_kept_since_ms(now_ms() / 1000);
    let from_ms = Some(from_ms.map_or(kept_since, |from| from.max(kept_since)));
    Ok(AuditFilter {
        token_id: get("token_id").map(Into::into),
        plan: get("plan").map(Into::into),
        decision: match get("decision") {
            None => None,
            Some("allow") => Some(DecisionKind::Allow),
            Some("deny") => Some(DecisionKind::Deny),
            Some(_) => return Err(ApiError::invalid("decision", "must be allow or deny")),
        },
        reason: get("reason")
            .map(|r| Reason::parse(r).ok_or_else(|| ApiError::invalid("reason", "unknown reason")))
            .transpose()?,
        from_ms,
        to_ms,
        path_prefix: get("path_prefix").map(Into::into),
        mode: match get("mode") {
            None => None,
            Some("proxy") => Some(Mode::Proxy),
            Some("middleware") => Some(Mode::Middleware),
            Some(_) => return Err(ApiError::invalid("mode", "must be proxy or middleware")),
        },
    })
}

pub(super) async fn query_logs(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let q = params(q, &[&FILTERS[..], &["limit", "cursor"]].concat())?;
    let filter = parse_filter(&q)?;
    let limit = parse_limit(&q)?;
    let page = st
        .store()
        .query_audit(
            &site_id,
            &filter,
            limit,
            q.get("cursor").map(|c| c.as_str()),
        )
        .await?;
    Ok(json(StatusCode::OK, &page))
}

const CSV_COLUMNS: [&str; 12] = [
    "id",
    "timestamp",
    "site_id",
    "token_id",
    "plan",
    "method",
    "path",
    "decision",
    "reason",
    "remaining",
    "latency_ms",
    "mode",
];

fn csv_cell(v: &Value) -> String {
    let s = match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // Neutralise spreadsheet formulas; quote when needed.
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn csv_row(r: &AuditRecord) -> String {
    let v = serde_json::to_value(r).unwrap_or_default();
    let mut line = CSV_COLUMNS
        .iter()
        .map(|c| csv_cell(&v[*c]))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

/// Streams every matching record, newest first, page by page.
pub(super) async fn export_logs(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let q = params(q, &[&FILTERS[..], &["format"]].concat())?;
    let filter = Arc::new(parse_filter(&q)?);
    let csv = match q.get("format").map(|s| s.as_str()) {
        None | Some("ndjson") => false,
        Some("csv") => true,
        Some(_) => return Err(ApiError::invalid("format", "must be ndjson or csv")),
    };
    let header = csv.then(|| format!("{}\n", CSV_COLUMNS.join(",")));
    let store = st.store().clone();
    // State: (cursor, first page, done).
    let stream = futures_util::stream::unfold(
        (None::<String>, header, false),
        move |(cursor, header, done)| {
            let store = store.clone();
            let filter = filter.clone();
            let site_id = site_id.clone();
            async move {
                if done {
                    return None;
                }
                let page = match store
                    .query_audit(&site_id, &filter, 500, cursor.as_deref())
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(error = %e, "log export failed mid-stream");
                        return Some((
                            Err(std::io::Error::other("store unavailable")),
                            (None, None, true),
                        ));
                    }
                };
                let mut chunk = header.unwrap_or_default();
                for r in &page.items {
                    if csv {
                        chunk.push_str(&csv_row(r));
                    } else {
                        chunk.push_str(&serde_json::to_string(r).unwrap_or_default());
                        chunk.push('\n');
                    }
                }
                let done = page.next_cursor.is_none();
                Some((
                    Ok(bytes::Bytes::from(chunk)),
                    (page.next_cursor, None, done),
                ))
            }
        },
    );
    let mut res = Response::new(Body::from_stream(stream));
    let (ctype, ext) = if csv {
        ("text/csv; charset=utf-8", "csv")
    } else {
        ("application/x-ndjson", "ndjson")
    };
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"payfence-logs.{ext}\"")) {
        res.headers_mut()
            .insert(http::header::CONTENT_DISPOSITION, v);
    }
    Ok(res)
}

/// A page of the site's quota events (by token, then month); `next_cursor`
/// continues it.
pub(super) async fn list_events(
    State(st): State<AppState>,
    Extension(p): P,
    ApiPath(site_id): ApiPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    managed_site(&st, &p, &site_id).await?;
    let q = params(q, &["limit", "cursor"])?;
    let limit = parse_limit(&q)?;
    let after = parse_cursor(&q, parse_event_cursor)?;
    let page = st.store().list_events(&site_id, limit, after).await?;
    Ok(json(StatusCode::OK, &page))
}

/// The admin audit trail: admins see every change, owners the changes to their sites.
pub(super) async fn audit_trail(
    State(st): State<AppState>,
    Extension(p): P,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let q = params(q, &["limit", "cursor"])?;
    let limit = parse_limit(&q)?;
    let before = parse_cursor(&q, parse_admin_cursor)?;
    let owner = match p.role {
        Role::Admin => None,
        Role::SiteOwner => Some(p.sub.as_str()),
        Role::Consumer => {
            return Err(ApiError::Forbidden(
                "consumers cannot read the audit trail".into(),
            ))
        }
    };
    let page = st.store().list_admin(limit, owner, before).await?;
    Ok(json(StatusCode::OK, &page))
}
