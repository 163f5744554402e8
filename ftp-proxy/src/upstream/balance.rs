//! Which server a new session goes to: pure selection over a snapshot of
//! the pool, one function per policy.
//!
//! The caller ([`super::Pool`]) describes every server as a [`Candidate`]
//! (up or down, allowed for this session or not, sessions now, weight, this
//! client's sessions on it, a stable hash of its name) and passes in the
//! randomness, so every policy is a deterministic function of its inputs
//! and its own small state (the round-robin positions). A server that is
//! down or not allowed (excluded after a failed attempt, or outside the
//! user's route) is never chosen; `None` means no server is eligible.
//!
//! Not here: health, counting sessions, routes (all in the caller).

use std::net::IpAddr;

/// How new sessions are spread over the servers (`balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Balance {
    /// Fewest sessions per unit of weight (sessions being connected count
    /// too); round-robin among servers with the same load, as HAProxy's
    /// `leastconn`.
    #[default]
    LeastConnections,
    /// Smooth weighted round-robin (nginx's): a server of weight 3 among
    /// two of weight 1 gets picks spread as A B A C A, not A A A B C.
    RoundRobin,
    /// Weighted random.
    Random,
    /// A client address stays on the server where it already has sessions
    /// (the one with most of them) while that server is up; a client with
    /// none goes where weighted rendezvous hashing of its address puts it,
    /// so that several gateways send the same client to the same server,
    /// and adding or removing a server moves only the clients it gains or
    /// loses.
    StickyClient,
}

/// One server as the balancer sees it at a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Whether health checks say it is up.
    pub up: bool,
    /// Whether this session may go there (in the user's route, not
    /// excluded by an earlier failed attempt).
    pub allowed: bool,
    /// Sessions on it now, those being connected included.
    pub sessions: u64,
    /// Its weight (at least 1).
    pub weight: u32,
    /// This client address's sessions on it now.
    pub client_sessions: u64,
    /// A stable hash of its name, for rendezvous hashing.
    pub key: u64,
}

impl Candidate {
    fn eligible(&self) -> bool {
        self.up && self.allowed
    }

    fn weight(&self) -> u64 {
        u64::from(self.weight.max(1))
    }
}

/// A policy with its state (round-robin positions).
#[derive(Debug, Clone)]
pub struct Balancer {
    policy: Balance,
    /// Least-connections: where the round-robin among equally loaded
    /// servers goes on from.
    next: usize,
    /// Round-robin: each server's current weight (nginx's
    /// `current_weight`), indexed like the candidates.
    current: Vec<i64>,
}

impl Balancer {
    /// A balancer for `policy`.
    pub fn new(policy: Balance) -> Balancer {
        Balancer {
            policy,
            next: 0,
            current: Vec::new(),
        }
    }

    /// The policy.
    pub fn policy(&self) -> Balance {
        self.policy
    }

    /// The index of the candidate a new session of `client` goes to, or
    /// `None` when no candidate is both up and allowed. `random` is used by
    /// [`Balance::Random`] only.
    pub fn pick(&mut self, candidates: &[Candidate], client: IpAddr, random: u64) -> Option<usize> {
        match self.policy {
            Balance::LeastConnections => self.least_connections(candidates),
            Balance::RoundRobin => self.round_robin(candidates),
            Balance::Random => weighted_random(candidates, random),
            Balance::StickyClient => sticky(candidates, client),
        }
    }

    fn least_connections(&mut self, candidates: &[Candidate]) -> Option<usize> {
        // sessions_i / weight_i < sessions_j / weight_j, compared without
        // division: sessions_i * weight_j < sessions_j * weight_i.
        let load = |c: &Candidate| (u128::from(c.sessions), u128::from(c.weight()));
        let lightest = candidates
            .iter()
            .filter(|c| c.eligible())
            .map(load)
            .reduce(|best, (s, w)| {
                if s * best.1 < best.0 * w {
                    (s, w)
                } else {
                    best
                }
            })?;
        let n = candidates.len();
        let start = self.next % n.max(1);
        let chosen = (0..n).map(|k| (start + k) % n).find(|&i| {
            candidates.get(i).is_some_and(|c| {
                let (s, w) = load(c);
                c.eligible() && s * lightest.1 == lightest.0 * w
            })
        })?;
        self.next = chosen + 1;
        Some(chosen)
    }

