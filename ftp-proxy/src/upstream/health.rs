//! Whether a server is up: the rise/fall state machine (pure) and the
//! active check that feeds it (one task per server).
//!
//! Semantics are HAProxy's (`src/check.c`, `set_server_check_status`): a
//! health counter from 0 to `rise + fall - 1`, up while it is at least
//! `rise`. A server starts up but unconfirmed (at `rise`), so that the
//! gateway serves at once and a first failed check takes the server out;
//! a success moves a server that is up to fully up (`rise + fall - 1`), from
//! where it takes `fall` consecutive failures to go down; a down server
//! needs `rise` consecutive successes to come back. A failure seen by a
//! session (connect refused, no banner) counts as a failed check; a session
//! that got its banner confirms an up server but never brings a down one
//! back (only active checks do).
//!
//! The active check is FTP-level: connect, optionally send a PROXY LOCAL
//! header, read the banner (`120` lines may come before the `220`), send
//! `QUIT` and read its reply, all within `timeout` (the first part is
//! [`super::connect::greet`], as for a session). A server that accepts
//! connections and never greets is down after at most
//! [`HealthPolicy::down_within`].
//!
//! Not here: the shared per-server state and its metrics and logs
//! ([`super::Pool`]), connecting sessions (the session).

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::connect::{GreetError, Greeted, greet};
use super::proxy_protocol::ServerProxyProtocol;
use crate::config::{Upstream, defaults};
use crate::protocol::ReplyCodec;

/// When and how servers are checked (`[health]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HealthPolicy {
    interval: Duration,
    timeout: Duration,
    rise: u32,
    fall: u32,
}

/// Why a `[health]` setting is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HealthPolicyError {
    /// `interval` outside 1 s to 1 h.
    #[error("must be from 1 to 3600 seconds")]
    Interval,
    /// `timeout` below 1 s or above `interval`.
    #[error("must be at least 1 second and at most the interval")]
    Timeout,
    /// `rise` outside 1 to 100.
    #[error("must be from 1 to 100")]
    Rise,
    /// `fall` outside 1 to 100.
    #[error("must be from 1 to 100")]
    Fall,
}

impl HealthPolicyError {
    /// The configuration key at fault.
    pub fn key(self) -> &'static str {
        match self {
            HealthPolicyError::Interval => "health.interval",
            HealthPolicyError::Timeout => "health.timeout",
            HealthPolicyError::Rise => "health.rise",
            HealthPolicyError::Fall => "health.fall",
        }
    }
}

impl Default for HealthPolicy {
    fn default() -> HealthPolicy {
        HealthPolicy {
            interval: defaults::HEALTH_INTERVAL,
            timeout: defaults::HEALTH_TIMEOUT,
            rise: defaults::HEALTH_RISE,
            fall: defaults::HEALTH_FALL,
        }
    }
}

/// The pause between checks while a server is between states (HAProxy's
/// `fastinter`), at most.
const FAST_INTERVAL: Duration = Duration::from_secs(1);

impl HealthPolicy {
    /// A policy.
    ///
    /// # Errors
    /// [`HealthPolicyError`] naming the setting out of bounds.
    pub fn new(
        interval: Duration,
        timeout: Duration,
        rise: u32,
        fall: u32,
    ) -> Result<HealthPolicy, HealthPolicyError> {
        if interval < Duration::from_secs(1) || interval > Duration::from_secs(3600) {
            return Err(HealthPolicyError::Interval);
        }
        if timeout < Duration::from_secs(1) || timeout > interval {
            return Err(HealthPolicyError::Timeout);
        }
        if !(1..=100).contains(&rise) {
            return Err(HealthPolicyError::Rise);
        }
        if !(1..=100).contains(&fall) {
            return Err(HealthPolicyError::Fall);
        }
        Ok(HealthPolicy {
            interval,
            timeout,
            rise,
            fall,
        })
    }

    /// Between two checks of a server in a steady state.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// One check's deadline, connect to `QUIT` reply.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Consecutive successes that bring a down server up.
    pub fn rise(&self) -> u32 {
        self.rise
    }

    /// Consecutive failures that take a fully up server down.
    pub fn fall(&self) -> u32 {
        self.fall
    }

    /// Between two checks while a server is between states (one failure
    /// away from up, or on its way back): `min(interval, 1 s)`.
    pub fn fast_interval(&self) -> Duration {
        self.interval.min(FAST_INTERVAL)
    }

    /// The longest a server that stops answering (or never greets) stays
    /// up, from the moment it stops: the rest of a steady interval (jitter
    /// included), then `fall` checks that each time out, with fast
    /// intervals between them.
    pub fn down_within(&self) -> Duration {
        let steady = self.interval.mul_f64(1.0 + JITTER);
        let fast = self.fast_interval().mul_f64(1.0 + JITTER);
        steady + self.timeout * self.fall + fast * self.fall.saturating_sub(1)
    }
}

