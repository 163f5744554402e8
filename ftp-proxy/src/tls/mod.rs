//! TLS for FTPS (RFC 4217), on rustls with the ring provider, TLS 1.2 and
//! 1.3 only.
//!
//! Owns: the rustls configurations built from the validated settings (the
//! gateway's certificate toward clients, the trust toward servers), one
//! resumption scope per FTP session on each side ([`ClientTls::session`],
//! [`ServerTls::session`]), the handshakes with their time bounds, whether
//! a data connection resumed its control connection's session, and the
//! names of what went wrong ([`TlsFailure`], a metric label).
//!
//! Resumption, and why it is scoped this way:
//! - Toward clients the gateway is the TLS server on every connection,
//!   control and data, passive and active (RFC 4217: the FTP client is the
//!   TLS client). A data connection may only resume the session of its own
//!   control connection (`--client-tls-reuse required` checks it: it stops
//!   data-connection theft, as vsftpd's `require_ssl_reuse`). Each FTP
//!   session has its own store; tickets in it can be used more than once
//!   (curl, lftp and Python present the control connection's ticket on
//!   every data connection; OpenSSL servers allow it, rustls's own cache
//!   would not); a data connection's new tickets are kept only if that
//!   connection itself resumed, so a refused thief gains nothing. Upload
//!   data connections get no TLS 1.3 tickets: clients never read them, and
//!   a close with unread data resets the connection and truncates the
//!   upload (seen with curl and lftp).
//! - Toward servers the gateway is the TLS client; each FTP session has its
//!   own store of the server's sessions. Servers may require every data
//!   connection to resume the control connection's session (vsftpd's
//!   `require_ssl_reuse=YES`, ProFTPD's default). A TLS 1.2 session is
//!   resumed any number of times; a TLS 1.3 ticket only once by a rustls
//!   client, so each data connection needs a new ticket from the one
//!   before (vsftpd sends one on every data connection; ProFTPD 1.3.8 on
//!   a download's but not on an upload's: its tickets run out after two
//!   uploads in a row). So by default servers are offered TLS 1.2 only when their
//!   data connections may be protected ([`ServerTlsMaxVersion`]); with
//!   `--server-tls-max-version 1.3` the relay still reads every server
//!   data connection to its end, so that each transfer that brings a
//!   ticket leaves it to its successor.
//!
//! Not here: reading certificate files (`config` does, and hands over
//! DER), when to handshake (`session`), moving bytes (`relay`).

mod store;

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, HandshakeKind, ProtocolVersion,
    RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::protocol::Side;
pub(crate) use store::{ClientSessionTls, DataAcceptor};

/// The one crypto provider: ring. Every configuration is built from it, so
/// a dependency that compiles in another provider cannot make rustls pick
/// one at run time (it would panic).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 and 1.2, nothing older (the ring provider has no CBC suites).
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// TLS toward clients on the control connection (`--client-tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTlsMode {
    /// `AUTH` is refused (502); FEAT announces no TLS.
    Off,
    /// `AUTH TLS` offered; plain sessions allowed.
    Optional,
    /// `USER` before `AUTH TLS` gets 530.
    Required,
}

/// Protection of client data connections (`--client-data-tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientDataTls {
    /// The client chooses with `PROT`.
    #[default]
    Optional,
    /// `PROT C` is refused and a transfer without `PROT P` gets 521.
    Required,
}

/// Whether client data connections must resume the control connection's
/// TLS session (`--client-tls-reuse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsReuse {
    /// Any handshake is accepted.
    #[default]
    Off,
    /// A data connection that does not resume is refused (425).
    Required,
}

/// TLS toward the server (`--server-tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerTlsMode {
    /// Plain FTP.
    #[default]
    Off,
    /// `AUTH TLS` after the banner (RFC 4217).
    Explicit,
    /// TLS from the first byte (port 990 style).
    Implicit,
}

/// Protection of server data connections (`--server-data-tls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerDataTls {
    /// As the client's `PROT` says.
    Client,
    /// Always protected (`PROT P` toward the server), whatever the client.
    #[default]
    Required,
    /// Never protected.
    Clear,
}

/// The highest TLS version offered to servers (`--server-tls-max-version`).
///
/// Data connections toward a server resume its control connection's
/// session (servers may require it: vsftpd's `require_ssl_reuse`, ProFTPD's
/// default `TLSOptions`). A TLS 1.2 session can be resumed any number of
/// times; a TLS 1.3 ticket once by a rustls client, so with 1.3 every data
/// connection needs a ticket of its own, sent on an earlier connection:
/// ProFTPD 1.3.8 sends none on an upload's data connection, so its two
/// first tickets run out after two uploads in a row and the next data
/// connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerTlsMaxVersion {
    /// TLS 1.2 when server data connections may be protected
    /// (`--server-data-tls required` or `client`), else as `1.3`.
    #[default]
    Auto,
    /// TLS 1.2 only.
    Tls12,
    /// TLS 1.3 or 1.2, as the server prefers.
    Tls13,
}

