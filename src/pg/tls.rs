//! Where and how to connect to Postgres: a parsed URL plus its TLS settings (rustls).
//!
//! The URL's `sslmode` decides, as in libpq:
//!
//! | `sslmode` | Encryption | Server certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (the default) | when the server offers it | not checked |
//! | `require` | always | not checked (with `sslrootcert`: as `verify-ca`) |
//! | `verify-ca` | always | signed by a trusted CA |
//! | `verify-full` | always | signed by a trusted CA and issued for the host |
//!
//! Trusted CAs are those of the PEM file named by `sslrootcert` when it is given (only
//! those), otherwise the system's. A CA file that cannot be read or holds no certificate is
//! an error, never a silent downgrade.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature_with_raw_key};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::ProcessError;

/// The TLS connector every proclog connection uses: rustls, configured by the URL.
///
/// tokio-postgres asks for a connector even where TLS is never attempted (a Unix socket, a
/// `hostaddr` without a host name) and passes an empty host name then; rustls refuses an
/// empty name, so a placeholder is given instead. No handshake ever uses it: without a host
/// name tokio-postgres does not start TLS (and refuses `require` and stricter modes).
#[derive(Clone)]
pub struct TlsConnector(MakeRustlsConnect);

impl<S> MakeTlsConnect<S> for TlsConnector
where
    MakeRustlsConnect: MakeTlsConnect<S>,
{
    type Stream = <MakeRustlsConnect as MakeTlsConnect<S>>::Stream;
    type TlsConnect = <MakeRustlsConnect as MakeTlsConnect<S>>::TlsConnect;
    type Error = <MakeRustlsConnect as MakeTlsConnect<S>>::Error;

    fn make_tls_connect(&mut self, hostname: &str) -> Result<Self::TlsConnect, Self::Error> {
        let hostname = if hostname.is_empty() {
            "no-host-name.invalid"
        } else {
            hostname
        };
        self.0.make_tls_connect(hostname)
    }
}

/// The `sslmode` of a database URL.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it, certificate unchecked (libpq's default).
    #[default]
    Prefer,
    /// TLS always, certificate unchecked.
    Require,
    /// TLS always, certificate chain checked against the trusted CAs.
    VerifyCa,
    /// TLS always, chain checked and the certificate issued for the host connected to.
    VerifyFull,
}

impl TlsMode {
    /// The mode as `sslmode` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for TlsMode {
    type Err = ProcessError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "disable" => Ok(Self::Disable),
            // libpq's `allow` tries plain first; proclog treats it like `prefer`.
            "allow" | "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            other => Err(ProcessError::InvalidInput(format!(
                "bad database url: sslmode {other:?} is not one of disable, allow, prefer, \
                 require, verify-ca, verify-full"
            ))),
        }
    }
}

/// A database to connect to: the client configuration and the TLS connector its `sslmode`
/// and `sslrootcert` call for. Cheap to clone.
#[derive(Clone)]
pub struct DatabaseTarget {
    config: tokio_postgres::Config,
    tls: TlsConnector,
    mode: TlsMode,
}

impl std::fmt::Debug for DatabaseTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseTarget")
            .field("hosts", &self.config.get_hosts())
            .field("ports", &self.config.get_ports())
            .field("dbname", &self.config.get_dbname())
            .field("tls", &self.mode)
            .finish()
    }
}

