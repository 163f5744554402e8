//! The runtime pool: one state per configured server (up or down, sessions,
//! this client's sessions, connect failures), the balancer, and the health
//! checkers' tasks. The gateway holds one [`Pool`] for its whole run and
//! reconfigures it on reload; sessions hold a [`ServerHandle`] for as long as
//! they use a server.
//!
//! Locks: the member list and the balancer are behind one `std` mutex, held
//! for a pick (no `.await` inside); each server's health counter and its
//! per-client counts have their own. Order: members, then a server's.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::balance::{Balancer, Candidate, key_of_name};
use super::health::{self, Health, HealthEvent, HealthPolicy, Transition};
use super::proxy_protocol::ServerProxyProtocol;
use super::routes::Target;
use super::{PoolSpec, ServerName, ServerSpec};
use crate::config::Upstream;
use crate::metrics::{Metrics, ServerMetrics};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding one of these locks leaves counters
    // that are still meaningful: go on with them.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One server's shared state.
struct ServerState {
    name: ServerName,
    address: Upstream,
    /// Changes on reload without resetting the rest.
    weight: AtomicU32,
    key: u64,
    health: Mutex<Health>,
    /// Whether health counts: false when the pool has no health policy
    /// (the server is then always up).
    monitored: AtomicBool,
    /// Mirrors `health.is_up()`, for lock-free reads.
    up: AtomicBool,
    /// Sessions holding a handle (being connected included).
    sessions: AtomicU64,
    /// Sessions per client address (canonical), for `sticky-client`.
    clients: Mutex<HashMap<IpAddr, u64>>,
    connect_failures: AtomicU64,
    /// A session failed on this server: check it soon.
    nudge: Notify,
    /// Stops this server's checker.
    checker: Mutex<Option<CancellationToken>>,
    metrics: ServerMetrics,
}

impl ServerState {
    fn new(spec: &ServerSpec, policy: Option<HealthPolicy>, metrics: &Metrics) -> ServerState {
        ServerState {
            name: spec.name.clone(),
            address: spec.address.clone(),
            weight: AtomicU32::new(spec.weight.get()),
            key: key_of_name(spec.name.as_str()),
            health: Mutex::new(Health::new(&policy.unwrap_or_default())),
            monitored: AtomicBool::new(policy.is_some()),
            up: AtomicBool::new(true),
            sessions: AtomicU64::new(0),
            clients: Mutex::new(HashMap::new()),
            connect_failures: AtomicU64::new(0),
            nudge: Notify::new(),
            checker: Mutex::new(None),
            metrics: metrics.server(&spec.name),
        }
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Applies a health event; logs and exports a change of state once.
    /// Nothing changes for a server that is not monitored.
    fn apply(&self, event: HealthEvent, why: Option<&dyn fmt::Display>) {
        if !self.monitored.load(Ordering::Relaxed) {
            return;
        }
        let transition = {
            let mut health = lock(&self.health);
            let transition = health.apply(event);
            if transition.is_some() {
                self.up.store(health.is_up(), Ordering::Relaxed);
            }
            transition
        };
        match transition {
            Some(Transition::Down) => {
                self.metrics.set_up(false);
                match why {
                    Some(why) => {
                        warn!(server = %self.name, address = %self.address.authority(), reason = %why, "server down")
                    }
                    None => {
                        warn!(server = %self.name, address = %self.address.authority(), "server down")
                    }
                }
            }
            Some(Transition::Up) => {
                self.metrics.set_up(true);
                info!(server = %self.name, address = %self.address.authority(), "server up");
            }
            None => {}
        }
    }

    fn in_transition(&self) -> bool {
        lock(&self.health).in_transition()
    }

    fn client_sessions(&self, client: IpAddr) -> u64 {
        lock(&self.clients).get(&client).copied().unwrap_or(0)
    }

    /// Takes a new health policy: the counter restarts (unconfirmed) in the
    /// state the server is in; without a policy the server is up for good.
    fn set_policy(&self, policy: Option<HealthPolicy>) {
        let mut health = Health::new(&policy.unwrap_or_default());
        let up = policy.is_none() || self.is_up();
        if !up {
            // Down stays down until checks bring it back.
            health.apply(HealthEvent::CheckFailed);
        }
        *lock(&self.health) = health;
        self.monitored.store(policy.is_some(), Ordering::Relaxed);
        if up && !self.up.swap(true, Ordering::Relaxed) {
            self.metrics.set_up(true);
        }
    }

    /// Stops the checker, if one runs.
    fn stop_checker(&self) {
        if let Some(token) = lock(&self.checker).take() {
            token.cancel();
        }
    }
}

/// A session's claim on a server: counts as one of its sessions (for
/// least-connections, `sticky-client` and `upstream_sessions`) from the pick
/// until it is dropped. Take it before connecting, keep it for the whole
/// session; on a failed attempt, report it ([`Pool::passive_failure`]),
/// drop it, and pick again with its name excluded.
pub(crate) struct ServerHandle {
    server: Arc<ServerState>,
    client: IpAddr,
}

impl ServerHandle {
    fn new(server: Arc<ServerState>, client: IpAddr) -> ServerHandle {
        server.sessions.fetch_add(1, Ordering::Relaxed);
        *lock(&server.clients).entry(client).or_insert(0) += 1;
        server.metrics.session_started();
        ServerHandle { server, client }
    }