impl ServerTlsMaxVersion {
    /// Whether only TLS 1.2 is offered, server data connections being
    /// protected as `data` says.
    pub fn tls12_only(self, data: ServerDataTls) -> bool {
        match self {
            ServerTlsMaxVersion::Auto => data != ServerDataTls::Clear,
            ServerTlsMaxVersion::Tls12 => true,
            ServerTlsMaxVersion::Tls13 => false,
        }
    }
}

/// Whether a connection is protected (the `client` and `server` labels of
/// `sessions_total` and `transfers_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Clear text.
    Plain,
    /// TLS.
    Tls,
}

impl Protection {
    /// Both.
    pub const ALL: [Protection; 2] = [Protection::Plain, Protection::Tls];

    /// `Tls` when `protected`.
    pub fn of(protected: bool) -> Protection {
        if protected {
            Protection::Tls
        } else {
            Protection::Plain
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Protection::Plain => "plain",
            Protection::Tls => "tls",
        }
    }
}

/// Why a TLS handshake failed, as a metric label (`tls_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// The peer did not speak TLS (a plain client on the implicit port,
    /// plain text after `AUTH TLS`).
    NotTls,
    /// The server's certificate has expired (or is not valid yet).
    CertificateExpired,
    /// The server's certificate is not for the name the gateway expected.
    CertificateName,
    /// The server's certificate is not signed by a trusted authority.
    CertificateIssuer,
    /// The server's certificate is bad in another way.
    Certificate,
    /// No common version, cipher suite or group.
    Incompatible,
    /// The peer sent an alert.
    Alert,
    /// The peer asked for a renegotiation (TLS 1.2), which is refused.
    Renegotiation,
    /// The handshake did not finish in time.
    Timeout,
    /// A data connection did not resume its control connection's session,
    /// and `--client-tls-reuse required` asks that it does.
    NotResumed,
    /// The connection failed or closed during the handshake, or another
    /// protocol error.
    Other,
}

impl TlsFailure {
    /// Every failure.
    pub const ALL: [TlsFailure; 11] = [
        TlsFailure::NotTls,
        TlsFailure::CertificateExpired,
        TlsFailure::CertificateName,
        TlsFailure::CertificateIssuer,
        TlsFailure::Certificate,
        TlsFailure::Incompatible,
        TlsFailure::Alert,
        TlsFailure::Renegotiation,
        TlsFailure::Timeout,
        TlsFailure::NotResumed,
        TlsFailure::Other,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::NotTls => "not_tls",
            TlsFailure::CertificateExpired => "certificate_expired",
            TlsFailure::CertificateName => "certificate_name",
            TlsFailure::CertificateIssuer => "certificate_issuer",
            TlsFailure::Certificate => "certificate",
            TlsFailure::Incompatible => "incompatible",
            TlsFailure::Alert => "alert",
            TlsFailure::Renegotiation => "renegotiation",
            TlsFailure::Timeout => "timeout",
            TlsFailure::NotResumed => "not_resumed",
            TlsFailure::Other => "other",
        }
    }

    /// What an I/O error from a handshake (tokio-rustls wraps rustls's
    /// errors in `io::Error`) is called.
    fn of(error: &io::Error) -> TlsFailure {
        let Some(tls) = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return TlsFailure::Other;
        };
        match tls {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => TlsFailure::CertificateExpired,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => TlsFailure::CertificateName,
                // A signature that does not verify: signed by another
                // authority than the one of that name the gateway trusts.
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    TlsFailure::CertificateIssuer
                }
                _ => TlsFailure::Certificate,
            },
            rustls::Error::InvalidMessage(_) => TlsFailure::NotTls,
            rustls::Error::PeerIncompatible(_) => TlsFailure::Incompatible,
            rustls::Error::AlertReceived(_) => TlsFailure::Alert,
            rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::TooManyRenegotiationRequests) => {
                TlsFailure::Renegotiation
            }
            _ => TlsFailure::Other,
        }
    }
}

/// A handshake that failed: which side, what kind, and the detail.
#[derive(Debug, Clone, thiserror::Error)]
#[error("TLS with the {} failed ({}): {detail}", side.label(), failure.label())]
pub struct TlsError {
    /// Toward whom.
    pub side: Side,
    /// What kind of failure.
    pub failure: TlsFailure,
    /// The detail (rustls's message, or what timed out).
    pub detail: String,
}