impl DatabaseTarget {
    /// Parses a Postgres URL (`postgres://...?sslmode=verify-full&sslrootcert=/ca.pem`) or
    /// key=value string, with proclog's defaults: application name `proclog` unless one is
    /// given, TCP keepalives, a 10 s connect timeout. A bad URL, an unknown `sslmode` or an
    /// unreadable CA file is `InvalidInput`.
    pub fn parse(url: &str) -> Result<Self, ProcessError> {
        let (rest, tls_settings) = take_tls_settings(url)?;
        let mode = match &tls_settings.mode {
            Some(mode) => mode.parse()?,
            None => TlsMode::default(),
        };
        // `require` with a CA file checks the chain, as libpq does.
        let mode = match (mode, &tls_settings.root_cert) {
            (TlsMode::Require, Some(_)) => TlsMode::VerifyCa,
            (mode, _) => mode,
        };
        let mut config = tokio_postgres::Config::from_str(&rest)
            .map_err(|err| ProcessError::InvalidInput(format!("bad database url: {err}")))?;
        // Every sslmode was taken out above: one that tokio-postgres still finds was missed
        // (an unusual spelling), and must not be silently replaced by the default.
        if config.get_ssl_mode() != SslMode::Prefer && tls_settings.mode.is_none() {
            return Err(ProcessError::InvalidInput(
                "bad database url: its sslmode could not be read; write it as `sslmode=<mode>` \
                 in the query (URL) or as a key=value pair"
                    .into(),
            ));
        }
        config.ssl_mode(match mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        if config.get_application_name().is_none() {
            config.application_name("proclog");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let tls = TlsConnector(MakeRustlsConnect::new(client_tls_config(
            mode,
            tls_settings.root_cert.as_deref().map(Path::new),
        )?));
        Ok(Self { config, tls, mode })
    }

    /// The client configuration (without the TLS settings, which live in the connector).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The client configuration, to change (e.g. the application name).
    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    /// The TLS connector for [`tokio_postgres::Config::connect`] and pools.
    pub fn tls(&self) -> TlsConnector {
        self.tls.clone()
    }

    /// The effective `sslmode`.
    pub fn tls_mode(&self) -> TlsMode {
        self.mode
    }

    /// A warning when this target would send its password where an impostor could take it:
    /// a host that is not this machine with `sslmode` below `verify-ca` (`prefer` sends it in
    /// clear text to a server that declines TLS; `require` sends it to whoever answers,
    /// unverified). `None` for loopback, Unix sockets and verified TLS.
    pub fn transport_warning(&self) -> Option<String> {
        if matches!(self.mode, TlsMode::VerifyCa | TlsMode::VerifyFull)
            || self.config.get_password().is_none()
        {
            return None;
        }
        let remote = self.config.get_hosts().iter().any(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => {
                let bare = name.trim_start_matches('[').trim_end_matches(']');
                !(name == "localhost"
                    || bare
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback()))
            }
            _ => false,
        });
        remote.then(|| {
            format!(
                "sslmode={} sends the database password to a server whose certificate is not checked{}: use sslmode=verify-full with sslrootcert=<the server's CA> (or PROCLOG_DATABASE_CA_FILE)",
                self.mode.as_str(),
                if self.mode == TlsMode::Require { "" } else { ", in clear text if it declines TLS" }
            )
        })
    }

    /// Opens one connection; the caller drives the returned connection future.
    pub async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<
                tokio_postgres::Socket,
                <TlsConnector as MakeTlsConnect<tokio_postgres::Socket>>::Stream,
            >,
        ),
        tokio_postgres::Error,
    > {
        self.config.connect(self.tls()).await
    }
}

/// Adds `sslrootcert=<ca_file>` to `url` unless it names one already (URL or key=value
/// form). How `--database-ca-file` reaches every connection made from the URL.
pub fn with_root_cert(url: &str, ca_file: &Path) -> Result<String, ProcessError> {
    let (_, settings) = take_tls_settings(url)?;
    if settings.root_cert.is_some() {
        return Ok(url.to_owned());
    }
    let path = ca_file.to_str().ok_or_else(|| {
        ProcessError::InvalidInput(format!("CA file path {ca_file:?} is not UTF-8"))
    })?;
    if is_url(url) {
        let separator = if query_start(url).is_some() { '&' } else { '?' };
        Ok(format!(
            "{url}{separator}sslrootcert={}",
            percent_encode(path)
        ))
    } else {
        Ok(format!(
            "{url} sslrootcert='{}'",
            path.replace('\\', "\\\\").replace('\'', "\\'")
        ))
    }
}

/// The TLS parameters tokio-postgres does not know (`verify-ca`, `verify-full`,
/// `sslrootcert`), taken out of the URL.
#[derive(Default)]
struct TlsSettings {
    mode: Option<String>,
    root_cert: Option<String>,
}

