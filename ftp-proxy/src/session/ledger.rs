//! Reply accounting: which replies the server still owes, and who waits
//! for each.
//!
//! The server answers commands in the order it received them, each with any
//! number of preliminary (`1xx`) replies and then one final reply (RFC 959
//! §4.2). The ledger records every command the gateway sends to the server
//! with who waits for its replies: the client (relay them), the gateway's
//! own transfer machinery (its `PASV`/`PORT` toward the server, a transfer
//! command, an `ABOR`), or nobody any more (an abandoned transfer). Each
//! reply is matched to the oldest open entry, and the final reply closes
//! it. A reply that comes late is therefore still matched to its own
//! command, and swallowed when nobody waits for it, instead of answering
//! the client's next command; the client is never made to wait for it.
//!
//! Two departures from strict order, both from RFC 959:
//! - `STAT` during a transfer is answered while the transfer runs
//!   (§4.1.3): a `211`/`212`/`213` reply while the oldest entry is a
//!   transfer and a `STAT` is owed belongs to the `STAT`.
//! - `ABOR` gets two replies when it ends a running transfer and one
//!   otherwise (§4.1.3); a server that gave fewer than expected leaves an
//!   entry open. Such an entry can be made *optional*: it takes a
//!   `225`/`226` that comes next, and is skipped by any other reply.
//!
//! Pure: no I/O, no clocks. The session keeps the timers.

use std::collections::VecDeque;

use crate::protocol::{Reply, Verb};

/// What the gateway's transfer machinery sent, so that the transfer knows
/// which of its commands a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// `PASV`/`EPSV`/`PORT`/`EPRT` toward the server.
    Setup,
    /// The transfer command (`RETR`, `STOR`, `LIST`…).
    Command,
    /// `ABOR`.
    Abort,
}

/// Who waits for an entry's replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waiter {
    /// The client: the replies are relayed to it.
    Client,
    /// The transfer machinery, for this step.
    Transfer(Step),
    /// Nobody any more: the replies are swallowed.
    Nobody,
}

/// Identifies an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryId(u64);

#[derive(Debug, Clone)]
struct Entry {
    id: EntryId,
    verb: Verb,
    waiter: Waiter,
    /// A transfer command (its reply may be overtaken by a STAT reply).
    transfer: bool,
    /// Skipped by a reply other than 225/226.
    optional: bool,
}

/// Whose reply a reply is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attribution {
    /// The entry.
    pub(crate) id: EntryId,
    /// Its command's verb.
    pub(crate) verb: Verb,
    /// Who waits for it.
    pub(crate) waiter: Waiter,
    /// Whether this reply was the entry's final one.
    pub(crate) last: bool,
}

/// The replies the server owes, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    owed: VecDeque<Entry>,
    next: u64,
}

/// Replies to `STAT` (RFC 959 §4.2.2: 211 system status, 212 directory
/// status, 213 file status).
fn is_status_reply(code: u16) -> bool {
    matches!(code, 211..=213)
}

/// Replies that close an `ABOR` (RFC 959 §4.1.3).
fn is_abort_reply(code: u16) -> bool {
    matches!(code, 225 | 226)
}

impl Ledger {
    /// An empty ledger.
    pub(crate) fn new() -> Ledger {
        Ledger::default()
    }

    /// Records that `verb` was sent to the server, with `waiter` waiting
    /// for its replies.
    pub(crate) fn sent(&mut self, verb: &Verb, waiter: Waiter) -> EntryId {
        let id = EntryId(self.next);
        self.next += 1;
        self.owed.push_back(Entry {
            id,
            verb: verb.clone(),
            waiter,
            transfer: verb.is_transfer(),
            optional: false,
        });
        id
    }

    /// Matches a reply from the server to the command it answers; `None`
    /// when nothing is owed (an unsolicited reply, such as `421` before
    /// the server closes).
    pub(crate) fn on_reply(&mut self, reply: &Reply) -> Option<Attribution> {
        // Optional entries a non-matching reply passes by.
        while self
            .owed
            .front()
            .is_some_and(|e| e.optional && !is_abort_reply(reply.code))
        {
            self.owed.pop_front();
        }
        let index = match self.owed.front() {
            None => return None,
            Some(head) if head.transfer && is_status_reply(reply.code) => self
                .owed
                .iter()
                .position(|e| e.verb == Verb::Stat)
                .unwrap_or(0),
            Some(_) => 0,
        };
        let last = !reply.is_preliminary();
        let entry = if last {
            self.owed.remove(index)?
        } else {
            self.owed.get(index)?.clone()
        };
        Some(Attribution {
            id: entry.id,
            verb: entry.verb,
            waiter: entry.waiter,
            last,
        })
    }

    /// Nobody waits for the transfer machinery's entries any more: the
    /// transfer is over, its owed replies are swallowed when they come.
    pub(crate) fn forsake_transfer(&mut self) {
        for entry in &mut self.owed {
            if matches!(entry.waiter, Waiter::Transfer(_)) {
                entry.waiter = Waiter::Nobody;
            }
        }
    }

    /// The entry will not be waited for: it swallows a `225`/`226` if one
    /// comes before any other reply, and is skipped otherwise.
    pub(crate) fn make_optional(&mut self, id: EntryId) {
        if let Some(entry) = self.owed.iter_mut().find(|e| e.id == id) {
            entry.optional = true;
            entry.waiter = Waiter::Nobody;
        }
    }

    /// Whether the client waits for a reply.
    pub(crate) fn owes_client(&self) -> bool {
        self.owed.iter().any(|e| e.waiter == Waiter::Client)
    }

    #[cfg(test)]
    /// Whether anything is owed.
    pub(crate) fn is_empty(&self) -> bool {
        self.owed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16) -> Reply {
        Reply::new(code, "x")
    }

