//! TLS for the API (rustls with the `ring` provider, so the static agent builds with a
//! C compiler only): the server's certificate and key, the certificate's pin, and the
//! clients' verification.
//!
//! A client that holds a pin (`fleetwave.pin=` on the agent's kernel command line,
//! `--pin` for the CLI) trusts exactly the certificate whose SHA-256 is the pin: no CA,
//! no name check, but the handshake's signature must still verify with that
//! certificate's key. Without a pin an https URL is checked against the system's roots.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use sha2::{Digest as _, Sha256};
use ureq::unversioned::transport::{
    Buffers, ConnectProxyConnector, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout,
    TcpConnector, Transport, TransportAdapter,
};

/// The SHA-256 of a certificate's DER: what a client pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin(pub [u8; 32]);

impl Pin {
    /// The pin of the certificate `der`.
    pub fn of(der: &[u8]) -> Pin {
        Pin(Sha256::digest(der).into())
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `sha256:` and 64 hex digits, lowercase: the form the server hands out.
impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a pin may be written as: `sha256:HEX` (hex in either case, with or without
/// the colons `openssl x509 -fingerprint` puts between bytes), or curl's
/// `sha256//BASE64`.
const PIN_FORMS: &str = "write it as sha256:HEX (64 hex digits, `fleetwave tls fingerprint CERT.pem` \
                         prints it) or sha256//BASE64";

impl std::str::FromStr for Pin {
    type Err = String;

    fn from_str(s: &str) -> Result<Pin, String> {
        let s = s.trim();
        if let Some(b64) = s.strip_prefix("sha256//") {
            use base64ct::Encoding as _;
            let bytes = base64ct::Base64::decode_vec(b64)
                .map_err(|_| format!("{s:?}: not base64 after sha256//; {PIN_FORMS}"))?;
            let arr: [u8; 32] = bytes
                .try_into()
                .map_err(|_| format!("{s:?}: not 32 bytes; {PIN_FORMS}"))?;
            return Ok(Pin(arr));
        }
        let hex = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("SHA256:"))
            .ok_or_else(|| format!("{s:?} is not a certificate pin; {PIN_FORMS}"))?;
        let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!(
                "{s:?}: the fingerprint must be 64 hex digits; {PIN_FORMS}"
            ));
        }
        let mut arr = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
            arr[i] = u8::from_str_radix(text, 16).map_err(|e| e.to_string())?;
        }
        Ok(Pin(arr))
    }
}

/// A certificate or key that cannot serve; each names its file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path}: {why}")]
    Bad { path: PathBuf, why: String },
    #[error(
        "{key} is not the private key of the certificate in {cert}; give the key the certificate was made for"
    )]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// The provider every side uses: ring, which builds with a C compiler alone;
/// aws-lc-rs needs cmake (and more for a static build). rustls 0.23.48 marks ring's
/// provider deprecated because it has no post-quantum key exchange: a known trade-off
/// (docs/dependencies.md), not a weakness of the pin.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's side: its rustls configuration and its certificate's pin.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// The SHA-256 of the end-entity certificate, handed to agents.
    pub pin: Pin,
    /// Where the certificate came from, for the log.
    pub cert: PathBuf,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.cert)
            .field("pin", &self.pin)
            .finish()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The certificate chain in the PEM file `path` (end-entity first).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read("certificate", path)?;
    let bad = |why: String| TlsError::Bad {
        path: path.to_owned(),
        why,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "holds no certificate (no -----BEGIN CERTIFICATE----- block)".into(),
        ));
    }
    Ok(certs)
}

/// Load the certificate and key and check that they belong together, so `serve`
/// fails before it starts rather than at the first handshake.
pub fn load_server(cert: &Path, key: &Path) -> Result<ServerTls, TlsError> {
    let certs = read_certs(cert)?;
    let key_pem = read("key", key)?;
    let bad_key = |why: String| TlsError::Bad {
        path: key.to_owned(),
        why,
    };
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        bad_key(format!(
            "no private key in it ({e}); a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block"
        ))
    })?;
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| bad_key(format!("not a usable private key: {e}")))?;
    let certified = rustls::sign::CertifiedKey::new(certs.clone(), signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::Mismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            });
        }
        Err(e) => {
            return Err(TlsError::Bad {
                path: cert.to_owned(),
                why: format!("not a valid X.509 certificate: {e}"),
            });
        }
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad_key(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    // The router speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        config: Arc::new(config),
        pin: Pin::of(&certs[0]),
        cert: cert.to_owned(),
    })
}

/// The pin of the first certificate in the PEM file `path`.
pub fn fingerprint(path: &Path) -> Result<Pin, TlsError> {
    Ok(Pin::of(&read_certs(path)?[0]))
}