/// Relative jitter on every pause between checks, so that gateways (and
/// servers) do not fall into step: ±5 %.
const JITTER: f64 = 0.05;

/// What happened to a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthEvent {
    /// An active check got the banner.
    CheckPassed,
    /// An active check failed.
    CheckFailed,
    /// A session could not connect or got no banner (counts as a failed
    /// check).
    PassiveFailure,
    /// A session got the server's banner: confirms a server that is up,
    /// never brings back one that is down.
    PassiveSuccess,
}

/// A change of state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The server went up.
    Up,
    /// The server went down.
    Down,
}

/// One server's health counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    value: u32,
    rise: u32,
    fall: u32,
}

impl Health {
    /// A new server: up, unconfirmed (one failure takes it down).
    pub fn new(policy: &HealthPolicy) -> Health {
        Health {
            value: policy.rise,
            rise: policy.rise,
            fall: policy.fall,
        }
    }

    /// Whether the server takes sessions.
    pub fn is_up(&self) -> bool {
        self.value >= self.rise
    }

    /// Between states (checked at the fast interval): up but not fully, or
    /// down with a success or more toward `rise`.
    pub fn in_transition(&self) -> bool {
        self.value > 0 && self.value < self.full()
    }

    fn full(&self) -> u32 {
        self.rise + self.fall - 1
    }

    /// Applies an event; says whether the server changed state.
    pub fn apply(&mut self, event: HealthEvent) -> Option<Transition> {
        let was_up = self.is_up();
        match event {
            HealthEvent::CheckFailed | HealthEvent::PassiveFailure => {
                self.value = self.value.saturating_sub(1);
                if self.value < self.rise {
                    self.value = 0;
                }
            }
            HealthEvent::CheckPassed => {
                if self.value < self.full() {
                    self.value += 1;
                    if self.value >= self.rise {
                        self.value = self.full();
                    }
                }
            }
            HealthEvent::PassiveSuccess => {
                if was_up {
                    self.value = self.full();
                }
            }
        }
        match (was_up, self.is_up()) {
            (false, true) => Some(Transition::Up),
            (true, false) => Some(Transition::Down),
            _ => None,
        }
    }
}

/// Bounds on the banner a check reads: servers put notices in it, but
/// nothing like a directory listing.
const CHECK_MAX_LINE: usize = 4096;
const CHECK_MAX_LINES: usize = 200;
const CHECK_BUFFER: usize = 512;

/// One active check of `address`: [`greet`] (with `proxy`'s LOCAL header
/// if any), then `QUIT`. Passes once the `220` is read; the `QUIT` exchange
/// gets the rest of `timeout` and its outcome does not matter (servers may
/// close without `221`).
///
/// # Errors
/// [`GreetError`] saying why the server did not greet in time.
pub async fn check(
    address: &Upstream,
    timeout: Duration,
    proxy: ServerProxyProtocol,
    own: &[std::net::SocketAddr],
) -> Result<(), GreetError> {
    let deadline = Instant::now() + timeout;
    let header = proxy.local_header();
    let Greeted {
        mut replies,
        mut writer,
        ..
    } = greet(
        address,
        header.as_deref(),
        timeout,
        ReplyCodec::new(CHECK_MAX_LINE, CHECK_MAX_LINES),
        CHECK_BUFFER,
        own,
    )
    .await?;
    let _ = tokio::time::timeout_at(deadline, async {
        if writer.write_all(b"QUIT\r\n").await.is_ok() {
            let _ = replies.next().await;
        }
    })
    .await;
    Ok(())
}