impl TlsError {
    fn io(side: Side, error: &io::Error) -> TlsError {
        TlsError {
            side,
            failure: TlsFailure::of(error),
            detail: error.to_string(),
        }
    }

    fn timeout(side: Side, timeout: Duration) -> TlsError {
        TlsError {
            side,
            failure: TlsFailure::Timeout,
            detail: format!("no handshake within {timeout:?}"),
        }
    }
}

/// The negotiated protocol version (`tls_versions_total{version}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

impl TlsVersion {
    /// Both.
    pub const ALL: [TlsVersion; 2] = [TlsVersion::Tls12, TlsVersion::Tls13];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }

    fn of(version: Option<ProtocolVersion>) -> Option<TlsVersion> {
        match version? {
            ProtocolVersion::TLSv1_3 => Some(TlsVersion::Tls13),
            ProtocolVersion::TLSv1_2 => Some(TlsVersion::Tls12),
            _ => None,
        }
    }
}

/// What a finished handshake was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    /// The version negotiated.
    pub version: Option<TlsVersion>,
    /// Whether a previous session was resumed.
    pub resumed: bool,
}

impl Handshake {
    fn of(common: &rustls::CommonState) -> Handshake {
        Handshake {
            version: TlsVersion::of(common.protocol_version()),
            resumed: matches!(common.handshake_kind(), Some(HandshakeKind::Resumed)),
        }
    }
}

/// Why TLS settings could not be built from what was configured.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The certificate chain is empty.
    #[error("the certificate file holds no certificate")]
    NoCertificate,
    /// rustls refused the key or the pair (a key that does not match the
    /// certificate, an unsupported key type).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// No trusted authority to verify servers with.
    #[error("no trusted certificate authority")]
    NoRoots,
}

/// Always the gateway's one certificate (no SNI-based choice).
#[derive(Debug)]
struct OneCertificate(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCertificate {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The gateway toward its clients: its certificate, the base server
/// configuration every FTP session's configurations are cloned from.
#[derive(Clone)]
pub struct ClientTls {
    base: Arc<ServerConfig>,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("ClientTls")
            .field("chain_len", &self.certified.cert.len())
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &ClientTls) -> bool {
        self.certified.cert == other.certified.cert
    }
}

impl Eq for ClientTls {}

impl ClientTls {
    /// From a certificate chain (end entity first) and its key: checks
    /// that they belong together.
    ///
    /// # Errors
    /// [`TlsSetupError`] for an empty chain, an unusable key or a key that
    /// does not match the certificate.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<ClientTls, TlsSetupError> {
        if chain.is_empty() {
            return Err(TlsSetupError::NoCertificate);
        }
        let provider = provider();
        let certified = Arc::new(CertifiedKey::from_der(chain, key, &provider)?);
        let mut base = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(VERSIONS)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneCertificate(Arc::clone(&certified))));
        // No 0-RTT: tickets are reusable within an FTP session, which is
        // only safe without early data (RFC 8446 §8).
        base.max_early_data_size = 0;
        Ok(ClientTls {
            base: Arc::new(base),
            certified,
        })
    }

    /// The TLS state of one FTP session: its own resumption store.
    pub(crate) fn session(&self) -> ClientSessionTls {
        ClientSessionTls::new(&self.base)
    }
}

/// Accepts any server certificate: `--server-tls-insecure`. Signatures are
/// still checked (the handshake proves possession of the key), the chain
/// and the name are not.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
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

/// How the gateway checks servers' certificates.
#[derive(Clone)]
pub enum ServerTrust {
    /// Against these authorities (`--server-ca`, or the system's).
    Roots(Arc<RootCertStore>),
    /// Not at all (`--server-tls-insecure`).
    Insecure,
}

impl fmt::Debug for ServerTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerTrust::Roots(roots) => write!(f, "Roots({} authorities)", roots.len()),
            ServerTrust::Insecure => f.write_str("Insecure"),
        }
    }
}

impl PartialEq for ServerTrust {
    fn eq(&self, other: &ServerTrust) -> bool {
        match (self, other) {
            (ServerTrust::Roots(a), ServerTrust::Roots(b)) => a.roots == b.roots,
            (ServerTrust::Insecure, ServerTrust::Insecure) => true,
            _ => false,
        }
    }
}

impl Eq for ServerTrust {}

