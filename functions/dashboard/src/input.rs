//! Checks of what request bodies and queries hold: names, ranges, origins, PATCH
//! fields, list parameters (`limit`, `cursor`), with `422`s that name the field.

use std::collections::HashMap;

use axum::extract::rejection::BytesRejection;
use payfence_core::http::ApiError;
use payfence_core::origin::validate_origin_url;
use payfence_core::AppState;
use serde::Deserialize;

pub(super) fn check_range(field: &str, v: u64, min: u64, max: u64) -> Result<u64, ApiError> {
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            field,
            format!("must be between {min} and {max}"),
        ))
    }
}

pub(super) fn check_name(field: &str, v: &str, max: usize) -> Result<String, ApiError> {
    let v = v.trim();
    if v.is_empty() || v.chars().count() > max || v.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {max} characters, without control characters"),
        ));
    }
    Ok(v.to_owned())
}

pub(super) fn check_origin(st: &AppState, v: &str) -> Result<String, ApiError> {
    validate_origin_url(v, st.config.allow_http_origins)
        .map_err(|e| ApiError::invalid("origin_url", e))
}

pub(super) fn check_params(v: Vec<String>) -> Result<Vec<String>, ApiError> {
    if v.len() > 32
        || v.iter()
            .any(|p| p.is_empty() || p.len() > 64 || p.contains(['&', '=', '?']))
    {
        return Err(ApiError::invalid(
            "secret_query_params",
            "up to 32 parameter names, each 1-64 characters without & = ?",
        ));
    }
    Ok(v)
}

/// A PATCH field that is either left out (`None`) or given a value: `null` would
/// otherwise read as "left out" and change nothing without a word.
pub(super) fn not_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    match Option::<T>::deserialize(d)? {
        Some(v) => Ok(Some(v)),
        None => Err(serde::de::Error::custom(
            "must not be null: leave the field out to keep its value",
        )),
    }
}

/// An optional JSON object body: an empty (or all-blank) one is `T::default()`.
pub(super) fn optional_json<T: Default + serde::de::DeserializeOwned>(
    body: Result<bytes::Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    payfence_core::http::parse_json(&body)
}

/// A nullable field that must be present (serde takes a missing `Option` as `None`).
pub(super) fn required<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::deserialize(d)
}

/// A PATCH value that may be given empty to remove it: `None`, or checked as
/// `check_name` does.
pub(super) fn name_or_none(field: &str, v: &str, max: usize) -> Result<Option<String>, ApiError> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    check_name(field, v, max).map(Some)
}

/// The query parameters of a list route, those with an empty value (`?cursor=`, as
/// in API.md's `logs?token_id=&plan=…`) left out as not given. A parameter the route
/// does not take is refused rather than ignored, so that a misspelt filter
/// (`?decison=deny`) is not read as "no filter".
pub(super) fn params(
    mut q: HashMap<String, String>,
    known: &[&str],
) -> Result<HashMap<String, String>, ApiError> {
    q.retain(|_, v| !v.is_empty());
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid(
            k,
            format!(
                "unknown query parameter; this route takes {}",
                known.join(", ")
            ),
        )),
        None => Ok(q),
    }
}

/// `cursor`, if given, as `parse` reads it: a cursor of another list is a `422`.
pub(super) fn parse_cursor<'q, T>(
    q: &'q HashMap<String, String>,
    parse: impl Fn(&'q str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    q.get("cursor")
        .map(|c| parse(c).ok_or_else(|| ApiError::invalid("cursor", "not a cursor from this list")))
        .transpose()
}

/// `limit`: 1–1000, default 100.
pub(super) fn parse_limit(q: &HashMap<String, String>) -> Result<usize, ApiError> {
    limit_up_to(q, 1000, 100)
}

/// `limit`: 1–`max`, default `default`.
pub(super) fn limit_up_to(
    q: &HashMap<String, String>,
    max: usize,
    default: usize,
) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(l) => (l.parse::<usize>().ok())
            .filter(|l| (1..=max).contains(l))
            .ok_or_else(|| ApiError::invalid("limit", format!("must be between 1 and {max}"))),
    }
}