    /// The server's configured name (logs: `server=`).
    pub(crate) fn name(&self) -> &ServerName {
        &self.server.name
    }

    /// Where to connect (resolve at each connect).
    pub(crate) fn address(&self) -> &Upstream {
        &self.server.address
    }
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("server", &self.server.name)
            .field("address", &self.server.address)
            .finish_non_exhaustive()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.server.sessions.fetch_sub(1, Ordering::Relaxed);
        {
            let mut clients = lock(&self.server.clients);
            if let Some(n) = clients.get_mut(&self.client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    clients.remove(&self.client);
                }
            }
        }
        self.server.metrics.session_ended();
    }
}

/// What the pool knows of one server, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerStatus {
    /// Its name.
    pub(crate) name: ServerName,
    /// Whether it takes sessions.
    pub(crate) up: bool,
    /// Sessions holding a handle to it.
    pub(crate) sessions: u64,
    /// Sessions that could not connect to it or got no banner.
    pub(crate) connect_failures: u64,
}

struct Members {
    servers: Vec<Arc<ServerState>>,
    balancer: Balancer,
    health: Option<HealthPolicy>,
    proxy: ServerProxyProtocol,
    /// Whether checkers run (between `start_checks` and `stop`).
    checking: bool,
}

struct Inner {
    metrics: Arc<Metrics>,
    members: Mutex<Members>,
    checkers: TaskTracker,
    /// The gateway's listening addresses: a server there is a loop.
    own: std::sync::OnceLock<Arc<[std::net::SocketAddr]>>,
}

/// The servers behind the gateway, shared by the gateway and its sessions
/// (cloning is cheap).
#[derive(Clone)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.status()).finish()
    }
}

