//! TLS to the PostgreSQL ledger: tokio-postgres's `MakeTlsConnect` over tokio-rustls, with
//! libpq's `sslmode` meanings.
//!
//! | `sslmode`            | TLS                              | certificate checked                 |
//! |----------------------|----------------------------------|-------------------------------------|
//! | `disable`            | never                            | —                                   |
//! | `prefer` (default)   | when the server offers it        | no                                  |
//! | `require`            | always (refused if not offered)  | no; with `sslrootcert`: as verify-ca |
//! | `verify-ca`          | always                           | chain to a trusted root             |
//! | `verify-full`        | always                           | chain, and the host name            |
//!
//! Trusted roots are the webpki roots (Mozilla's list, compiled in) plus the certificates of
//! `sslrootcert=<PEM file>` (`sslrootcert=system`: the webpki roots alone). tokio-postgres
//! parses `disable`, `prefer` and `require` itself and refuses the rest of libpq's TLS
//! settings, so [`super::postgres::parse`] takes `verify-ca`, `verify-full` and `sslrootcert`
//! out of the URL first and hands them here; `allow` and client certificates (`sslcert`,
//! `sslkey`) are refused with an error naming them.
//!
//! Without a certificate check (`prefer`, `require`) the handshake's signatures are still
//! verified, so the session is encrypted to whoever holds the certificate's key — libpq's
//! behaviour, which protects against passive listeners, not an active man in the middle.
//! Channel binding (SCRAM-SHA-256-PLUS) is not offered: SCRAM-SHA-256 is used as over a
//! plain connection.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// What the certificate must prove (libpq's `sslmode` beyond what tokio-postgres knows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// `prefer`, `require`: encryption only.
    Nothing,
    /// `verify-ca`: a chain to a trusted root, any name.
    Chain,
    /// `verify-full`: a chain, and the name we connected to.
    Full,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("sslrootcert: cannot read {path}: {source}")]
    RootCert {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("sslrootcert: {path} holds no certificate")]
    NoCert { path: String },
    #[error("sslrootcert: {path}: {source}")]
    BadCert { path: String, source: rustls::Error },
    #[error("cannot set up TLS: {0}")]
    Rustls(String),
}

/// Makes TLS connections for tokio-postgres, one client config shared by all.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for MakeRustls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MakeRustls")
    }
}

impl MakeRustls {
    /// `root_cert`: a PEM file of extra trusted roots (libpq's `sslrootcert`).
    pub fn new(verify: Verify, root_cert: Option<&Path>) -> Result<MakeRustls, TlsSetupError> {
        // Our own provider, not the process default: the upstream client and redis may or
        // may not have installed one, and all of them use ring.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match verify {
            Verify::Nothing => Arc::new(AnyCertificate(provider.clone())),
            Verify::Chain | Verify::Full => {
                let roots = roots(root_cert)?;
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
                if verify == Verify::Chain {
                    Arc::new(AnyName(webpki))
                } else {
                    webpki
                }
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustls {
            config: Arc::new(config),
        })
    }
}

/// The webpki roots, plus those of `file`.
fn roots(file: Option<&Path>) -> Result<RootCertStore, TlsSetupError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let Some(path) = file else {
        return Ok(roots);
    };
    let shown = || path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsSetupError::RootCert {
            path: shown(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCert { path: shown() });
    }
    for c in certs {
        roots.add(c).map_err(|source| TlsSetupError::BadCert {
            path: shown(),
            source,
        })?;
    }
    Ok(roots)
}

/// `sslrootcert` as libpq reads it: `system` means the default roots only.
pub fn root_cert_path(value: &str) -> Option<PathBuf> {
    (value != "system").then(|| PathBuf::from(value))
}

/// A URL with libpq's TLS settings that tokio-postgres refuses taken out.
#[derive(Debug)]
pub struct UrlTls {
    /// What is left for tokio-postgres.
    pub url: String,
    pub verify: Verify,
    pub root_cert: Option<PathBuf>,
}

/// Takes libpq's TLS settings that tokio-postgres does not parse out of the URL's query:
/// `sslmode=verify-ca|verify-full` (passed on as `require`, the check done by our verifier)
/// and `sslrootcert` (with `require`, a root file makes it `verify-ca`, as in libpq). Refuses,
/// by name, those it cannot honour. Returns the URL left for the driver.
pub fn take_tls_params(url: &str) -> Result<UrlTls, String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(UrlTls {
            url: url.to_string(),
            verify: Verify::Nothing,
            root_cert: None,
        });
    };
    let mut kept: Vec<&str> = Vec::new();
    let (mut mode, mut root_cert, mut root_given) = (None::<String>, None, false);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslmode" => mode = Some(percent_decode(v)),
            "sslrootcert" => {
                root_given = true;
                root_cert = root_cert_path(&percent_decode(v));
            }
            "sslcert" | "sslkey" | "sslpassword" => {
                return Err(format!(
                    "{k}: client certificates are not supported; authenticate with a password"
                ))
            }
            "sslcrl" | "sslcrldir" => {
                return Err(format!(
                    "{k}: certificate revocation lists are not supported"
                ))
            }
            _ => kept.push(pair),
        }
    }
    let verify = match (mode.as_deref(), root_given) {
        (Some("verify-full"), _) => Verify::Full,
        (Some("verify-ca"), _) | (Some("require"), true) => Verify::Chain,
        (Some("require"), false) | (None | Some("prefer" | "disable"), false) => Verify::Nothing,
        (None | Some("prefer" | "disable"), true) => {
            return Err("sslrootcert needs sslmode=require, verify-ca or verify-full".into())
        }
        (Some("allow"), _) => {
            return Err(
                "sslmode=allow is not supported: use prefer (TLS when offered) or disable".into(),
            )
        }
        (Some(other), _) => {
            return Err(format!(
                "sslmode must be disable, prefer, require, verify-ca or verify-full, not `{other}`"
            ))
        }
    };
    let driver_mode = match mode.as_deref() {
        Some("verify-ca") | Some("verify-full") => Some("require"),
        m => m,
    };
    if let Some(m) = driver_mode {
        kept.push(match m {
            "disable" => "sslmode=disable",
            "prefer" => "sslmode=prefer",
            _ => "sslmode=require",
        });
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(UrlTls {
        url,
        verify,
        root_cert,
    })
}

/// `%XX` escapes of a URL query value (a path may hold them).
fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// === impl MakeTlsConnect ===

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            config: self.config.clone(),
            name: ServerName::try_from(domain)?.to_owned(),
        })
    }
}

/// One connection's handshake.
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        // Boxed once per connection (a reconnect, not a request).
        Box::pin(async move {
            let tls = connector.connect(self.name, stream).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS stream as tokio-postgres wants it.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

// === impl verifiers ===

/// `prefer`/`require`: any certificate, but the handshake must be signed by its key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: webpki's checks, except that the certificate may name another host.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
