//! Which session and leg each TCP connection of the gateway belongs to.
//!
//! Sessions register every connection they hold (client control, server
//! control, client data, server data) by its two endpoints; the flow
//! tracker's records are joined with this table to say, for each flow the
//! kernel saw, which session and leg it was. Connections stay known for a
//! while after they close, so that flows closed since the last look are
//! still attributed. Bounded: closed entries beyond the bound are dropped,
//! oldest first.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::session::Connection;

/// How long a closed connection stays known.
const KEEP_CLOSED: Duration = Duration::from_secs(120);
/// How many closed connections stay known at most.
const MAX_CLOSED: usize = 16_384;

/// A connection's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    /// The session.
    pub(crate) session_id: u64,
    /// Which of its connections.
    pub(crate) connection: Connection,
    /// The gateway's end of the connection.
    pub(crate) local: SocketAddr,
    /// The session's client, when a balancer's PROXY header named it.
    pub(crate) client: Option<SocketAddr>,
}

/// The endpoints of a connection, in a canonical order so that either
/// side's view finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Endpoints(SocketAddr, SocketAddr);

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl Endpoints {
    /// The connection between `a` and `b` (in either order).
    pub(crate) fn new(a: SocketAddr, b: SocketAddr) -> Endpoints {
        let (a, b) = (canonical(a), canonical(b));
        if (a.ip(), a.port()) <= (b.ip(), b.port()) {
            Endpoints(a, b)
        } else {
            Endpoints(b, a)
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    open: HashMap<Endpoints, Owner>,
    closed: HashMap<Endpoints, (Owner, Instant)>,
    closed_order: VecDeque<(Instant, Endpoints)>,
}

/// The table, shared by all sessions.
#[derive(Debug, Clone, Default)]
pub(crate) struct LegRegistry(Arc<Mutex<Table>>);

/// A registered connection; dropping it marks the connection closed.
#[derive(Debug)]
pub(crate) struct Registration {
    registry: LegRegistry,
    endpoints: Endpoints,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut table) = self.registry.0.lock() {
            if let Some(owner) = table.open.remove(&self.endpoints) {
                let now = Instant::now();
                table.closed.insert(self.endpoints, (owner, now));
                table.closed_order.push_back((now, self.endpoints));
            }
            table.expire(Instant::now());
        }
    }
}

impl Table {
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, endpoints)) = self.closed_order.front() {
            if self.closed_order.len() <= MAX_CLOSED && now.duration_since(at) < KEEP_CLOSED {
                break;
            }
            self.closed_order.pop_front();
            // The same endpoints may have been reused and closed again since.
            if self
                .closed
                .get(&endpoints)
                .is_some_and(|(_, closed_at)| *closed_at == at)
            {
                self.closed.remove(&endpoints);
            }
        }
    }
}

impl LegRegistry {
    /// Registers the connection between `local` and `peer` as `connection` of
    /// `session_id`, until the returned value is dropped.
    pub(crate) fn register(
        &self,
        session_id: u64,
        connection: Connection,
        local: SocketAddr,
        peer: SocketAddr,
        client: Option<SocketAddr>,
    ) -> Registration {
        let endpoints = Endpoints::new(local, peer);
        if let Ok(mut table) = self.0.lock() {
            table.closed.remove(&endpoints);
            table.open.insert(
                endpoints,
                Owner {
                    session_id,
                    connection,
                    local: canonical(local),
                    client,
                },
            );
        }
        Registration {
            registry: self.clone(),
            endpoints,
        }
    }

    /// The owner of the connection between `a` and `b`, open or recently closed.
    pub(crate) fn owner(&self, a: SocketAddr, b: SocketAddr) -> Option<Owner> {
        let endpoints = Endpoints::new(a, b);
        let table = self.0.lock().ok()?;
        table
            .open
            .get(&endpoints)
            .or_else(|| table.closed.get(&endpoints).map(|(owner, _)| owner))
            .copied()
    }

    #[cfg(test)]
    /// Connections open now.
    pub(crate) fn open_count(&self) -> usize {
        self.0.lock().map(|t| t.open.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn either_order_and_mapped_addresses_find_the_owner() {
        let r = LegRegistry::default();
        let reg = r.register(
            7,
            Connection::ClientData,
            sa("127.0.0.1:20"),
            sa("127.0.0.1:5001"),
            None,
        );
        assert_eq!(
            r.owner(sa("127.0.0.1:5001"), sa("127.0.0.1:20")),
            Some(Owner {
                session_id: 7,
                connection: Connection::ClientData,
                local: sa("127.0.0.1:20"),
                client: None,
            })
        );
        assert_eq!(
            r.owner(sa("[::ffff:127.0.0.1]:5001"), sa("127.0.0.1:20"))
                .map(|o| o.session_id),
            Some(7)
        );
        assert_eq!(r.open_count(), 1);
        drop(reg);
        // Still known after it closed.
        assert_eq!(
            r.owner(sa("127.0.0.1:5001"), sa("127.0.0.1:20"))
                .map(|o| o.connection),
            Some(Connection::ClientData)
        );
        assert_eq!(r.open_count(), 0);
        assert_eq!(r.owner(sa("127.0.0.1:5002"), sa("127.0.0.1:20")), None);
    }

    #[test]
    fn closed_entries_are_bounded() {
        let r = LegRegistry::default();
        for port in 0..(MAX_CLOSED as u32 + 100) {
            let p = 1024 + (port % 60_000) as u16;
            drop(r.register(
                1,
                Connection::ServerData,
                sa("10.0.0.1:21"),
                SocketAddr::new([10, 0, (port >> 16) as u8, 2].into(), p),
                None,
            ));
        }
        let table = r.0.lock().unwrap();
        assert!(table.closed.len() <= MAX_CLOSED && table.closed_order.len() <= MAX_CLOSED);
    }
}
