//! The servers behind the gateway: a pool of named FTP servers, which one a
//! new session goes to, whether each is up, and the PROXY protocol on both
//! sides of the gateway.
//!
//! Owns:
//! - the validated description of the pool ([`PoolSpec`]: named servers with
//!   weights, the balancing policy, the health policy), built by
//!   [`crate::config`];
//! - [`balance`]: pure selection of a server for a new session, per policy,
//!   with an exclude set for failover;
//! - [`health`]: the rise/fall state machine (pure) and the active FTP-level
//!   checker, one task per server;
//! - [`connect`]: one attempt at a server: connect, PROXY header, greeting
//!   (`120`s, `220`) within a deadline; for checks and sessions alike;
//! - [`routes`]: pure user → servers matching (`[[routes]]`, `user@server`,
//!   `unknown-users`);
//! - [`proxy_protocol`]: reading a PROXY v1/v2 header at the start of a
//!   client connection from a trusted peer, and encoding one for the server;
//! - [`Pool`]: the runtime pool the gateway holds across reloads: per-server
//!   state (up, sessions, connect failures), `pick`, passive failures, the
//!   checkers' lifetime.
//!
//! Not here: relaying the banner, failing over in a session, or reading
//! `USER` (the session does that, with `Pool::pick`, [`connect::greet`] and
//! [`routes::Routes::route`]); the metrics' names (`crate::metrics`).

pub mod balance;
pub mod connect;
pub mod health;
pub(crate) mod pool;
pub mod proxy_protocol;
pub mod routes;

use std::fmt;
use std::sync::Arc;

pub use balance::Balance;
pub use health::HealthPolicy;
pub(crate) use pool::Pool;

use crate::config::Upstream;

/// The name of a configured server: `[a-z0-9_-]{1,32}`, unique in the pool.
/// It is a metric label (`upstream_up{server}`), so it is bounded and comes
/// from the configuration only, never from a client.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerName(Arc<str>);

impl ServerName {
    /// Longest name.
    pub const MAX_LEN: usize = 32;

    /// Validates a name.
    ///
    /// # Errors
    /// A sentence saying what is wrong with it.
    pub fn new(name: &str) -> Result<ServerName, &'static str> {
        if name.is_empty() || name.len() > Self::MAX_LEN {
            return Err("must be 1 to 32 characters");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err("may hold only a-z, 0-9, _ and -");
        }
        Ok(ServerName(Arc::from(name)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A server's share of new sessions, relative to the others: 1 to 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Weight(u32);

impl Weight {
    /// The largest weight.
    pub const MAX: u32 = 1000;

    /// A weight; `None` outside 1..=1000.
    pub fn new(weight: u32) -> Option<Weight> {
        (1..=Self::MAX).contains(&weight).then_some(Weight(weight))
    }

    /// The value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for Weight {
    fn default() -> Weight {
        Weight(crate::config::defaults::SERVER_WEIGHT)
    }
}

/// One configured server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// Its name (metric label, `user@name`, routes).
    pub name: ServerName,
    /// Where it is; the name is resolved at each connect.
    pub address: Upstream,
    /// Its share of new sessions.
    pub weight: Weight,
}

/// Why a set of servers is not a pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolSpecError {
    /// No server at all.
    #[error("the pool has no server")]
    Empty,
    /// Two servers share a name.
    #[error("two servers are named {0}")]
    Duplicate(ServerName),
}

/// The validated pool: at least one server, names unique, in the order
/// configured (which breaks ties), and how they are checked: with a health
/// policy, servers are checked actively and sessions' failures count; with
/// none, every server is always up (as a server without `check` in
/// HAProxy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    servers: Vec<ServerSpec>,
    balance: Balance,
    health: Option<HealthPolicy>,
}

impl PoolSpec {
    /// A pool of `servers`.
    ///
    /// # Errors
    /// [`PoolSpecError`] for an empty list or a duplicate name.
    pub fn new(
        servers: Vec<ServerSpec>,
        balance: Balance,
        health: Option<HealthPolicy>,
    ) -> Result<PoolSpec, PoolSpecError> {
        if servers.is_empty() {
            return Err(PoolSpecError::Empty);
        }
        for (i, server) in servers.iter().enumerate() {
            if servers.iter().skip(i + 1).any(|s| s.name == server.name) {
                return Err(PoolSpecError::Duplicate(server.name.clone()));
            }
        }
        Ok(PoolSpec {
            servers,
            balance,
            health,
        })
    }

    /// The servers, in configuration order; never empty.
    pub fn servers(&self) -> &[ServerSpec] {
        &self.servers
    }

    /// The server named `name`.
    pub fn get(&self, name: &str) -> Option<&ServerSpec> {
        self.servers.iter().find(|s| s.name.as_str() == name)
    }

    /// The balancing policy.
    pub fn balance(&self) -> Balance {
        self.balance
    }

    /// The health policy; `None`: no checks, every server always up.
    pub fn health(&self) -> Option<HealthPolicy> {
        self.health
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        for good in ["a", "ftp-1", "eu_west_2", &"x".repeat(32)] {
            assert!(ServerName::new(good).is_ok(), "{good}");
        }
        for bad in ["", "A", "a b", "a.b", "é", &"x".repeat(33), "a@b"] {
            assert!(ServerName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn weights() {
        assert_eq!(Weight::new(0), None);
        assert_eq!(Weight::new(1001), None);
        assert_eq!(Weight::new(1000).map(Weight::get), Some(1000));
    }

    fn spec(name: &str) -> ServerSpec {
        ServerSpec {
            name: ServerName::new(name).unwrap(),
            address: Upstream {
                host: "h".into(),
                port: 21,
            },
            weight: Weight::default(),
        }
    }

    #[test]
    fn pools_are_non_empty_with_unique_names() {
        let health = Some(HealthPolicy::default());
        assert_eq!(
            PoolSpec::new(vec![], Balance::default(), health),
            Err(PoolSpecError::Empty)
        );
        assert!(matches!(
            PoolSpec::new(vec![spec("a"), spec("b"), spec("a")], Balance::default(), health),
            Err(PoolSpecError::Duplicate(n)) if n.as_str() == "a"
        ));
        let pool = PoolSpec::new(vec![spec("a"), spec("b")], Balance::default(), health).unwrap();
        assert_eq!(pool.servers()[0].name.as_str(), "a");
        assert_eq!(pool.get("b").map(|s| s.name.as_str()), Some("b"));
        assert!(pool.get("c").is_none());
    }
}
