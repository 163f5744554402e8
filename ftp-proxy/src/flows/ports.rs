//! The flags of every port in the kernel's port map, and the guard's
//! expectations: the one place that decides what the tracker watches and
//! guards, and writes it.
//!
//! A port's flags are a function of:
//! - `fixed`: ports watched for the whole run (control listeners, the
//!   servers' ports, port 20, the data port ranges, also of reloads);
//! - `users`: data ports in use by sessions (watched while used, and
//!   [`super::UNWATCH_DELAY`] after, so a flow's last segments are seen);
//! - the guard: with a mode other than off, every port of the configured
//!   passive range is guarded for the client leg and of the active range
//!   for the server leg, and so is any port with a live expectation (the
//!   ranges may be unset: ephemeral listeners); a port whose expectation
//!   could not be inserted (map full) loses its guard bits while that
//!   listener lives: it fails open.
//!
//! Every change recomputes the flags of the ports it touched and writes
//! only those that differ from what the kernel has. All of it under one
//! mutex: each write is one system call, a few per data connection.
//!
//! Expectations are recorded here whatever the mode (no system call when
//! off), so that a reload from off to observe or enforce can insert the
//! ones announced before it: a listener announced before the reload must
//! not have its client refused after it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ftp_proxy_common::maps::port;
use tracing::{debug, warn};

use crate::flowtrack::{Expectation, GuardLeg, GuardMode, TrackerHandle};
use crate::metrics::Metrics;

/// Why an expectation could not be made: the listener is not guarded
/// (`ebpf_guard_fail_open_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOpen {
    /// The expectation map is full (or the kernel had no memory for it).
    MapFull,
    /// Another map error.
    MapError,
    /// The program could not read its mode (counted by the kernel).
    Program,
}

impl FailOpen {
    /// Every reason.
    pub const ALL: [FailOpen; 3] = [FailOpen::MapFull, FailOpen::MapError, FailOpen::Program];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            FailOpen::MapFull => "map_full",
            FailOpen::MapError => "map_error",
            FailOpen::Program => "program",
        }
    }
}

/// The guard's configuration: its mode and the data port ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuardConfig {
    /// `--ebpf-guard`.
    pub mode: GuardMode,
    /// `--passive-ports`: the client leg's listeners.
    pub client_ports: Option<RangeInclusive<u16>>,
    /// `--active-ports`: the server leg's listeners.
    pub server_ports: Option<RangeInclusive<u16>>,
}

impl GuardConfig {
    /// The guard off, no ranges.
    #[cfg(test)]
    pub(crate) fn default_off() -> GuardConfig {
        GuardConfig {
            mode: GuardMode::Off,
            client_ports: None,
            server_ports: None,
        }
    }

    fn range(&self, leg: GuardLeg) -> Option<&RangeInclusive<u16>> {
        match leg {
            GuardLeg::Client => self.client_ports.as_ref(),
            GuardLeg::Server => self.server_ports.as_ref(),
        }
    }

    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        GuardLeg::ALL
            .into_iter()
            .filter_map(|leg| self.range(leg).cloned())
            .flatten()
    }
}

/// A live expectation.
#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    expectation: Expectation,
    /// Written to the kernel (false while the mode is off, or after a
    /// failed insert).
    in_kernel: bool,
    /// The insert failed: its port is not guarded while it lives.
    failed: bool,
}

/// What the kernel's port map and expectation map should hold.
#[derive(Debug)]
pub(crate) struct Ports {
    kernel: Option<TrackerHandle>,
    metrics: Arc<Metrics>,
    fixed: BTreeSet<u16>,
    users: HashMap<u16, usize>,
    idle_since: HashMap<u16, Instant>,
    guard: GuardConfig,
    entries: HashMap<SocketAddr, Entry>,
    /// Live expectations (not failed) by port and leg.
    guarded: HashMap<(u16, GuardLeg), usize>,
    /// Live failed expectations by port.
    open: HashMap<u16, usize>,
    /// The flags the kernel has.
    written: HashMap<u16, u8>,
    local_addrs: HashSet<IpAddr>,
    next_id: u64,
    /// A configuration was applied (the first one writes everything).
    configured: bool,
}

/// The shared state; guards hold a clone.
pub(crate) type SharedPorts = Arc<Mutex<Ports>>;