/// `base` moved by up to ±5 %.
pub(crate) fn jittered(base: Duration) -> Duration {
    base.mul_f64(1.0 - JITTER + 2.0 * JITTER * fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(rise: u32, fall: u32) -> HealthPolicy {
        HealthPolicy::new(Duration::from_secs(5), Duration::from_secs(2), rise, fall).unwrap()
    }

    #[test]
    fn starts_up_and_one_failure_takes_it_down() {
        let mut h = Health::new(&policy(2, 3));
        assert!(h.is_up());
        assert_eq!(h.apply(HealthEvent::CheckFailed), Some(Transition::Down));
        assert!(!h.is_up());
    }

    #[test]
    fn fully_up_takes_fall_failures() {
        let mut h = Health::new(&policy(2, 3));
        assert_eq!(h.apply(HealthEvent::CheckPassed), None);
        assert!(!h.in_transition(), "fully up");
        assert_eq!(h.apply(HealthEvent::CheckFailed), None);
        assert!(h.in_transition());
        assert_eq!(h.apply(HealthEvent::PassiveFailure), None);
        assert_eq!(h.apply(HealthEvent::CheckFailed), Some(Transition::Down));
    }

    #[test]
    fn a_success_in_between_resets_the_failures() {
        let mut h = Health::new(&policy(2, 3));
        h.apply(HealthEvent::CheckPassed);
        h.apply(HealthEvent::CheckFailed);
        h.apply(HealthEvent::CheckFailed);
        assert_eq!(h.apply(HealthEvent::CheckPassed), None);
        h.apply(HealthEvent::CheckFailed);
        h.apply(HealthEvent::CheckFailed);
        assert!(h.is_up(), "two failures after the reset");
    }

    #[test]
    fn down_needs_rise_consecutive_successes() {
        let mut h = Health::new(&policy(2, 3));
        h.apply(HealthEvent::CheckFailed);
        assert_eq!(h.apply(HealthEvent::CheckPassed), None);
        assert_eq!(h.apply(HealthEvent::CheckFailed), None, "back to zero");
        assert_eq!(h.apply(HealthEvent::CheckPassed), None);
        assert_eq!(h.apply(HealthEvent::CheckPassed), Some(Transition::Up));
        assert!(!h.in_transition(), "fully up at once");
    }

    #[test]
    fn sessions_confirm_but_never_revive() {
        let mut h = Health::new(&policy(2, 3));
        assert_eq!(h.apply(HealthEvent::PassiveSuccess), None);
        assert!(!h.in_transition(), "confirmed: fully up");
        for _ in 0..3 {
            h.apply(HealthEvent::PassiveFailure);
        }
        assert!(!h.is_up());
        for _ in 0..10 {
            assert_eq!(h.apply(HealthEvent::PassiveSuccess), None);
        }
        assert!(!h.is_up());
    }

    #[test]
    fn policy_bounds() {
        let s = Duration::from_secs;
        assert_eq!(
            HealthPolicy::new(s(0), s(1), 1, 1),
            Err(HealthPolicyError::Interval)
        );
        assert_eq!(
            HealthPolicy::new(s(2), s(3), 1, 1),
            Err(HealthPolicyError::Timeout)
        );
        assert_eq!(
            HealthPolicy::new(s(2), s(2), 0, 1),
            Err(HealthPolicyError::Rise)
        );
        assert_eq!(
            HealthPolicy::new(s(2), s(2), 1, 101),
            Err(HealthPolicyError::Fall)
        );
        let p = HealthPolicy::default();
        assert_eq!((p.rise(), p.fall()), (2, 3));
        assert_eq!(p.fast_interval(), s(1));
        // 5.25 + 3 × 2 + 2 × 1.05
        assert_eq!(p.down_within(), Duration::from_millis(13_350));
    }

    #[test]
    fn jitter_stays_within_five_percent() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(100));
            assert!(d >= Duration::from_secs(95) && d <= Duration::from_secs(105));
        }
    }

    fn event() -> impl Strategy<Value = HealthEvent> {
        prop_oneof![
            Just(HealthEvent::CheckPassed),
            Just(HealthEvent::CheckFailed),
            Just(HealthEvent::PassiveFailure),
            Just(HealthEvent::PassiveSuccess),
        ]
    }

    proptest! {
        /// Up exactly as HAProxy counts: a transition is reported once per
        /// change; an up server goes down only after `fall` failures in a
        /// row since its last success (one while unconfirmed), a down one
        /// comes up only after `rise` passed checks in a row.
        #[test]
        fn follows_rise_and_fall(
            rise in 1u32..5,
            fall in 1u32..5,
            events in prop::collection::vec(event(), 0..100),
        ) {
            let mut h = Health::new(&policy(rise, fall));
            let mut up = true;
            let mut confirmed = false;
            let mut failures = 0;
            let mut passes = 0;
            for e in events {
                let t = h.apply(e);
                match e {
                    HealthEvent::CheckFailed | HealthEvent::PassiveFailure => {
                        failures += 1;
                        passes = 0;
                    }
                    HealthEvent::CheckPassed => {
                        passes += 1;
                        failures = 0;
                    }
                    HealthEvent::PassiveSuccess => {
                        if up {
                            failures = 0;
                        }
                    }
                }
                let want_down = up && failures >= if confirmed { fall } else { 1 };
                let want_up = !up && passes >= rise;
                match t {
                    Some(Transition::Down) => prop_assert!(want_down),
                    Some(Transition::Up) => prop_assert!(want_up),
                    None => prop_assert!(!want_down && !want_up),
                }
                if t.is_some() {
                    up = !up;
                    failures = 0;
                    passes = 0;
                }
                if up && matches!(e, HealthEvent::CheckPassed | HealthEvent::PassiveSuccess) {
                    confirmed = true;
                }
                if t == Some(Transition::Up) {
                    confirmed = true;
                }
                prop_assert_eq!(h.is_up(), up);
            }
        }
    }
}
