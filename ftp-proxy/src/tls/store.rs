//! The resumption store of one FTP session toward its client (the gateway
//! is the TLS server): what the control connection issued, kept for the
//! session's life; what a resumed data connection issued, kept (bounded);
//! what a data connection that did not resume issued, dropped. Lookups
//! never consume: a client may resume the same session on every data
//! connection, as it may with an OpenSSL server.
//!
//! Not here: deciding whether a data connection must resume (the session,
//! from `--client-tls-reuse`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use rustls::server::StoresServerSessions;

/// Sessions the control connection may issue (TLS 1.2 and its 1.3 tickets).
const PINNED: usize = 16;
/// Sessions kept from resumed data connections, newest first out last.
const RECENT: usize = 32;
/// TLS 1.3 tickets issued on the control connection: enough for clients
/// that use each once (rustls clients keep 8 per server) to resume a few
/// uploads in a row, which issue none.
const CONTROL_TICKETS: usize = 4;
/// TLS 1.3 tickets issued on a download data connection (read to its end
/// by the client, so tickets are harmless and replenish single-use clients).
const DOWNLOAD_TICKETS: usize = 2;

type Entry = (Vec<u8>, Vec<u8>);

#[derive(Debug, Default)]
struct SessionCache {
    pinned: Mutex<Vec<Entry>>,
    recent: Mutex<VecDeque<Entry>>,
}

impl SessionCache {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        fn find<'a>(mut entries: impl Iterator<Item = &'a Entry>, key: &[u8]) -> Option<Vec<u8>> {
            entries
                .find(|(k, _)| k.as_slice() == key)
                .map(|(_, v)| v.clone())
        }
        if let Ok(pinned) = self.pinned.lock()
            && let Some(value) = find(pinned.iter(), key)
        {
            return Some(value);
        }
        let recent = self.recent.lock().ok()?;
        find(recent.iter(), key)
    }

    fn keep(&self, entries: Vec<Entry>) {
        if let Ok(mut recent) = self.recent.lock() {
            for entry in entries {
                recent.push_back(entry);
                while recent.len() > RECENT {
                    recent.pop_front();
                }
            }
        }
    }
}

/// The control connection's view: what it issues is kept for good.
#[derive(Debug)]
struct ControlStore(Arc<SessionCache>);

impl StoresServerSessions for ControlStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        match self.0.pinned.lock() {
            Ok(mut pinned) if pinned.len() < PINNED => {
                pinned.push((key, value));
                true
            }
            _ => false,
        }
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// A data connection's view: what it issues waits until the connection is
/// known to have resumed.
#[derive(Debug)]
struct DataStore {
    cache: Arc<SessionCache>,
    staged: Mutex<Vec<Entry>>,
}

impl StoresServerSessions for DataStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        match self.staged.lock() {
            Ok(mut staged) if staged.len() < PINNED => {
                staged.push((key, value));
                true
            }
            _ => false,
        }
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.cache.get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.cache.get(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// One FTP session's TLS toward its client.
#[derive(Debug)]
pub(crate) struct ClientSessionTls {
    base: Arc<ServerConfig>,
    cache: Arc<SessionCache>,
}

impl ClientSessionTls {
    pub(super) fn new(base: &Arc<ServerConfig>) -> ClientSessionTls {
        ClientSessionTls {
            base: Arc::clone(base),
            cache: Arc::new(SessionCache::default()),
        }
    }

    /// The configuration of the control connection.
    pub(crate) fn control(&self) -> Arc<ServerConfig> {
        let mut config = (*self.base).clone();
        config.session_storage = Arc::new(ControlStore(Arc::clone(&self.cache)));
        config.send_tls13_tickets = CONTROL_TICKETS;
        Arc::new(config)
    }

    /// A data connection's acceptor (uploads get no TLS 1.3 ticket).
    pub(crate) fn data(&self, upload: bool) -> DataAcceptor {
        let store = Arc::new(DataStore {
            cache: Arc::clone(&self.cache),
            staged: Mutex::new(Vec::new()),
        });
        let mut config = (*self.base).clone();
        config.session_storage = Arc::clone(&store) as Arc<dyn StoresServerSessions>;
        config.send_tls13_tickets = if upload { 0 } else { DOWNLOAD_TICKETS };
        DataAcceptor {
            config: Arc::new(config),
            store,
        }
    }
}

/// The server configuration of one data connection, and what it issued.
#[derive(Debug)]
pub(crate) struct DataAcceptor {
    config: Arc<ServerConfig>,
    store: Arc<DataStore>,
}

impl DataAcceptor {
    /// The configuration to accept with.
    pub(crate) fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config)
    }

    /// After the handshake: the sessions it issued are kept only if it
    /// resumed the FTP session's own (a thief that was refused gains no
    /// ticket to come back with).
    pub(crate) fn finish(&self, resumed: bool) {
        let staged = self
            .store
            .staged
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        if resumed {
            self.store.cache.keep(staged);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_never_consume_and_staging_needs_a_resumption() {
        let cache = Arc::new(SessionCache::default());
        let control = ControlStore(Arc::clone(&cache));
        assert!(control.put(b"c".to_vec(), b"1".to_vec()));
        for _ in 0..3 {
            assert_eq!(control.take(b"c"), Some(b"1".to_vec()));
        }
        let data = DataStore {
            cache: Arc::clone(&cache),
            staged: Mutex::new(Vec::new()),
        };
        assert_eq!(
            data.take(b"c"),
            Some(b"1".to_vec()),
            "resumes the control session"
        );
        assert!(data.put(b"d".to_vec(), b"2".to_vec()));
        assert_eq!(data.get(b"d"), None, "staged, not usable yet");
        let acceptor = DataAcceptor {
            config: Arc::new(
                ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_protocol_versions(super::super::VERSIONS)
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(NoCertificate)),
            ),
            store: Arc::new(data),
        };
        acceptor.finish(false);
        assert_eq!(
            cache.get(b"d"),
            None,
            "a full handshake's tickets are dropped"
        );
        acceptor.store.put(b"e".to_vec(), b"3".to_vec());
        acceptor.finish(true);
        assert_eq!(cache.get(b"e"), Some(b"3".to_vec()));
    }

    #[test]
    fn the_stores_are_bounded() {
        let cache = Arc::new(SessionCache::default());
        let control = ControlStore(Arc::clone(&cache));
        for i in 0..100u8 {
            control.put(vec![i], vec![i]);
        }
        assert_eq!(cache.pinned.lock().unwrap().len(), PINNED);
        cache.keep((0..100u8).map(|i| (vec![i, 1], vec![i])).collect());
        assert_eq!(cache.recent.lock().unwrap().len(), RECENT);
    }

    #[derive(Debug)]
    struct NoCertificate;

    impl rustls::server::ResolvesServerCert for NoCertificate {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
    }
}