/// Trusts the one certificate whose SHA-256 is the pin; the handshake's signature is
/// still checked against that certificate's key (without it, anyone who has seen the
/// public certificate could present it).
#[derive(Debug)]
struct PinVerifier {
    pin: Pin,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The pin did not match; carried through rustls to the connector's message.
#[derive(Debug)]
struct PinMismatch {
    presented: Pin,
    pinned: Pin,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "certificate fingerprint mismatch: the server presented {} but the pin is {}; \
             the server's certificate changed or something else answered (docs/security.md)",
            self.presented, self.pinned
        )
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Pin::of(end_entity);
        if presented == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        Err(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                presented,
                pinned: self.pin,
            })))
            .into(),
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client configuration: the pin, or the system's roots.
fn client_config(pin: Option<Pin>) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = match pin {
        Some(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(format!(
                    "no system root certificates to check the server with ({}); give the \
                     server's pin (--pin sha256:..., `fleetwave tls fingerprint CERT.pem`) or set \
                     SSL_CERT_FILE",
                    found
                        .errors
                        .first()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "none found".into())
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An HTTP client for `config` that speaks https:// too, verified by `pin` or the
/// system's roots (ureq's own TLS takes no custom verifier, so this is its connector
/// chain with a rustls step of our own).
pub fn agent(config: ureq::config::Config, pin: Option<Pin>) -> ureq::Agent {
    let connector =
        ().chain(ConnectProxyConnector::default())
            .chain(TcpConnector::default())
            .chain(TlsConnector {
                pin,
                config: OnceLock::new(),
            });
    ureq::Agent::with_parts(
        config,
        connector,
        ureq::unversioned::resolver::DefaultResolver::default(),
    )
}

/// Wraps an https:// connection in TLS; plain http:// passes through.
#[derive(Debug)]
struct TlsConnector {
    pin: Option<Pin>,
    /// Built at the first https:// connection (reading the system's roots costs).
    config: OnceLock<Arc<ClientConfig>>,
}

impl TlsConnector {
    fn config(&self) -> Result<Arc<ClientConfig>, ureq::Error> {
        if let Some(c) = self.config.get() {
            return Ok(c.clone());
        }
        let c = client_config(self.pin).map_err(|e| ureq::Error::Io(io::Error::other(e)))?;
        Ok(self.config.get_or_init(|| c).clone())
    }
}

/// The handshake's failure in words: a pin mismatch names both fingerprints.
fn handshake_failed(host: &str, e: io::Error) -> ureq::Error {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let why = match inner {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) => {
            o.0.to_string()
        }
        Some(rustls::Error::InvalidCertificate(c)) => format!(
            "the server's certificate is not trusted ({c:?}); give its pin (--pin sha256:..., \
             `fleetwave tls fingerprint CERT.pem`) if it is self-signed"
        ),
        _ => e.to_string(),
    };
    ureq::Error::Io(io::Error::other(format!("TLS with {host}: {why}")))
}

impl<In: Transport> Connector<In> for TlsConnector {
    type Out = Either<In, TlsTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let Some(transport) = chained else {
            return Ok(None);
        };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let config = self.config()?;
        let host = details
            .uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name = ServerName::try_from(host.clone())
            .map_err(|_| ureq::Error::BadUri(format!("{host} is not a host name or address")))?;
        let mut conn = ClientConnection::new(config, name)
            .map_err(|e| ureq::Error::Io(io::Error::other(e)))?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        sock.set_timeout(details.timeout);
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)
                .map_err(|e| handshake_failed(&host, e))?;
        }
        let buffers = LazyBuffers::new(
            details.config.input_buffer_size(),
            details.config.output_buffer_size(),
        );
        Ok(Some(Either::B(TlsTransport {
            buffers,
            stream: StreamOwned { conn, sock },
        })))
    }
}

/// An established TLS connection, as ureq's transport.
pub struct TlsTransport {
    buffers: LazyBuffers,
    stream: StreamOwned<ClientConnection, TransportAdapter>,
}

impl fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTransport").finish()
    }
}

impl Transport for TlsTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        let output = &self.buffers.output()[..amount];
        self.stream.write_all(output)?;
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let amount = self.stream.read(input)?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4";

    #[test]
    fn a_pin_reads_as_hex_with_or_without_colons_and_as_curls_base64() {
        let pin: Pin = format!("sha256:{HEX}").parse().expect("hex");
        assert_eq!(pin.to_string(), format!("sha256:{HEX}"));
        let upper: Pin = format!("sha256:{}", HEX.to_uppercase())
            .parse()
            .expect("upper");
        assert_eq!(upper, pin);
        let colons = HEX
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap_or_default().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(format!("SHA256:{colons}").parse::<Pin>(), Ok(pin));
        use base64ct::Encoding as _;
        let b64 = base64ct::Base64::encode_string(&pin.0);
        assert_eq!(format!("sha256//{b64}").parse::<Pin>(), Ok(pin));
    }

    #[test]
    fn a_malformed_pin_is_refused_with_the_forms_it_may_take() {
        for bad in [
            "",
            HEX,
            "sha1:abcd",
            "sha256:abcd",
            &format!("sha256:{}zz", &HEX[..62]),
            "sha256//not base64!",
            "sha256//AAAA",
        ] {
            let e = bad.parse::<Pin>().expect_err(bad);
            assert!(e.contains("sha256:HEX"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_pin_of_a_certificate_is_the_sha256_of_its_der() {
        // SHA-256 of the three bytes "abc" (FIPS 180-2's example).
        assert_eq!(
            Pin::of(b"abc").hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