fn is_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Where the query (`?...`) of a URL starts: at the first `?` after the credentials (as in
/// tokio-postgres, they run to the first `@`, and a password may hold a `?`).
fn query_start(url: &str) -> Option<usize> {
    let after_scheme = url.find("://").map_or(0, |at| at + 3);
    let host_from = url[after_scheme..]
        .find('@')
        .map_or(after_scheme, |at| after_scheme + at + 1);
    url[host_from..].find('?').map(|at| host_from + at)
}

/// `url` fit to print or log: its password (in the credentials, a `password=` query
/// parameter, or a `password=` key of the key=value form) replaced by `***`.
pub fn redacted(url: &str) -> String {
    if is_url(url) {
        let after_scheme = url.find("://").map_or(0, |at| at + 3);
        let mut out = url.to_owned();
        let query_at = query_start(url);
        if let Some(query_at) = query_at {
            let query: Vec<String> = url[query_at + 1..]
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            out = format!("{}?{}", &url[..query_at], query.join("&"));
        }
        let end = query_at.unwrap_or(url.len());
        if let Some(at) = url[after_scheme..end].rfind('@') {
            let credentials = &url[after_scheme..after_scheme + at];
            if let Some((user, _)) = credentials.split_once(':') {
                out = format!(
                    "{}{user}:***{}",
                    &url[..after_scheme],
                    &out[after_scheme + at..]
                );
            }
        }
        return out;
    }
    // key=value form: hide the value of `password` (quoted or not).
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(at) = rest.find("password") {
        let (before, after) = rest.split_at(at);
        out.push_str(before);
        let after_key = &after["password".len()..];
        let trimmed = after_key.trim_start();
        if !trimmed.starts_with('=') {
            out.push_str("password");
            rest = after_key;
            continue;
        }
        out.push_str("password=***");
        let value = trimmed[1..].trim_start();
        let skip = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            let close = quoted
                .char_indices()
                .find(|&(_, c)| {
                    let end = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    end
                })
                .map_or(quoted.len(), |(i, _)| i + 1);
            1 + close
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        rest = &value[skip.min(value.len())..];
    }
    out.push_str(rest);
    out
}

/// Splits `sslmode` and `sslrootcert` off `url`, returning the rest for tokio-postgres.
fn take_tls_settings(url: &str) -> Result<(String, TlsSettings), ProcessError> {
    let mut settings = TlsSettings::default();
    if is_url(url) {
        let Some(query_at) = query_start(url) else {
            return Ok((url.to_owned(), settings));
        };
        let (base, query) = (&url[..query_at], &url[query_at + 1..]);
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match percent_decode(key)?.as_str() {
                "sslmode" => settings.mode = Some(percent_decode(value)?),
                "sslrootcert" => settings.root_cert = Some(percent_decode(value)?),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, settings));
    }
    // key=value form: values may be single-quoted with backslash escapes.
    let mut kept = Vec::new();
    let mut chars = url.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ProcessError::InvalidInput(format!(
                "bad database url: expected `=` after {key:?}"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut raw = String::new();
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            raw.push(chars.next().unwrap_or('\''));
            let mut closed = false;
            while let Some(c) = chars.next() {
                raw.push(c);
                match c {
                    '\\' => {
                        if let Some(escaped) = chars.next() {
                            raw.push(escaped);
                            value.push(escaped);
                        }
                    }
                    '\'' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(ProcessError::InvalidInput(
                    "bad database url: unterminated quoted value".into(),
                ));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                raw.push(c);
                if c == '\\' {
                    // An escaped character (a space, a quote, a backslash) is part of the value.
                    if let Some(escaped) = chars.next() {
                        raw.push(escaped);
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        match key.as_str() {
            "sslmode" => settings.mode = Some(value),
            "sslrootcert" => settings.root_cert = Some(value),
            _ => kept.push(format!("{key}={raw}")),
        }
    }
    Ok((kept.join(" "), settings))
}

fn percent_decode(value: &str) -> Result<String, ProcessError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| {
                    ProcessError::InvalidInput("bad database url: bad percent-encoding".into())
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ProcessError::InvalidInput("bad database url: value is not UTF-8".into()))
}

fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"/-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration for `mode`, trusting `root_cert` (only) when given, else the
/// system's CAs.
fn client_tls_config(
    mode: TlsMode,
    root_cert: Option<&Path>,
) -> Result<ClientConfig, ProcessError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|err| ProcessError::InvalidInput(format!("TLS setup: {err}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => {
            Arc::new(UncheckedCertificate { provider })
        }
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            let roots = Arc::new(trusted_roots(root_cert)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|err| ProcessError::InvalidInput(format!("TLS setup: {err}")))?;
            if mode == TlsMode::VerifyCa {
                Arc::new(ChainOnly { inner: webpki })
            } else {
                webpki
            }
        }
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn trusted_roots(root_cert: Option<&Path>) -> Result<RootCertStore, ProcessError> {
    let mut roots = RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|err| {
                    ProcessError::InvalidInput(format!(
                        "cannot read the database CA file {}: {err}",
                        path.display()
                    ))
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ProcessError::InvalidInput(format!(
                    "the database CA file {} holds no usable certificate",
                    path.display()
                )));
            }
        }
        None => {
            let system = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(system.certs);
            if roots.is_empty() {
                return Err(ProcessError::InvalidInput(
                    "sslmode verify-ca/verify-full: no system CA certificates found; name a CA \
                     file with sslrootcert= or --database-ca-file"
                        .into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// `verify-ca`: the chain must lead to a trusted CA; the host name is not checked.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
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
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `prefer` / `require`: encryption without authentication of the server (libpq's meaning
/// of these modes); the handshake's signatures are still verified, with the public key of
/// the certificate the server sent.
///
/// The key is read from the certificate with `x509-cert`, not webpki, because webpki reads
/// version 3 certificates only, and servers present others: `CREATE EXTENSION citus` makes
/// a self-signed X.509 version 1 certificate, which libpq accepts under these modes.
#[derive(Debug)]
struct UncheckedCertificate {
    provider: Arc<CryptoProvider>,
}

/// The DER `SubjectPublicKeyInfo` of `cert`, whatever its X.509 version.
fn subject_public_key(cert: &CertificateDer<'_>) -> Result<Vec<u8>, rustls::Error> {
    use x509_cert::der::{Decode, Encode};
    let bad_encoding = |_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
    let cert = x509_cert::Certificate::from_der(cert.as_ref()).map_err(bad_encoding)?;
    cert.tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(bad_encoding)
}

fn bad_signature(_: webpki::Error) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::BadSignature)
}

impl ServerCertVerifier for UncheckedCertificate {
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

    /// As rustls's `verify_tls12_signature`: every algorithm the scheme maps to is tried.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let spki = SubjectPublicKeyInfoDer::from(subject_public_key(cert)?);
        let key = webpki::RawPublicKeyEntity::try_from(&spki).map_err(bad_signature)?;
        let candidates = self
            .provider
            .signature_verification_algorithms
            .mapping
            .iter()
            .filter(|(scheme, _)| *scheme == dss.scheme)
            .flat_map(|(_, algorithms)| algorithms.iter());
        for algorithm in candidates {
            match key.verify_signature(*algorithm, message, dss.signature()) {
                Ok(()) => return Ok(HandshakeSignatureValid::assertion()),
                Err(webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)) => {}
                Err(err) => return Err(bad_signature(err)),
            }
        }
        Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let spki = SubjectPublicKeyInfoDer::from(subject_public_key(cert)?);
        verify_tls13_signature_with_raw_key(
            message,
            &spki,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_that_is_not_der_has_no_key_to_check_with() {
        let err = subject_public_key(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]));
        assert!(
            matches!(
                err,
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::BadEncoding
                ))
            ),
            "{err:?}"
        );
    }

    #[test]
    fn tls_settings_are_taken_out_of_urls() {
        let (rest, settings) = take_tls_settings(
            "postgres://u:p@h:5/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(settings.mode.as_deref(), Some("verify-full"));
        assert_eq!(settings.root_cert.as_deref(), Some("/etc/ca.pem"));
        let (rest, settings) = take_tls_settings("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(settings.mode.as_deref(), Some("disable"));
    }

    #[test]
    fn tls_settings_are_taken_out_of_key_value_strings() {
        let (rest, settings) = take_tls_settings(
            "host=h password='a b\\'c' sslmode=verify-ca sslrootcert='/my ca.pem' dbname=d",
        )
        .unwrap();
        assert_eq!(rest, "host=h password='a b\\'c' dbname=d");
        assert_eq!(settings.mode.as_deref(), Some("verify-ca"));
        assert_eq!(settings.root_cert.as_deref(), Some("/my ca.pem"));
        assert!(take_tls_settings("host=h sslmode").is_err());
        assert!(take_tls_settings("host='h").is_err());
    }

    #[test]
    fn a_password_sent_unverified_to_another_host_is_warned_about() {
        let warn = |url: &str| DatabaseTarget::parse(url).unwrap().transport_warning();
        assert!(warn("postgres://app:pw@db.example/app").is_some_and(|w| w.contains("clear text")));
        assert!(
            warn("postgres://app:pw@db.example/app?sslmode=require")
                .is_some_and(|w| w.contains("verify-full"))
        );
        assert!(warn("postgres://app:pw@127.0.0.1/app").is_none());
        assert!(warn("postgres://app:pw@localhost/app?sslmode=disable").is_none());
        assert!(
            warn("postgres://app@db.example/app").is_none(),
            "no password to give away"
        );
    }

    #[test]
    fn passwords_are_redacted_for_printing() {
        for (url, printed) in [
            (
                "postgres://app:s3cr?t@db:5432/app?sslmode=verify-full",
                "postgres://app:***@db:5432/app?sslmode=verify-full",
            ),
            (
                "postgres://app@db/app?password=s3cret&x=1",
                "postgres://app@db/app?password=***&x=1",
            ),
            ("postgres://db/app", "postgres://db/app"),
            (
                "host=db password='a b\\'c' user=app",
                "host=db password=*** user=app",
            ),
            (
                "host=db password = plain user=app",
                "host=db password=*** user=app",
            ),
        ] {
            assert_eq!(redacted(url), printed, "{url}");
            assert!(!redacted(url).contains("s3c"));
        }
    }

    #[test]
    fn a_question_mark_in_the_password_does_not_hide_the_query() {
        let (rest, settings) =
            take_tls_settings("postgres://u:pa?ss@db/app?sslmode=require&connect_timeout=3")
                .unwrap();
        assert_eq!(rest, "postgres://u:pa?ss@db/app?connect_timeout=3");
        assert_eq!(settings.mode.as_deref(), Some("require"));
        let target = DatabaseTarget::parse("postgres://u:pa?ss@db/app?sslmode=require").unwrap();
        assert_eq!(target.tls_mode(), TlsMode::Require);
        assert_eq!(target.config().get_password(), Some(&b"pa?ss"[..]));
        // A percent-encoded key is the same key.
        let target = DatabaseTarget::parse("postgres://db/app?ssl%6Dode=require").unwrap();
        assert_eq!(target.tls_mode(), TlsMode::Require);
    }

    #[test]
    fn escaped_characters_stay_in_unquoted_values() {
        let (rest, settings) =
            take_tls_settings("password=x\\ sslmode=disable host=h sslmode=verify-full").unwrap();
        assert_eq!(rest, "password=x\\ sslmode=disable host=h");
        assert_eq!(settings.mode.as_deref(), Some("verify-full"));
        let target = DatabaseTarget::parse("host=h password=abc\\ def").unwrap();
        assert_eq!(target.config().get_password(), Some(&b"abc def"[..]));
    }

    #[test]
    fn a_socket_url_needs_no_host_name_for_tls() {
        let target =
            DatabaseTarget::parse("host=/var/run/postgresql dbname=d sslmode=disable").unwrap();
        let mut tls = target.tls();
        assert!(
            MakeTlsConnect::<tokio_postgres::Socket>::make_tls_connect(&mut tls, "").is_ok(),
            "an empty host name (a Unix socket) must not fail the connector"
        );
    }

    #[test]
    fn a_root_cert_is_added_once() {
        let path = Path::new("/etc/proclog/ca file.pem");
        assert_eq!(
            with_root_cert("postgres://h/db", path).unwrap(),
            "postgres://h/db?sslrootcert=/etc/proclog/ca%20file.pem"
        );
        assert_eq!(
            with_root_cert("postgres://h/db?sslmode=require", path).unwrap(),
            "postgres://h/db?sslmode=require&sslrootcert=/etc/proclog/ca%20file.pem"
        );
        let named = "postgres://h/db?sslrootcert=/other.pem";
        assert_eq!(with_root_cert(named, path).unwrap(), named);
        let key_value = with_root_cert("host=h", path).unwrap();
        assert_eq!(key_value, "host=h sslrootcert='/etc/proclog/ca file.pem'");
        let (_, settings) = take_tls_settings(&key_value).unwrap();
        assert_eq!(
            settings.root_cert.as_deref(),
            Some("/etc/proclog/ca file.pem")
        );
    }

    #[test]
    fn modes_parse_and_bad_ones_are_refused() {
        let target = DatabaseTarget::parse("postgres://h/db").unwrap();
        assert_eq!(target.tls_mode(), TlsMode::Prefer);
        let target = DatabaseTarget::parse("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!(target.tls_mode(), TlsMode::Disable);
        assert_eq!(target.config().get_ssl_mode(), SslMode::Disable);
        let target = DatabaseTarget::parse("postgres://h/db?sslmode=require").unwrap();
        assert_eq!(target.config().get_ssl_mode(), SslMode::Require);
        match DatabaseTarget::parse("postgres://h/db?sslmode=verify-everything") {
            Err(ProcessError::InvalidInput(message)) => assert!(message.contains("sslmode")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unreadable_or_empty_ca_file_is_refused() {
        let missing = DatabaseTarget::parse(
            "postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        );
        match missing {
            Err(ProcessError::InvalidInput(message)) => {
                assert!(message.contains("/nonexistent/ca.pem"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        let dir = std::env::temp_dir().join(format!("proclog-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let url = format!(
            "postgres://h/db?sslmode=require&sslrootcert={}",
            empty.display()
        );
        match DatabaseTarget::parse(&url) {
            Err(ProcessError::InvalidInput(message)) => {
                assert!(message.contains("no usable certificate"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