    fn round_robin(&mut self, candidates: &[Candidate]) -> Option<usize> {
        // nginx's smooth weighted round-robin (ngx_http_upstream_round_robin.c):
        // every eligible server gains its weight, the largest current weight
        // wins and pays the total back.
        self.current.resize(candidates.len(), 0);
        let mut total: i64 = 0;
        for (c, current) in candidates.iter().zip(self.current.iter_mut()) {
            if c.eligible() {
                let weight = i64::from(c.weight.max(1));
                *current += weight;
                total += weight;
            }
        }
        // The first of the largest, as nginx.
        let mut best: Option<(usize, i64)> = None;
        for (i, (c, &current)) in candidates.iter().zip(self.current.iter()).enumerate() {
            if c.eligible() && best.is_none_or(|(_, b)| current > b) {
                best = Some((i, current));
            }
        }
        let (best, _) = best?;
        if let Some(current) = self.current.get_mut(best) {
            *current -= total;
        }
        Some(best)
    }
}

fn weighted_random(candidates: &[Candidate], random: u64) -> Option<usize> {
    let total: u64 = candidates
        .iter()
        .filter(|c| c.eligible())
        .map(Candidate::weight)
        .sum();
    if total == 0 {
        return None;
    }
    let mut point = random % total;
    for (i, c) in candidates.iter().enumerate() {
        if !c.eligible() {
            continue;
        }
        if point < c.weight() {
            return Some(i);
        }
        point -= c.weight();
    }
    None
}

