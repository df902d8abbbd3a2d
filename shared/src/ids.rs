//! Identifiers and secrets (API.md "Identifiers and secrets"). Secrets come from the
//! OS CSPRNG and are stored only as SHA-256 hashes or sealed; identifiers, made on
//! every request, come from the thread-local CSPRNG (seeded from the OS), which
//! needs no system call.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use rand::rngs::OsRng;
use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const TOKEN_PREFIX: &str = "pf_live_";
pub const API_KEY_PREFIX: &str = "sk_";
pub const SIGNING_SECRET_PREFIX: &str = "pfsig_";
pub const WEBHOOK_SECRET_PREFIX: &str = "whsec_";

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    OsRng.fill_bytes(&mut buf);
    buf
}

fn id(prefix: &str) -> String {
    let mut hex = [0; 16];
    hex::encode_to_slice(rand::thread_rng().gen::<[u8; 8]>(), &mut hex).expect("16 for 8 bytes");
    let mut id = String::with_capacity(prefix.len() + hex.len());
    id.push_str(prefix);
    id.push_str(std::str::from_utf8(&hex).expect("hex is ASCII"));
    id
}

/// A random (version 4) UUID, for request ids.
pub fn request_id() -> String {
    uuid::Builder::from_random_bytes(rand::thread_rng().gen())
        .into_uuid()
        .to_string()
}

pub fn site_id() -> String {
    id("site_")
}
pub fn plan_id() -> String {
    id("plan_")
}
pub fn token_id() -> String {
    id("tok_")
}
pub fn key_id() -> String {
    id("key_")
}
/// The id of an audit record decided at `ts_us` (unix microseconds, the reading its
/// `ts_ms` comes from): `log_`, the microsecond within the millisecond (3 digits),
/// then 64 random bits (16 hex characters). Records are ordered by `ts_ms`, then id,
/// so "newest first" holds within a millisecond too. (Not a sequence number, which
/// would tell one site's owner how many decisions the gateway made for others.)
pub fn log_id(ts_us: u64) -> String {
    let random: u64 = rand::thread_rng().gen();
    format!("log_{:03}{random:016x}", ts_us % 1000)
}
pub fn event_id() -> String {
    id("evt_")
}

/// A consumer token: `pf_live_` + 32 random bytes, base64url without padding.
pub fn consumer_token() -> String {
    format!(
        "{TOKEN_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(random_bytes::<32>())
    )
}

/// A site API key: `sk_` + 24 random bytes as 48 lowercase hex characters.
pub fn api_key() -> String {
    format!("{API_KEY_PREFIX}{}", hex::encode(random_bytes::<24>()))
}

/// A site signing secret: `pfsig_` + 32 random bytes, base64url without padding.
pub fn signing_secret() -> String {
    format!(
        "{SIGNING_SECRET_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(random_bytes::<32>())
    )
}

/// A webhook signing secret (Standard Webhooks): `whsec_` + base64 of 32 random bytes.
pub fn webhook_secret() -> String {
    format!(
        "{WEBHOOK_SECRET_PREFIX}{}",
        STANDARD.encode(random_bytes::<32>())
    )
}

/// Hex SHA-256 of a secret; what the stores keep for tokens and API keys.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time string comparison.
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// Does this look like a consumer token? (Cheap shape check before any lookup.)
pub fn is_token_shaped(s: &str) -> bool {
    s.strip_prefix(TOKEN_PREFIX).is_some_and(|rest| {
        rest.len() == 43
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Does this look like a site API key?
pub fn is_api_key_shaped(s: &str) -> bool {
    s.strip_prefix(API_KEY_PREFIX).is_some_and(|rest| {
        rest.len() == 48 && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Is this a well-formed id with the given prefix (`site_`, `tok_`, ...)?
pub fn is_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == 16 && rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let t = consumer_token();
        assert!(is_token_shaped(&t), "{t}");
        assert_eq!(t.len(), 8 + 43);
        let k = api_key();
        assert!(is_api_key_shaped(&k));
        assert_eq!(k.len(), 3 + 48);
        assert!(is_id(&site_id(), "site_"));
        let (a, b) = (log_id(1_795_000_000_000_009), log_id(1_795_000_000_000_010));
        assert!(
            a.len() == 4 + 19 && a.starts_with("log_009") && a < b,
            "{a} {b}"
        );
        assert!(signing_secret().starts_with("pfsig_"));
        assert_eq!(STANDARD.decode(&webhook_secret()[6..]).unwrap().len(), 32);
        assert_ne!(consumer_token(), consumer_token());
        assert!(!is_token_shaped("pf_live_short"));
        assert!(!is_api_key_shaped("sk_XYZ"));
    }

    #[test]
    fn hashing() {
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(ct_eq("a", "a"));
        assert!(!ct_eq("a", "b"));
    }
}
