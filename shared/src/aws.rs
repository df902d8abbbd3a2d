//! AWS SDK configuration shared by the stores and the key loader: one HTTPS client
//! (rustls with ring, trusting only the Amazon roots, compiled in, so start-up reads
//! no trust store from disk) and the SDK's standard environment.

use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// PEM of the root certificates AWS service endpoints chain to (Amazon Trust
/// Services and its Starfield cross-signing root).
fn amazon_roots() -> TrustStore {
    let mut store = TrustStore::empty().with_native_roots(false);
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        let der: &[u8] = cert.as_ref();
        let amazon = der.windows(6).any(|w| w == b"Amazon")
            || der.windows(18).any(|w| w == b"Starfield Services");
        if amazon {
            let b64 = STANDARD.encode(der);
            let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
            for line in b64.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
            store.add_pem_certificate(pem.into_bytes());
        }
    }
    store
}

/// The SDK configuration from the standard environment, on PayFence's HTTPS client.
pub fn loader(endpoint: Option<&str>) -> aws_config::ConfigLoader {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .tls_context(
            TlsContext::builder()
                .with_trust_store(amazon_roots())
                .build()
                .expect("a trust store of valid certificates"),
        )
        .build_https();
    // The region from the standard variables (Lambda always sets AWS_REGION); the
    // SDK's fallback chain would ask the instance metadata service.
    let region = std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|_| "us-east-1".into());
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .region(aws_config::Region::new(region));
    if let Some(e) = endpoint {
        loader = loader.endpoint_url(e);
    }
    loader
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_amazon_roots() {
        let n = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .filter(|c| c.as_ref().windows(6).any(|w| w == b"Amazon"))
            .count();
        assert!(n >= 4, "Amazon Root CA 1-4 expected, found {n}");
    }
}