    fn owner(ledger: &mut Ledger, code: u16) -> Option<(Waiter, bool)> {
        ledger.on_reply(&reply(code)).map(|a| (a.waiter, a.last))
    }

    #[test]
    fn replies_go_to_commands_in_order_with_preliminaries() {
        let mut l = Ledger::new();
        l.sent(&Verb::Retr, Waiter::Transfer(Step::Command));
        l.sent(&Verb::Noop, Waiter::Client);
        assert!(l.owes_client());
        assert_eq!(
            owner(&mut l, 150),
            Some((Waiter::Transfer(Step::Command), false))
        );
        assert_eq!(
            owner(&mut l, 226),
            Some((Waiter::Transfer(Step::Command), true))
        );
        assert_eq!(owner(&mut l, 200), Some((Waiter::Client, true)));
        assert!(l.is_empty() && !l.owes_client());
        assert_eq!(owner(&mut l, 421), None, "unsolicited");
    }

    /// The bug of issue 11: after an abandoned transfer the server's late
    /// final reply must not answer the client's next command.
    #[test]
    fn a_forsaken_reply_is_swallowed_whenever_it_comes() {
        let mut l = Ledger::new();
        l.sent(&Verb::Port, Waiter::Transfer(Step::Setup));
        assert_eq!(
            owner(&mut l, 200),
            Some((Waiter::Transfer(Step::Setup), true))
        );
        l.sent(&Verb::Retr, Waiter::Transfer(Step::Command));
        assert_eq!(
            owner(&mut l, 150),
            Some((Waiter::Transfer(Step::Command), false))
        );
        // The data connection failed: the gateway answered 425 itself.
        l.forsake_transfer();
        assert!(!l.owes_client(), "the client does not wait for it");
        // The client's next command goes out at once.
        l.sent(&Verb::Pwd, Waiter::Client);
        // The late final reply of the transfer, then PWD's reply.
        assert_eq!(owner(&mut l, 425), Some((Waiter::Nobody, true)));
        assert_eq!(owner(&mut l, 257), Some((Waiter::Client, true)));
        assert!(l.is_empty());
    }

    #[test]
    fn stat_may_overtake_a_running_transfer() {
        let mut l = Ledger::new();
        l.sent(&Verb::Retr, Waiter::Transfer(Step::Command));
        assert_eq!(
            owner(&mut l, 150),
            Some((Waiter::Transfer(Step::Command), false))
        );
        l.sent(&Verb::Stat, Waiter::Client);
        l.sent(&Verb::Noop, Waiter::Client);
        assert_eq!(owner(&mut l, 213), Some((Waiter::Client, true)));
        assert_eq!(
            owner(&mut l, 226),
            Some((Waiter::Transfer(Step::Command), true))
        );
        assert_eq!(owner(&mut l, 200), Some((Waiter::Client, true)));
        // Without a running transfer, a 211 is just the next reply.
        l.sent(&Verb::Noop, Waiter::Client);
        l.sent(&Verb::Stat, Waiter::Client);
        let first = l.on_reply(&reply(211)).unwrap();
        assert_eq!(first.verb, Verb::Noop);
    }

    #[test]
    fn an_optional_abor_entry_takes_a_late_226_or_lets_others_pass() {
        let mut l = Ledger::new();
        let abor = l.sent(&Verb::Abor, Waiter::Transfer(Step::Abort));
        l.make_optional(abor);
        assert!(!l.owes_client());
        l.sent(&Verb::Noop, Waiter::Client);
        assert_eq!(owner(&mut l, 226), Some((Waiter::Nobody, true)));
        assert_eq!(owner(&mut l, 200), Some((Waiter::Client, true)));
        let abor = l.sent(&Verb::Abor, Waiter::Transfer(Step::Abort));
        l.make_optional(abor);
        l.sent(&Verb::Pwd, Waiter::Client);
        assert_eq!(owner(&mut l, 257), Some((Waiter::Client, true)));
        assert!(l.is_empty());
    }

    proptest::proptest! {
        /// Whatever the replies, each command's final reply closes exactly
        /// its entry: after as many final replies as commands (with any
        /// preliminaries between), nothing is owed, and a forsaken entry
        /// never reaches the client.
        #[test]
        fn every_final_reply_closes_one_entry(
            commands in proptest::collection::vec((0u8..4, proptest::bool::ANY), 1..20),
            preliminaries in proptest::collection::vec(0usize..3, 20),
        ) {
            let mut l = Ledger::new();
            let verbs = [Verb::Noop, Verb::Retr, Verb::Pwd, Verb::Abor];
            let mut expected = Vec::new();
            for (i, (verb, forsaken)) in commands.iter().enumerate() {
                let waiter = if *forsaken { Waiter::Transfer(Step::Command) } else { Waiter::Client };
                let id = l.sent(&verbs[usize::from(*verb)], waiter);
                expected.push((id, *forsaken));
                if i % 3 == 2 {
                    l.forsake_transfer();
                }
            }
            l.forsake_transfer();
            for (i, (id, forsaken)) in expected.iter().enumerate() {
                for _ in 0..preliminaries[i] {
                    let a = l.on_reply(&reply(150)).unwrap();
                    proptest::prop_assert_eq!(a.id, *id);
                    proptest::prop_assert!(!a.last);
                }
                let a = l.on_reply(&reply(250)).unwrap();
                proptest::prop_assert_eq!(a.id, *id);
                proptest::prop_assert!(a.last);
                proptest::prop_assert_eq!(a.waiter == Waiter::Client, !forsaken);
            }
            proptest::prop_assert!(l.is_empty());
        }
    }
}