/// A poisoned lock only means a panic elsewhere; the state is consistent
/// between calls.
pub(crate) fn lock(ports: &SharedPorts) -> MutexGuard<'_, Ports> {
    ports.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Ports {
    /// The state for a tracker (`kernel`, or none: then nothing is
    /// written), writing the fixed ports and the guard's at once.
    pub(crate) fn new(
        kernel: Option<TrackerHandle>,
        fixed: Vec<u16>,
        guard: GuardConfig,
        metrics: Arc<Metrics>,
    ) -> Ports {
        let mut ports = Ports {
            kernel,
            metrics,
            fixed: fixed.into_iter().collect(),
            users: HashMap::new(),
            idle_since: HashMap::new(),
            guard: GuardConfig::default(),
            entries: HashMap::new(),
            guarded: HashMap::new(),
            open: HashMap::new(),
            written: HashMap::new(),
            local_addrs: HashSet::new(),
            next_id: 0,
            configured: false,
        };
        ports.reconfigure(guard);
        let all: Vec<u16> = ports.fixed.iter().copied().collect();
        for port in all {
            ports.sync(port);
        }
        ports
    }

    /// The flags `port` should have.
    fn desired(&self, port: u16) -> u8 {
        let mut flags = 0;
        if self.fixed.contains(&port)
            || self.users.contains_key(&port)
            || self.idle_since.contains_key(&port)
        {
            flags |= port::WATCHED;
        }
        if self.guard.mode != GuardMode::Off && !self.open.contains_key(&port) {
            for leg in GuardLeg::ALL {
                if self.guard.range(leg).is_some_and(|r| r.contains(&port))
                    || self.guarded.contains_key(&(port, leg))
                {
                    flags |= port::WATCHED | leg.port_flag();
                }
            }
        }
        flags
    }

    /// Writes `port`'s flags if they changed.
    fn sync(&mut self, port: u16) {
        let Some(kernel) = &self.kernel else { return };
        let want = self.desired(port);
        if self.written.get(&port).copied().unwrap_or(0) == want {
            return;
        }
        match kernel.set_port(port, want) {
            Ok(()) => {
                if want == 0 {
                    self.written.remove(&port);
                } else {
                    self.written.insert(port, want);
                }
            }
            Err(e) => debug!(port, flags = want, error = %e, "flow tracker: cannot set port flags"),
        }
    }

    /// Applies a (re)loaded configuration: the mode, and the ranges (whose
    /// ports stay watched for good, as the first ones).
    pub(crate) fn reconfigure(&mut self, guard: GuardConfig) {
        if guard == self.guard && self.configured {
            return;
        }
        self.configured = true;
        let old = std::mem::replace(&mut self.guard, guard);
        let turned_on = old.mode == GuardMode::Off && self.guard.mode != GuardMode::Off;
        if turned_on {
            // The listeners announced while off are expected now, before
            // any of their ports gets a guard bit.
            let pending: Vec<SocketAddr> = self
                .entries
                .values()
                .filter(|e| !e.in_kernel && !e.failed)
                .map(|e| e.expectation.local)
                .collect();
            for local in pending {
                self.insert(local);
            }
        }
        if let Some(kernel) = &self.kernel
            && let Err(e) = kernel.set_guard_mode(self.guard.mode)
        {
            warn!(error = %e, mode = self.guard.mode.label(), "flow tracker: cannot set the guard's mode");
        }
        // Without a tracker nothing is guarded, whatever the setting.
        self.metrics.set_guard_mode(if self.kernel.is_some() {
            self.guard.mode
        } else {
            GuardMode::Off
        });
        let new_range_ports: Vec<u16> = self.guard.ports().collect();
        self.fixed.extend(new_range_ports.iter().copied());
        let mut touched: BTreeSet<u16> = old.ports().collect();
        touched.extend(new_range_ports);
        touched.extend(self.entries.values().map(|e| e.expectation.local.port()));
        for port in touched {
            self.sync(port);
        }
    }

    /// Watches `port` (a data port chosen at run time) for one more user.
    pub(crate) fn watch(&mut self, port: u16) -> bool {
        if self.fixed.contains(&port) {
            return false;
        }
        *self.users.entry(port).or_insert(0) += 1;
        // A port whose last user left less than UNWATCH_DELAY ago is still
        // in the kernel's set: a busy server hands out the same few passive
        // ports over and over, one system call saved per transfer.
        self.idle_since.remove(&port);
        self.sync(port);
        true
    }

    /// One user of `port` less.
    pub(crate) fn unwatch(&mut self, port: u16) {
        if let Some(n) = self.users.get_mut(&port) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.users.remove(&port);
                self.idle_since.insert(port, Instant::now());
            }
        }
    }

    /// Dynamic ports nobody used for `delay` stop being watched.
    pub(crate) fn unwatch_idle(&mut self, delay: std::time::Duration) {
        let due: Vec<u16> = self
            .idle_since
            .iter()
            .filter(|(_, at)| at.elapsed() >= delay)
            .map(|(p, _)| *p)
            .collect();
        for port in due {
            self.idle_since.remove(&port);
            self.sync(port);
        }
    }

    /// Records an expectation and, unless the guard is off, writes it
    /// before anything else about its port; returns its id (for
    /// [`Ports::release`]).
    pub(crate) fn expect(&mut self, expectation: Expectation) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let local = expectation.local;
        let port = local.port();
        // A listener of an earlier expectation on the same address and port
        // is closed (the kernel gave the port out again): its entry goes.
        if let Some(old) = self.entries.remove(&local) {
            self.forget(&old);
        }
        if !self.fixed.contains(&port) {
            *self.users.entry(port).or_insert(0) += 1;
            self.idle_since.remove(&port);
        }
        self.entries.insert(
            local,
            Entry {
                id,
                expectation,
                in_kernel: false,
                failed: false,
            },
        );
        if self.guard.mode != GuardMode::Off {
            self.insert(local);
        }
        self.sync(port);
        self.metrics.set_guard_expectations(self.entries.len());
        id
    }

    /// Writes the entry of `local` to the kernel; on failure its port
    /// fails open.
    fn insert(&mut self, local: SocketAddr) {
        let Some(entry) = self.entries.get(&local).copied() else {
            return;
        };
        let e = entry.expectation;
        // Without a kernel (tests of this model) the insert is a success
        // with nothing to write.
        let result = match self.kernel.clone() {
            Some(kernel) => {
                if self.local_addrs.insert(e.local.ip())
                    && let Err(err) = kernel.add_local_address(e.local.ip())
                {
                    debug!(address = %e.local.ip(), error = %err, "flow tracker: cannot record a local address");
                }
                kernel.expect(&e)
            }
            None => Ok(()),
        };
        let Some(entry) = self.entries.get_mut(&local) else {
            return;
        };
        match result {
            Ok(()) => {
                entry.in_kernel = true;
                *self.guarded.entry((local.port(), e.leg)).or_insert(0) += 1;
            }
            Err(err) => {
                entry.failed = true;
                let reason = if err.is_map_full() {
                    FailOpen::MapFull
                } else {
                    FailOpen::MapError
                };
                *self.open.entry(local.port()).or_insert(0) += 1;
                self.metrics.guard_fail_open(e.leg, reason);
                warn!(local = %local, leg = ?e.leg, reason = reason.label(), error = %err, "guard: cannot expect the data connection; its port fails open");
            }
        }
    }

    /// Undoes what an entry holds (kernel entry, counts) but its users.
    fn forget(&mut self, entry: &Entry) {
        let local = entry.expectation.local;
        let port = local.port();
        if entry.in_kernel {
            decrement(&mut self.guarded, (port, entry.expectation.leg));
            if let Some(kernel) = &self.kernel
                && let Err(e) = kernel.unexpect(local)
            {
                debug!(local = %local, error = %e, "flow tracker: cannot remove an expectation");
            }
        }
        if entry.failed {
            decrement(&mut self.open, port);
        }
        if !self.fixed.contains(&port) {
            self.unwatch(port);
        }
    }

    /// The expectation `id` of `local` is over (its listener is closed).
    pub(crate) fn release(&mut self, local: SocketAddr, id: u64) {
        if self.entries.get(&local).is_some_and(|e| e.id == id)
            && let Some(entry) = self.entries.remove(&local)
        {
            self.forget(&entry);
            self.sync(local.port());
        }
        self.metrics.set_guard_expectations(self.entries.len());
    }

    /// The guard's mode now.
    pub(crate) fn mode(&self) -> GuardMode {
        self.guard.mode
    }

    /// The expectations the daemon holds (for `/flows` without a kernel
    /// read, and the tests).
    #[cfg(test)]
    pub(crate) fn held(&self) -> Vec<crate::flowtrack::ExpectationRecord> {
        self.entries
            .values()
            .map(|e| crate::flowtrack::ExpectationRecord {
                local: e.expectation.local,
                peer: e.expectation.peer,
                leg: e.expectation.leg,
                session_id: e.expectation.session_id,
                deadline: e.expectation.deadline,
                claimed_by: None,
            })
            .collect()
    }

    /// The flags last written for `port` (0: absent).
    #[cfg(test)]
    pub(crate) fn written(&self, port: u16) -> u8 {
        self.written.get(&port).copied().unwrap_or(0)
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

/// A data port watched while this value lives.
#[derive(Debug)]
pub(crate) struct PortWatch {
    pub(crate) ports: SharedPorts,
    pub(crate) port: u16,
}

impl Drop for PortWatch {
    fn drop(&mut self) {
        lock(&self.ports).unwatch(self.port);
    }
}

/// An expectation held while this value lives (with its port's watch).
#[derive(Debug)]
pub(crate) struct ExpectGuard {
    pub(crate) ports: SharedPorts,
    pub(crate) local: SocketAddr,
    pub(crate) id: u64,
}

impl Drop for ExpectGuard {
    fn drop(&mut self) {
        lock(&self.ports).release(self.local, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn exp(local: &str, leg: GuardLeg) -> Expectation {
        Expectation {
            local: local.parse().unwrap(),
            peer: "10.0.0.2".parse().unwrap(),
            deadline: Duration::from_secs(60),
            session_id: 1,
            leg,
        }
    }

    fn ports(mode: GuardMode) -> Ports {
        Ports::new(
            None,
            vec![21],
            GuardConfig {
                mode,
                client_ports: Some(50_000..=50_009),
                server_ports: Some(51_000..=51_009),
            },
            Arc::new(Metrics::new().unwrap()),
        )
    }

    #[test]
    fn flags_follow_ranges_expectations_and_the_mode() {
        let mut p = ports(GuardMode::Enforce);
        assert_eq!(p.desired(21), port::WATCHED);
        assert_eq!(p.desired(50_003), port::WATCHED | port::GUARD_CLIENT);
        assert_eq!(p.desired(51_009), port::WATCHED | port::GUARD_SERVER);
        assert_eq!(p.desired(40_000), 0);
        // An ephemeral listener is guarded while its expectation lives.
        let id = p.expect(exp("10.0.0.1:40000", GuardLeg::Client));
        assert_eq!(p.desired(40_000), port::WATCHED | port::GUARD_CLIENT);
        p.release("10.0.0.1:40000".parse().unwrap(), id);
        // Watched a while longer, no longer guarded.
        assert_eq!(p.desired(40_000), port::WATCHED);
        p.unwatch_idle(Duration::ZERO);
        assert_eq!(p.desired(40_000), 0);
        // Off: watched, nothing guarded.
        p.reconfigure(GuardConfig {
            mode: GuardMode::Off,
            client_ports: Some(50_000..=50_009),
            server_ports: None,
        });
        assert_eq!(p.desired(50_003), port::WATCHED);
        // The old active range stays watched (sessions of before the reload).
        assert_eq!(p.desired(51_009), port::WATCHED);
    }

    #[test]
    fn a_stale_release_never_removes_a_newer_expectation() {
        let mut p = ports(GuardMode::Observe);
        let first = p.expect(exp("10.0.0.1:50001", GuardLeg::Client));
        let second = p.expect(exp("10.0.0.1:50001", GuardLeg::Client));
        assert_ne!(first, second);
        p.release("10.0.0.1:50001".parse().unwrap(), first);
        assert_eq!(p.held().len(), 1);
        p.release("10.0.0.1:50001".parse().unwrap(), second);
        assert!(p.held().is_empty());
        assert!(p.users.is_empty());
    }

    #[test]
    fn expectations_made_while_off_are_kept_for_a_reload() {
        let mut p = ports(GuardMode::Off);
        let id = p.expect(exp("10.0.0.1:40001", GuardLeg::Server));
        assert_eq!(p.held().len(), 1);
        assert_eq!(p.desired(40_001), port::WATCHED);
        p.reconfigure(GuardConfig {
            mode: GuardMode::Enforce,
            ..GuardConfig::default()
        });
        // Expected now, so guarded (with a kernel, the reload writes the
        // expectation first: the privileged tests show it).
        assert_eq!(p.desired(40_001), port::WATCHED | port::GUARD_SERVER);
        p.release("10.0.0.1:40001".parse().unwrap(), id);
        assert!(p.held().is_empty());
    }
}