impl Pool {
    /// A pool of `spec`'s servers, all up (unconfirmed), checkers not
    /// started. `proxy` is the header health checks send.
    pub(crate) fn new(spec: &PoolSpec, proxy: ServerProxyProtocol, metrics: Arc<Metrics>) -> Pool {
        let servers = spec
            .servers()
            .iter()
            .map(|s| Arc::new(ServerState::new(s, spec.health(), &metrics)))
            .collect();
        Pool {
            inner: Arc::new(Inner {
                members: Mutex::new(Members {
                    servers,
                    balancer: Balancer::new(spec.balance()),
                    health: spec.health(),
                    proxy,
                    checking: false,
                }),
                metrics,
                checkers: TaskTracker::new(),
                own: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Takes a reloaded configuration. A server whose name and address are
    /// unchanged keeps its state (health, sessions, sticky clients; its
    /// weight is updated; its health restarts unconfirmed if the policy
    /// changed); others start fresh, and those gone have their series
    /// removed (their running sessions keep their handles). Checkers are
    /// restarted with the new policy. Call it within the runtime.
    pub(crate) fn reconfigure(&self, spec: &PoolSpec, proxy: ServerProxyProtocol) {
        let metrics = &self.inner.metrics;
        let mut members = lock(&self.inner.members);
        let old = std::mem::take(&mut members.servers);
        for server in &old {
            server.stop_checker();
        }
        let policy_changed = members.health != spec.health();
        let servers: Vec<Arc<ServerState>> = spec
            .servers()
            .iter()
            .map(|s| {
                match old
                    .iter()
                    .find(|o| o.name == s.name && o.address == s.address)
                {
                    Some(kept) => {
                        kept.weight.store(s.weight.get(), Ordering::Relaxed);
                        if policy_changed {
                            kept.set_policy(spec.health());
                        }
                        Arc::clone(kept)
                    }
                    None => Arc::new(ServerState::new(s, spec.health(), metrics)),
                }
            })
            .collect();
        for gone in &old {
            if !spec.servers().iter().any(|s| s.name == gone.name) {
                metrics.forget_server(&gone.name);
            }
        }
        let fresh: Vec<&str> = servers
            .iter()
            .filter(|s| !old.iter().any(|o| Arc::ptr_eq(o, s)))
            .map(|s| s.name.as_str())
            .collect();
        let left: Vec<&str> = old
            .iter()
            .filter(|o| !servers.iter().any(|s| Arc::ptr_eq(o, s)))
            .map(|o| o.name.as_str())
            .collect();
        if !fresh.is_empty() || !left.is_empty() {
            info!(new = ?fresh, gone = ?left, "server pool changed");
        }
        let same_list =
            old.len() == servers.len() && old.iter().zip(&servers).all(|(a, b)| Arc::ptr_eq(a, b));
        if !same_list || members.balancer.policy() != spec.balance() {
            members.balancer = Balancer::new(spec.balance());
        }
        members.servers = servers;
        members.health = spec.health();
        members.proxy = proxy;
        if members.checking {
            self.spawn_checkers(&members);
        }
    }

    /// The gateway's listening addresses (set once, before the checks
    /// start): a server that turns out to be one of them is refused as a
    /// loop, by the checks and by sessions.
    pub(crate) fn set_own_addresses(&self, addrs: Vec<std::net::SocketAddr>) {
        let _ = self.inner.own.set(addrs.into());
    }

    /// The gateway's listening addresses.
    pub(crate) fn own_addresses(&self) -> Arc<[std::net::SocketAddr]> {
        self.inner
            .own
            .get()
            .cloned()
            .unwrap_or_else(|| Arc::from([]))
    }

    /// Starts one health checker per server (within the runtime), when the
    /// pool has a health policy. They run until [`Pool::stop`]; reloads
    /// restart them (and start or stop them with the policy).
    pub(crate) fn start_checks(&self) {
        let mut members = lock(&self.inner.members);
        if !members.checking {
            members.checking = true;
            self.spawn_checkers(&members);
        }
    }

    fn spawn_checkers(&self, members: &Members) {
        let Some(policy) = members.health else {
            return;
        };
        for server in &members.servers {
            let token = CancellationToken::new();
            if let Some(previous) = lock(&server.checker).replace(token.clone()) {
                previous.cancel();
            }
            self.inner.checkers.spawn(check_loop(
                Arc::clone(server),
                policy,
                members.proxy,
                self.own_addresses(),
                token,
            ));
        }
    }

    /// Stops the checkers and waits for them to end.
    pub(crate) async fn stop(&self) {
        {
            let mut members = lock(&self.inner.members);
            members.checking = false;
            for server in &members.servers {
                server.stop_checker();
            }
        }
        self.inner.checkers.close();
        self.inner.checkers.wait().await;
        self.inner.checkers.reopen();
    }

    /// A server for a new session of `client`, from the whole pool, never
    /// one that is down or named in `exclude` (the servers this session
    /// already tried); `None` when none is left. (Sessions use
    /// [`Pool::pick_for`] with [`Target::Pool`].)
    #[cfg(test)]
    pub(crate) fn pick(&self, client: IpAddr, exclude: &[ServerName]) -> Option<ServerHandle> {
        self.pick_for(client, &Target::Pool, exclude)
    }

    /// Like [`Pool::pick`], among the servers `target` allows (a user's
    /// route). A name the pool no longer has (a reload removed it) is
    /// skipped.
    pub(crate) fn pick_for(
        &self,
        client: IpAddr,
        target: &Target,
        exclude: &[ServerName],
    ) -> Option<ServerHandle> {
        let client = client.to_canonical();
        let mut members = lock(&self.inner.members);
        let candidates: Vec<Candidate> = members
            .servers
            .iter()
            .map(|s| Candidate {
                up: s.is_up(),
                allowed: !exclude.contains(&s.name)
                    && match target {
                        Target::Pool => true,
                        Target::Servers(names) => names.contains(&s.name),
                    },
                sessions: s.sessions.load(Ordering::Relaxed),
                weight: s.weight.load(Ordering::Relaxed),
                client_sessions: s.client_sessions(client),
                key: s.key,
            })
            .collect();
        let chosen = members
            .balancer
            .pick(&candidates, client, fastrand::u64(..))?;
        let server = Arc::clone(members.servers.get(chosen)?);
        // Counted before the lock is released, so that concurrent picks see
        // this session (least-connections stays exact).
        let handle = ServerHandle::new(server, client);
        drop(members);
        Some(handle)
    }

    /// A session could not connect to `server`, or got no banner (or a
    /// `421`) from it: counted (`upstream_connect_failures_total`), and,
    /// when the pool is checked, taken as a failed check that brings the
    /// next active check forward.
    pub(crate) fn passive_failure(&self, server: &ServerHandle, why: &dyn fmt::Display) {
        let state = &server.server;
        state.connect_failures.fetch_add(1, Ordering::Relaxed);
        state.metrics.connect_failed();
        debug!(server = %state.name, reason = %why, "session could not use the server");
        state.apply(HealthEvent::PassiveFailure, Some(why));
        state.nudge.notify_one();
    }

    /// A session got `server`'s banner: confirms it if it is up.
    pub(crate) fn passive_success(&self, server: &ServerHandle) {
        server.server.apply(HealthEvent::PassiveSuccess, None);
    }

    /// Whether any server is up (`/readyz`).
    pub(crate) fn any_up(&self) -> bool {
        lock(&self.inner.members).servers.iter().any(|s| s.is_up())
    }

    /// Every server's state, in configuration order.
    pub(crate) fn status(&self) -> Vec<ServerStatus> {
        lock(&self.inner.members)
            .servers
            .iter()
            .map(|s| ServerStatus {
                name: s.name.clone(),
                up: s.is_up(),
                sessions: s.sessions.load(Ordering::Relaxed),
                connect_failures: s.connect_failures.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// One server's active checks until `cancel`: the first at a random point
/// of the first second (several gateways, several servers: not all at
/// once), then every `interval` (±5 %), or every fast interval while the
/// server is between states or a session just failed on it.
async fn check_loop(
    server: Arc<ServerState>,
    policy: HealthPolicy,
    proxy: ServerProxyProtocol,
    own: Arc<[std::net::SocketAddr]>,
    cancel: CancellationToken,
) {
    let mut next = Instant::now() + policy.fast_interval().mul_f64(fastrand::f64());
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
            () = server.nudge.notified() => {
                next = next.min(Instant::now() + policy.fast_interval());
                continue;
            }
        }
        let started = Instant::now();
        let result = tokio::select! {
            () = cancel.cancelled() => return,
            result = health::check(&server.address, policy.timeout(), proxy, &own) => result,
        };
        server.metrics.checked(started.elapsed());
        match result {
            Ok(()) => server.apply(HealthEvent::CheckPassed, None),
            Err(e) => {
                debug!(server = %server.name, error = %e, "health check failed");
                server.apply(HealthEvent::CheckFailed, Some(&e));
            }
        }
        let pause = if server.in_transition() {
            policy.fast_interval()
        } else {
            policy.interval()
        };
        next = Instant::now() + health::jittered(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{Balance, Weight};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn spec(servers: &[(&str, u16)], balance: Balance, health: HealthPolicy) -> PoolSpec {
        spec_checked(servers, balance, Some(health))
    }

    fn spec_checked(
        servers: &[(&str, u16)],
        balance: Balance,
        health: Option<HealthPolicy>,
    ) -> PoolSpec {
        PoolSpec::new(
            servers
                .iter()
                .map(|&(name, port)| ServerSpec {
                    name: ServerName::new(name).unwrap(),
                    address: Upstream {
                        host: "127.0.0.1".into(),
                        port,
                    },
                    weight: Weight::default(),
                })
                .collect(),
            balance,
            health,
        )
        .unwrap()
    }

    fn fast() -> HealthPolicy {
        HealthPolicy::new(Duration::from_secs(1), Duration::from_secs(1), 1, 2).unwrap()
    }

    fn name(n: &str) -> ServerName {
        ServerName::new(n).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pool(servers: &[(&str, u16)], balance: Balance) -> (Pool, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new().unwrap());
        let pool = Pool::new(
            &spec(servers, balance, fast()),
            ServerProxyProtocol::Off,
            Arc::clone(&metrics),
        );
        (pool, metrics)
    }

    #[test]
    fn handles_count_sessions_until_dropped() {
        let (pool, metrics) = pool(&[("a", 1), ("b", 2)], Balance::LeastConnections);
        let first = pool.pick(ip("192.0.2.1"), &[]).unwrap();
        let second = pool.pick(ip("192.0.2.1"), &[]).unwrap();
        assert_ne!(first.name(), second.name(), "least-connections spreads");
        assert!(
            metrics
                .encode()
                .contains("ftp_proxy_upstream_sessions{server=\"a\"} 1")
        );
        drop(first);
        drop(second);
        assert!(pool.status().iter().all(|s| s.sessions == 0));
        assert!(
            metrics
                .encode()
                .contains("ftp_proxy_upstream_sessions{server=\"a\"} 0")
        );
    }

    #[test]
    fn failover_excludes_and_passive_failures_take_servers_down() {
        let (pool, metrics) = pool(&[("a", 1), ("b", 2)], Balance::RoundRobin);
        let client = ip("192.0.2.1");
        let first = pool.pick(client, &[]).unwrap();
        let tried = vec![first.name().clone()];
        pool.passive_failure(&first, &"connection refused");
        drop(first);
        let second = pool.pick(client, &tried).unwrap();
        assert_ne!(&tried[0], second.name());
        assert!(pool.pick(client, &[name("a"), name("b")]).is_none());
        // Unconfirmed, so one failure took it down.
        let down = pool.status();
        assert_eq!(down.iter().filter(|s| !s.up).count(), 1);
        assert_eq!(down.iter().map(|s| s.connect_failures).sum::<u64>(), 1);
        assert!(metrics.encode().contains(&format!(
            "ftp_proxy_upstream_up{{server=\"{}\"}} 0",
            tried[0]
        )));
        for _ in 0..10 {
            assert_eq!(pool.pick(client, &[]).unwrap().name(), second.name());
        }
        assert!(pool.any_up());
        pool.passive_failure(&second, &"no banner");
        assert!(!pool.any_up());
        assert!(pool.pick(client, &[]).is_none());
    }

    #[test]
    fn routes_restrict_the_candidates() {
        let (pool, _) = pool(&[("a", 1), ("b", 2), ("c", 3)], Balance::LeastConnections);
        let only_c = Target::Servers(vec![name("c")]);
        for _ in 0..5 {
            let h = pool.pick_for(ip("192.0.2.1"), &only_c, &[]).unwrap();
            assert_eq!(h.name().as_str(), "c");
        }
        let gone = Target::Servers(vec![name("zz")]);
        assert!(pool.pick_for(ip("192.0.2.1"), &gone, &[]).is_none());
    }

    #[test]
    fn sticky_clients_stay_while_they_have_sessions() {
        let (pool, _) = pool(&[("a", 1), ("b", 2), ("c", 3)], Balance::StickyClient);
        let client = ip("198.51.100.20");
        let held: Vec<_> = (0..5).map(|_| pool.pick(client, &[]).unwrap()).collect();
        assert!(held.iter().all(|h| h.name() == held[0].name()));
        // The same address in its IPv4-mapped form is the same client.
        let mapped = pool.pick(ip("::ffff:198.51.100.20"), &[]).unwrap();
        assert_eq!(mapped.name(), held[0].name());
    }

    #[tokio::test]
    async fn reloads_keep_the_state_of_unchanged_servers() {
        let (pool, metrics) = pool(&[("a", 1), ("b", 2)], Balance::LeastConnections);
        let held = pool
            .pick_for(ip("192.0.2.1"), &Target::Servers(vec![name("a")]), &[])
            .unwrap();
        let b = pool
            .pick_for(ip("192.0.2.1"), &Target::Servers(vec![name("b")]), &[])
            .unwrap();
        pool.passive_failure(&b, &"refused");
        drop(b);
        // b changes address (fresh state), c is new, a is kept.
        pool.reconfigure(
            &spec(&[("a", 1), ("b", 9), ("c", 3)], Balance::RoundRobin, fast()),
            ServerProxyProtocol::Off,
        );
        let status = pool.status();
        assert_eq!(status[0].sessions, 1, "a kept its session");
        assert!(status[1].up, "b is a new server: up");
        assert_eq!(status.len(), 3);
        pool.reconfigure(
            &spec(&[("c", 3)], Balance::RoundRobin, fast()),
            ServerProxyProtocol::Off,
        );
        let text = metrics.encode();
        assert!(!text.contains("server=\"a\""), "a's series left with it");
        assert!(text.contains("ftp_proxy_upstream_up{server=\"c\"} 1"));
        drop(held);
        assert!(!metrics.encode().contains("server=\"a\""), "and stay gone");
    }

    /// An FTP server stand-in: greets (or not) every connection, answers
    /// QUIT; how many connections it saw.
    async fn server(greet: bool) -> (u16, Arc<AtomicU64>) {
        let (port, seen, _) = switchable(greet).await;
        (port, seen)
    }

    /// The same, with a switch to stop (or start) greeting.
    async fn switchable(greet: bool) -> (u16, Arc<AtomicU64>, Arc<AtomicBool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(AtomicU64::new(0));
        let greeting = Arc::new(AtomicBool::new(greet));
        let counter = Arc::clone(&seen);
        let switch = Arc::clone(&greeting);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                let greet = switch.load(Ordering::Relaxed);
                tokio::spawn(async move {
                    if greet {
                        let _ = stream.write_all(b"120 soon\r\n220 ready\r\n").await;
                    }
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if buf[..n].starts_with(b"QUIT") {
                            let _ = stream.write_all(b"221 bye\r\n").await;
                            break;
                        }
                    }
                });
            }
        });
        (port, seen, greeting)
    }

    async fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !ok() {
            assert!(
                Instant::now() < deadline,
                "{what} did not happen within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn checks_pass_on_a_greeting_server() {
        let (port, seen) = server(true).await;
        let (pool, metrics) = pool(&[("a", port)], Balance::LeastConnections);
        pool.start_checks();
        wait_for("two checks", Duration::from_secs(5), || {
            seen.load(Ordering::Relaxed) >= 2
        })
        .await;
        assert!(pool.any_up());
        pool.stop().await;
        assert!(
            !metrics
                .encode()
                .contains("ftp_proxy_upstream_check_seconds_count{server=\"a\"} 0")
        );
    }

    /// A server that accepts connections and never greets is down within
    /// the policy's bound; one that refuses them too.
    #[tokio::test]
    async fn a_silent_server_goes_down_in_bounded_time() {
        let (silent, _) = server(false).await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (pool, _) = pool(&[("a", silent), ("b", closed)], Balance::LeastConnections);
        let started = Instant::now();
        pool.start_checks();
        wait_for(
            "both down",
            fast().down_within() + Duration::from_secs(1),
            || !pool.any_up(),
        )
        .await;
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "a waited for the timeout"
        );
        pool.stop().await;
    }

    /// A confirmed server that stops greeting (it still accepts) is down
    /// within `down_within`: `fall` checks that each time out.
    #[tokio::test]
    async fn a_server_that_stops_greeting_goes_down_within_the_bound() {
        let (port, seen, greeting) = switchable(true).await;
        let (pool, _) = pool(&[("a", port)], Balance::LeastConnections);
        pool.start_checks();
        wait_for("a passed check", Duration::from_secs(3), || {
            seen.load(Ordering::Relaxed) >= 1
        })
        .await;
        // Confirmed: one failure is not enough (fall = 2).
        let h = pool.pick(ip("192.0.2.1"), &[]).unwrap();
        pool.passive_success(&h);
        drop(h);
        greeting.store(false, Ordering::Relaxed);
        let stopped = Instant::now();
        wait_for(
            "down",
            fast().down_within() + Duration::from_millis(500),
            || !pool.any_up(),
        )
        .await;
        assert!(
            stopped.elapsed() >= fast().timeout(),
            "down only after a check timed out"
        );
        pool.stop().await;
    }

    /// Without a health policy nothing is checked and nothing goes down.
    #[tokio::test]
    async fn unchecked_pools_are_always_up() {
        let (port, seen) = server(true).await;
        let metrics = Arc::new(Metrics::new().unwrap());
        let pool = Pool::new(
            &spec_checked(&[("a", port)], Balance::LeastConnections, None),
            ServerProxyProtocol::Off,
            Arc::clone(&metrics),
        );
        pool.start_checks();
        let h = pool.pick(ip("192.0.2.1"), &[]).unwrap();
        for _ in 0..5 {
            pool.passive_failure(&h, &"refused");
        }
        assert!(pool.any_up());
        assert_eq!(pool.status()[0].connect_failures, 5);
        // Checks start with a policy, and stop again without one.
        pool.reconfigure(
            &spec(&[("a", port)], Balance::LeastConnections, fast()),
            ServerProxyProtocol::Off,
        );
        wait_for("a check", Duration::from_secs(3), || {
            seen.load(Ordering::Relaxed) >= 1
        })
        .await;
        pool.passive_failure(&h, &"refused");
        pool.passive_failure(&h, &"refused");
        pool.reconfigure(
            &spec_checked(&[("a", port)], Balance::LeastConnections, None),
            ServerProxyProtocol::Off,
        );
        assert!(pool.any_up(), "up for good without checks");
        pool.stop().await;
    }

    /// Down, then back after `rise` checks once it greets again; a passive
    /// failure brings the next check forward.
    #[tokio::test]
    async fn a_server_comes_back_through_checks() {
        let (port, seen) = server(true).await;
        let (pool, _) = pool(&[("a", port)], Balance::LeastConnections);
        let h = pool.pick(ip("192.0.2.1"), &[]).unwrap();
        assert_eq!(h.address().port, port);
        pool.passive_success(&h);
        pool.passive_failure(&h, &"test");
        assert!(pool.any_up(), "confirmed: one failure is not enough");
        pool.passive_failure(&h, &"test");
        assert!(!pool.any_up());
        pool.start_checks();
        wait_for("back up", Duration::from_secs(4), || pool.any_up()).await;
        assert!(seen.load(Ordering::Relaxed) >= 1);
        pool.stop().await;
    }
}
