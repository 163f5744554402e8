//! Test certificates made for each test: an authority and a certificate it
//! signed for `localhost` and 127.0.0.1 (and ::1), as PEM files in a
//! temporary directory, for the gateway, vsftpd and the clients; and
//! variants for the bad cases (expired, wrong name, self-signed).

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A certificate authority with the files of one server certificate.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    /// The authority's certificate (what clients trust).
    pub ca: PathBuf,
    /// The server's chain: its certificate, then the authority's.
    pub chain: PathBuf,
    /// The server's key.
    pub key: PathBuf,
    /// The chain and the key in one file (lftp, curl want either).
    pub combined: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        TestCa::with_leaf(&["localhost", "127.0.0.1", "::1"], None)
    }

    /// An authority and a leaf for `names`; `expired` makes the leaf's
    /// validity end in the past.
    pub fn with_leaf(names: &[&str], expired: Option<()>) -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("ftpx-certs")
            .tempdir()
            .unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("ftp-proxy test authority {} {serial}", std::process::id()),
        );
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca_pem = ca_cert.pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let mut ca = TestCa {
            ca: dir.path().join("ca.pem"),
            chain: dir.path().join("chain.pem"),
            key: dir.path().join("key.pem"),
            combined: dir.path().join("combined.pem"),
            dir,
            issuer,
            ca_pem,
        };
        std::fs::write(&ca.ca, &ca.ca_pem).unwrap();
        ca.issue(names, expired);
        ca
    }

    /// (Re)writes the server's chain and key for `names`.
    pub fn issue(&mut self, names: &[&str], expired: Option<()>) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired.is_some() {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        let chain = format!("{}{}", leaf.pem(), self.ca_pem);
        std::fs::write(&self.chain, &chain).unwrap();
        std::fs::write(&self.key, key.serialize_pem()).unwrap();
        std::fs::write(&self.combined, format!("{chain}{}", key.serialize_pem())).unwrap();
    }

    /// A rustls client configuration trusting this authority.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }

    pub fn path(p: &std::path::Path) -> &str {
        p.to_str().unwrap()
    }
}
