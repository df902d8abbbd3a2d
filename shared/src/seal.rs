//! Secrets at rest: AES-256-GCM with a random 96-bit nonce per seal, bound to the
//! owning record by associated data. Sealed form: base64(nonce || ciphertext+tag).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed secret is malformed")]
    Malformed,
    #[error("sealed secret failed authentication (wrong key or tampered)")]
    Authentication,
}

/// The 256-bit key that seals secrets at rest; also derives the keyed hash for IPs.
#[derive(Clone)]
pub struct SealingKey {
    cipher: Aes256Gcm,
    ip_key: [u8; 32],
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(..)")
    }
}

impl SealingKey {
    pub fn from_bytes(key: &[u8; 32]) -> Self {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
        mac.update(b"payfence client-ip hash key v1");
        let ip_key = mac.finalize().into_bytes().into();
        Self {
            cipher: Aes256Gcm::new(key.into()),
            ip_key,
        }
    }

    pub fn seal(&self, plaintext: &str, aad: &str) -> String {
        let nonce_bytes = crate::ids::random_bytes::<12>();
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce_bytes),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of a short secret cannot fail");
        let mut out = Vec::with_capacity(12 + ct.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&ct);
        STANDARD.encode(out)
    }

    pub fn open(&self, sealed: &str, aad: &str) -> Result<Zeroizing<String>, SealError> {
        let raw = STANDARD.decode(sealed).map_err(|_| SealError::Malformed)?;
        if raw.len() < 12 + 16 {
            return Err(SealError::Malformed);
        }
        let (nonce, ct) = raw.split_at(12);
        let pt = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SealError::Authentication)?;
        String::from_utf8(pt)
            .map(Zeroizing::new)
            .map_err(|_| SealError::Malformed)
    }

    /// Keyed hash of the client an address counts for ([`crate::limits::client_of`]):
    /// stable per key, not reversible without it.
    pub fn client_hash(&self, ip: &std::net::IpAddr) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.ip_key).expect("any key length");
        mac.update(crate::limits::client_of(*ip).to_string().as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let k = SealingKey::from_bytes(&[7u8; 32]);
        let sealed = k.seal("pfsig_secret", "site_1");
        assert!(!sealed.contains("pfsig_secret"));
        assert_eq!(k.open(&sealed, "site_1").unwrap().as_str(), "pfsig_secret");
        assert!(matches!(
            k.open(&sealed, "site_2"),
            Err(SealError::Authentication)
        ));
        let other = SealingKey::from_bytes(&[8u8; 32]);
        assert!(other.open(&sealed, "site_1").is_err());
        assert!(matches!(k.open("!!", "site_1"), Err(SealError::Malformed)));
        assert_ne!(k.seal("x", "a"), k.seal("x", "a"), "nonces differ");
    }

    #[test]
    fn client_hash_is_keyed() {
        let ip: std::net::IpAddr = "203.0.113.9".parse().unwrap();
        let a = SealingKey::from_bytes(&[1u8; 32]).client_hash(&ip);
        let b = SealingKey::from_bytes(&[2u8; 32]).client_hash(&ip);
        assert_ne!(a, b);
        assert!(!a.contains("203"));
        assert_eq!(a.len(), 32);
    }
}
