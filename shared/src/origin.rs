//! Origins: validation of `origin_url` against SSRF, and the HTTP client that
//! forwards to them, whose resolver refuses non-public addresses at connect time
//! (so a public name that later resolves to 127.0.0.1 or 169.254.169.254 is refused too).

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type OriginConnector = hyper_rustls::HttpsConnector<HttpConnector<PublicResolver>>;
pub type OriginClient = Client<OriginConnector, axum::body::Body>;

/// Is this address reachable on the public internet (not loopback, private,
/// link-local, metadata, CGNAT, multicast, documentation or reserved)?
pub fn is_public_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            let embedded_v4 =
                |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
            // Global unicast is 2000::/3; everything else (loopback, unspecified,
            // v4-compatible, NAT64, discard, unique local incl. fd00:ec2::254,
            // link-local, multicast) is not public.
            (s[0] & 0xe000) == 0x2000
                && !(s[0] == 0x2001 && s[1] < 0x0200) // IETF protocol assignments, incl. Teredo
                && !(s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                && !(s[0] == 0x3fff && s[1] < 0x1000) // documentation
                && (s[0] != 0x2002 || is_public_v4(embedded_v4(s[1], s[2]))) // 6to4
        }
    }
}

/// May an origin use this address? Public ones always; with `allow_private` (local
/// development) also loopback and private ones, but never link-local ones, where cloud
/// metadata services answer (169.254.169.254, fd00:ec2::254).
pub fn is_allowed_origin_ip(ip: IpAddr, allow_private: bool) -> bool {
    is_public_ip(ip) || (allow_private && !is_link_local_or_metadata(ip))
}

fn is_link_local_or_metadata(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.is_link_local(),
            None => {
                (v6.segments()[0] & 0xffc0) == 0xfe80
                    || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
            }
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 shared
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking
        || o[0] >= 240)
}

/// Validate and normalise an origin URL. Without `allow_private`, only `https://`
/// on a public host; with it (local development), also `http://` and private hosts.
pub fn validate_origin_url(raw: &str, allow_private: bool) -> Result<String, String> {
    let url = url::Url::parse(raw.trim()).map_err(|e| format!("not a valid URL ({e})"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_private => {}
        "http" => return Err("must use https://".into()),
        other => return Err(format!("unsupported scheme {other:?}, use https://")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain credentials".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not contain a query or fragment".into());
    }
    if url.port() == Some(0) {
        return Err("port must be between 1 and 65535".into());
    }
    match url.host() {
        None => return Err("must have a host".into()),
        Some(url::Host::Ipv4(ip)) if !is_allowed_origin_ip(IpAddr::V4(ip), allow_private) => {
            return Err(refused(allow_private))
        }
        Some(url::Host::Ipv6(ip)) if !is_allowed_origin_ip(IpAddr::V6(ip), allow_private) => {
            return Err(refused(allow_private))
        }
        Some(url::Host::Domain(d)) if !allow_private => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            let internal = d == "localhost"
                || !d.contains('.')
                || [
                    ".localhost",
                    ".local",
                    ".internal",
                    ".localdomain",
                    ".home.arpa",
                ]
                .iter()
                .any(|s| d.ends_with(s));
            if internal {
                return Err("must be a public host name".into());
            }
        }
        _ => {}
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

fn refused(allow_private: bool) -> String {
    if allow_private {
        "must not be a link-local or metadata address".into()
    } else {
        "must be a public host (loopback, private, link-local and metadata addresses are refused)"
            .into()
    }
}

/// A resolver that refuses names resolving to addresses origins may not use.
#[derive(Clone)]
pub struct PublicResolver {
    inner: GaiResolver,
    allow_private: bool,
}

impl tower::Service<Name> for PublicResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, io::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let fut = self.inner.call(name);
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = fut.await?.collect();
            if addrs
                .iter()
                .any(|a| !is_allowed_origin_ip(a.ip(), allow_private))
            {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "origin resolves to an address origins may not use",
                ));
            }
            Ok(addrs.into_iter())
        })
    }
}

/// The client that forwards to origins (HTTP/1.1 over TLS, or plain HTTP when
/// private origins are allowed), built once per process.
pub fn origin_client(allow_private: bool, connect_timeout: Duration) -> OriginClient {
    let mut http = HttpConnector::new_with_resolver(PublicResolver {
        inner: GaiResolver::new(),
        allow_private,
    });
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .expect("ring provides the default TLS versions")
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_internal_origins() {
        for bad in [
            "http://api.example.com",
            "https://127.0.0.1",
            "https://localhost:8080",
            "https://10.1.2.3",
            "https://169.254.169.254/latest",
            "https://[::1]",
            "https://[fd00:ec2::254]",
            "https://[::ffff:127.0.0.1]",
            "https://2130706433",
            "https://0x7f.1",
            "https://metadata.google.internal",
            "https://printer.local",
            "https://intranet",
            "https://user:pw@api.example.com",
            "ftp://api.example.com",
            "https://api.example.com/?a=1",
            "https://api.example.com:0",
            "https://[2002:7f00:1::]",
            "not a url",
        ] {
            assert!(validate_origin_url(bad, false).is_err(), "{bad}");
        }
        assert_eq!(
            validate_origin_url("https://API.example.com/base/", false).unwrap(),
            "https://api.example.com/base"
        );
        assert!(validate_origin_url("https://8.8.8.8", false).is_ok());
        assert!(validate_origin_url("http://127.0.0.1:9000", true).is_ok());
        assert!(validate_origin_url("http://10.0.0.5", true).is_ok());
        // Local development still never reaches a cloud metadata service.
        for bad in [
            "http://169.254.169.254/latest",
            "http://169.254.1.1",
            "http://[fe80::1]",
            "http://[fd00:ec2::254]",
            "http://[::ffff:169.254.169.254]",
        ] {
            assert!(validate_origin_url(bad, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn public_ips() {
        for ip in [
            "8.8.8.8",
            "2606:4700::1111",
            "52.1.2.3",
            "2a00:1450:4001::200e",
            "2002:808:808::1", // 6to4 of 8.8.8.8
        ] {
            assert!(is_public_ip(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "100.64.0.1",
            "192.168.1.1",
            "172.16.0.1",
            "0.0.0.0",
            "fe80::1",
            "::",
            "240.0.0.1",
            "2002:7f00:1::",       // 6to4 of 127.0.0.1
            "2002:a9fe:a9fe::",    // 6to4 of 169.254.169.254
            "2001:0:4136:e378::1", // Teredo
            "2001:2::1",           // benchmarking
            "3fff::1",             // documentation
            "100::1",              // discard
            "::7f00:1",            // v4-compatible
            "64:ff9b::a9fe:a9fe",  // NAT64
            "ff02::1",
            "fd00:ec2::254",
        ] {
            assert!(!is_public_ip(ip.parse().unwrap()), "{ip}");
        }
    }
}