fn sticky(candidates: &[Candidate], client: IpAddr) -> Option<usize> {
    // Where this client already is (the server with most of its sessions,
    // the first on a tie).
    let mut home: Option<(usize, u64)> = None;
    for (i, c) in candidates.iter().enumerate() {
        if c.eligible() && c.client_sessions > 0 && home.is_none_or(|(_, n)| c.client_sessions > n)
        {
            home = Some((i, c.client_sessions));
        }
    }
    if let Some((i, _)) = home {
        return Some(i);
    }
    // Weighted rendezvous hashing (Schindelhauer and Schomaker's logarithmic
    // method): score = weight / -ln(u), u uniform in (0, 1) from the hash of
    // (client, server); the highest score wins. Each server wins with
    // probability weight / total weight.
    let client = key_of_ip(client);
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in candidates.iter().enumerate() {
        if !c.eligible() {
            continue;
        }
        let h = mix(client ^ mix(c.key));
        // 53 random bits, moved off 0 so that ln(u) < 0 is finite.
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(c.weight.max(1)) / -u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

/// A stable 64-bit hash of a server name: the same on every gateway and
/// every build (FNV-1a, then mixed), unlike std's hasher.
pub fn key_of_name(name: &str) -> u64 {
    mix(fnv1a(name.as_bytes()))
}

fn key_of_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => fnv1a(&v4.octets()),
        IpAddr::V6(v6) => fnv1a(&v6.octets()),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finaliser: spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const POLICIES: [Balance; 4] = [
        Balance::LeastConnections,
        Balance::RoundRobin,
        Balance::Random,
        Balance::StickyClient,
    ];

    fn server(weight: u32, i: usize) -> Candidate {
        Candidate {
            up: true,
            allowed: true,
            sessions: 0,
            weight,
            client_sessions: 0,
            key: key_of_name(&format!("s{i}")),
        }
    }

    fn pool(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| server(w, i))
            .collect()
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn least_connections_goes_round_robin_among_equals() {
        let mut b = Balancer::new(Balance::LeastConnections);
        let c = pool(&[1, 1, 1]);
        let picks: Vec<_> = (0..6).map(|_| b.pick(&c, ip(1), 0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // Load decides first: 3 sessions on weight 3 weigh as 1 on weight 1.
        let mut c = pool(&[3, 1]);
        c[0].sessions = 3;
        c[1].sessions = 2;
        assert_eq!(b.pick(&c, ip(1), 0), Some(0));
    }

    #[test]
    fn round_robin_is_smooth() {
        let mut b = Balancer::new(Balance::RoundRobin);
        let c = pool(&[5, 1, 1]);
        let picks: Vec<_> = (0..7).map(|_| b.pick(&c, ip(1), 0).unwrap()).collect();
        // nginx's documented sequence for weights 5, 1, 1.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn sticky_prefers_where_the_client_is() {
        let mut b = Balancer::new(Balance::StickyClient);
        let mut c = pool(&[1, 1, 1]);
        let first = b.pick(&c, ip(7), 0).unwrap();
        assert_eq!(b.pick(&c, ip(7), 0), Some(first), "hashing is stable");
        let other = (first + 1) % 3;
        c[other].client_sessions = 2;
        assert_eq!(b.pick(&c, ip(7), 0), Some(other));
        c[other].up = false;
        assert_eq!(b.pick(&c, ip(7), 0), Some(first), "a down home is left");
    }

    #[test]
    fn nothing_eligible_is_none() {
        for policy in POLICIES {
            let mut b = Balancer::new(policy);
            assert_eq!(b.pick(&[], ip(1), 0), None);
            let mut c = pool(&[1, 2]);
            c[0].up = false;
            c[1].allowed = false;
            assert_eq!(b.pick(&c, ip(1), 0), None, "{policy:?}");
        }
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec(
            (any::<bool>(), any::<bool>(), 0u64..50, 1u32..=1000, 0u64..3),
            0..8,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (up, allowed, sessions, weight, mine))| Candidate {
                    up,
                    allowed,
                    sessions,
                    weight,
                    client_sessions: mine,
                    key: key_of_name(&format!("s{i}")),
                })
                .collect()
        })
    }

    proptest! {
        /// Never a down or excluded server; `None` only when none is left.
        #[test]
        fn never_picks_an_ineligible_server(
            c in candidates(),
            client in any::<u32>(),
            randoms in prop::collection::vec(any::<u64>(), 1..20),
        ) {
            let any_eligible = c.iter().any(|c| c.up && c.allowed);
            for policy in POLICIES {
                let mut b = Balancer::new(policy);
                for &r in &randoms {
                    match b.pick(&c, ip(client), r) {
                        Some(i) => prop_assert!(c[i].up && c[i].allowed, "{policy:?} picked {i}"),
                        None => prop_assert!(!any_eligible, "{policy:?} picked nothing"),
                    }
                }
            }
        }

        /// Over many sessions that stay open, each server's share is its
        /// share of the weights: within a weight's worth for the deterministic
        /// policies, within a few percent for the random ones.
        #[test]
        fn weights_are_respected_in_the_long_run(
            weights in prop::collection::vec(1u32..=10, 1..5),
            seed in any::<u64>(),
        ) {
            let total: u32 = weights.iter().sum();
            let n = 4000u64;
            for policy in POLICIES {
                let mut b = Balancer::new(policy);
                let mut c = pool(&weights);
                let mut rng = fastrand::Rng::with_seed(seed);
                for k in 0..n {
                    // Sticky: a new client address each time (with no
                    // sessions of its own, it goes where hashing puts it).
                    let client = ip(rng.u32(..).wrapping_add(k as u32));
                    let i = b.pick(&c, client, rng.u64(..)).unwrap();
                    c[i].sessions += 1;
                }
                for (i, &w) in weights.iter().enumerate() {
                    let want = n as f64 * f64::from(w) / f64::from(total);
                    let got = c[i].sessions as f64;
                    let slack = match policy {
                        // Every server's sessions/weight ends within 1/weight
                        // of the others'.
                        Balance::LeastConnections => f64::from(w),
                        // nginx's current weights stay within the total.
                        Balance::RoundRobin => 1.0,
                        // Binomial: 5 standard deviations of n picks.
                        Balance::Random | Balance::StickyClient => {
                            5.0 * (want * (1.0 - f64::from(w) / f64::from(total))).sqrt() + 1.0
                        }
                    };
                    prop_assert!((got - want).abs() <= slack,
                        "{policy:?} weights {weights:?}: server {i} got {got}, want {want}");
                }
            }
        }

        /// While a client address has sessions, its new sessions go to the
        /// same server, whatever other clients do.
        #[test]
        fn sticky_keeps_an_address_on_one_server_while_it_has_sessions(
            weights in prop::collection::vec(1u32..=5, 1..5),
            ops in prop::collection::vec((0u32..6, any::<bool>(), any::<u8>()), 1..200),
        ) {
            let mut b = Balancer::new(Balance::StickyClient);
            let mut c = pool(&weights);
            // Open sessions: (client, server).
            let mut open: Vec<(u32, usize)> = Vec::new();
            for (client, start, which) in ops {
                if start || open.is_empty() {
                    for (i, cand) in c.iter_mut().enumerate() {
                        cand.client_sessions =
                            open.iter().filter(|&&(cl, s)| cl == client && s == i).count() as u64;
                    }
                    let i = b.pick(&c, ip(client), 0).unwrap();
                    if let Some(&(_, s)) = open.iter().find(|&&(cl, _)| cl == client) {
                        prop_assert_eq!(s, i, "client {} moved", client);
                    }
                    c[i].sessions += 1;
                    open.push((client, i));
                } else {
                    let (_, s) = open.remove(usize::from(which) % open.len());
                    c[s].sessions -= 1;
                }
            }
        }
    }
}