/// The gateway toward its server: trust and the base client configuration.
#[derive(Clone)]
pub struct ServerTls {
    base: Arc<ClientConfig>,
    trust: ServerTrust,
    tls12_only: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("trust", &self.trust)
            .field("tls12_only", &self.tls12_only)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &ServerTls) -> bool {
        self.trust == other.trust && self.tls12_only == other.tls12_only
    }
}

impl Eq for ServerTls {}

impl ServerTls {
    /// A client configuration that trusts as given, offering TLS 1.2 only
    /// when `tls12_only` (see [`ServerTlsMaxVersion`]), else 1.3 and 1.2.
    ///
    /// # Errors
    /// [`TlsSetupError::NoRoots`] for an empty set of authorities.
    pub fn new(trust: ServerTrust, tls12_only: bool) -> Result<ServerTls, TlsSetupError> {
        let provider = provider();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            VERSIONS
        };
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)?;
        let base = match &trust {
            ServerTrust::Roots(roots) if roots.is_empty() => return Err(TlsSetupError::NoRoots),
            ServerTrust::Roots(roots) => builder
                .with_root_certificates(Arc::clone(roots))
                .with_no_client_auth(),
            ServerTrust::Insecure => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth(),
        };
        Ok(ServerTls {
            base: Arc::new(base),
            trust,
            tls12_only,
        })
    }

    /// A configuration for one FTP session: its own store of the server's
    /// sessions, shared by the control and data connections.
    pub(crate) fn session(&self) -> Arc<ClientConfig> {
        let mut config = (*self.base).clone();
        // 16 sessions per server name; TLS 1.2 sessions are reusable, TLS
        // 1.3 tickets are used once each (see [`ServerTlsMaxVersion`]).
        config.resumption = rustls::client::Resumption::in_memory_sessions(16);
        Arc::new(config)
    }
}

/// Accepts a TLS connection as its server within `timeout`.
///
/// # Errors
/// [`TlsError`] naming the client side.
pub(crate) async fn accept<IO>(
    config: Arc<ServerConfig>,
    stream: IO,
    timeout: Duration,
) -> Result<(tokio_rustls::server::TlsStream<IO>, Handshake), TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let handshake = Handshake::of(tls.get_ref().1);
            Ok((tls, handshake))
        }
        Ok(Err(e)) => Err(TlsError::io(Side::Client, &e)),
        Err(_) => Err(TlsError::timeout(Side::Client, timeout)),
    }
}

/// Connects as a TLS client to `name` within `timeout`.
///
/// # Errors
/// [`TlsError`] naming the server side.
pub(crate) async fn connect<IO>(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    stream: IO,
    timeout: Duration,
) -> Result<(tokio_rustls::client::TlsStream<IO>, Handshake), TlsError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let connector = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(timeout, connector.connect(name, stream)).await {
        Ok(Ok(tls)) => {
            let handshake = Handshake::of(tls.get_ref().1);
            Ok((tls, handshake))
        }
        Ok(Err(e)) => Err(TlsError::io(Side::Server, &e)),
        Err(_) => Err(TlsError::timeout(Side::Server, timeout)),
    }
}

/// The name to verify a server's certificate against: a DNS name or an
/// address literal.
///
/// # Errors
/// A message when the text is neither.
pub fn server_name(text: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(text.to_owned()).map_err(|e| format!("{e}"))
}

/// A certificate authority and a certificate it signed for `localhost`
/// and 127.0.0.1, made for each test run.
#[cfg(test)]
pub(crate) mod test_certs {
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::{ClientTls, ServerTls, ServerTrust};

    /// The authority and the leaf.
    pub(crate) struct TestCerts {
        pub(crate) ca: CertificateDer<'static>,
        pub(crate) chain: Vec<CertificateDer<'static>>,
        pub(crate) key: PrivatePkcs8KeyDer<'static>,
    }

    impl TestCerts {
        pub(crate) fn new() -> TestCerts {
            let ca_key = KeyPair::generate().unwrap();
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let issuer = Issuer::new(ca_params, ca_key);
            let leaf_key = KeyPair::generate().unwrap();
            let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap()
                .signed_by(&leaf_key, &issuer)
                .unwrap();
            TestCerts {
                ca: ca.der().clone(),
                chain: vec![leaf.der().clone(), ca.der().clone()],
                key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
            }
        }

        /// The gateway toward clients, with this certificate.
        pub(crate) fn client_side(&self) -> ClientTls {
            ClientTls::new(
                self.chain.clone(),
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )
            .unwrap()
        }

        /// The gateway toward servers, trusting this authority.
        pub(crate) fn server_side(&self) -> ServerTls {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            ServerTls::new(ServerTrust::Roots(Arc::new(roots)), false).unwrap()
        }
    }
}
