//! Per-user routing: which servers a user's session may go to, from
//! `[[routes]]`, `user@server` and `unknown-users`. Pure.
//!
//! Rules, in order:
//! 1. With `allow-user-at-server = true`, a `USER` argument is split at
//!    its **last** `@`; when what follows names a configured server, that
//!    server is asked for and the part before is the user name sent to it
//!    (`a@b@c` is user `a@b` on server `c`). When it names no server, the
//!    whole argument is the user name (`bob@example.com` keeps working).
//!    The split never names a host that is not configured: this is not a
//!    forward proxy.
//! 2. Routes are tried in the order of the file; the **first** route with a
//!    pattern matching the user name wins. A pattern is an exact name, or a
//!    prefix followed by `*` (`bob*` matches `bob` and `bobby`; `*` alone
//!    matches every name, the empty one included). Matching is
//!    **case-sensitive**, as FTP servers on Unix treat user names: `Alice`
//!    is not `alice`.
//! 3. A user that no route matches is refused (`unknown-users = "reject"`,
//!    the default: the session answers `530` as for a bad password, without
//!    contacting any server) or may go to any server of the pool
//!    (`unknown-users = "pool"`). Without any `[[routes]]`, every user goes
//!    to the pool.
//! 4. A server asked for with `user@server` must be one the user's route
//!    allows (any server for a user that goes to the pool); otherwise the
//!    session is refused the same way.
//!
//! Not here: choosing among the allowed servers ([`super::balance`]),
//! reading `USER` (the session).

use super::{PoolSpec, ServerName};

/// What happens to a user that no route matches (`unknown-users`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UnknownUsers {
    /// Refused with `530`, no server contacted.
    #[default]
    Reject,
    /// Sent to the whole pool.
    Pool,
}

/// A user name pattern of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UserPattern {
    /// This name exactly.
    Exact(String),
    /// Names starting with this (written with a trailing `*`).
    Prefix(String),
}

impl UserPattern {
    /// Parses `name` or `prefix*`.
    ///
    /// # Errors
    /// A sentence saying why: empty, or a `*` elsewhere than at the end.
    pub fn new(text: &str) -> Result<UserPattern, &'static str> {
        if text.is_empty() {
            return Err("an empty pattern matches nobody; use \"*\" for everyone");
        }
        let (stem, wildcard) = match text.strip_suffix('*') {
            Some(stem) => (stem, true),
            None => (text, false),
        };
        if stem.contains('*') {
            return Err("* is allowed only at the end");
        }
        if stem.chars().any(char::is_control) {
            return Err("control characters cannot be in a user name");
        }
        Ok(if wildcard {
            UserPattern::Prefix(stem.to_owned())
        } else {
            UserPattern::Exact(stem.to_owned())
        })
    }

    /// Whether `user` matches (case-sensitive).
    pub fn matches(&self, user: &str) -> bool {
        match self {
            UserPattern::Exact(name) => name == user,
            UserPattern::Prefix(stem) => user.starts_with(stem.as_str()),
        }
    }
}

/// One `[[routes]]` entry: at least one pattern, at least one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    users: Vec<UserPattern>,
    servers: Vec<ServerName>,
}

/// Why a route is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// `users = []`.
    #[error("a route needs at least one user pattern")]
    NoUsers,
    /// `servers = []`.
    #[error("a route needs at least one server")]
    NoServers,
}

impl Route {
    /// A route.
    ///
    /// # Errors
    /// [`RouteError`] for an empty list.
    pub fn new(users: Vec<UserPattern>, servers: Vec<ServerName>) -> Result<Route, RouteError> {
        if users.is_empty() {
            return Err(RouteError::NoUsers);
        }
        if servers.is_empty() {
            return Err(RouteError::NoServers);
        }
        Ok(Route { users, servers })
    }

    /// Its patterns.
    pub fn users(&self) -> &[UserPattern] {
        &self.users
    }

    /// Its servers.
    pub fn servers(&self) -> &[ServerName] {
        &self.servers
    }

    fn matches(&self, user: &str) -> bool {
        self.users.iter().any(|p| p.matches(user))
    }
}

/// The routing table with its two switches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Routes {
    routes: Vec<Route>,
    unknown_users: UnknownUsers,
    allow_user_at_server: bool,
}

/// Where a user's session may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Any server of the pool.
    Pool,
    /// One of these (the route's, or the one named with `user@server`).
    Servers(Vec<ServerName>),
}

impl Target {
    /// Whether a session may use the server `name`.
    pub fn allows(&self, name: &ServerName) -> bool {
        match self {
            Target::Pool => true,
            Target::Servers(names) => names.contains(name),
        }
    }
}

/// A routed `USER`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed<'a> {
    /// The user name to send to the server (without `@server`).
    pub user: &'a str,
    /// Where the session may go.
    pub target: Target,
}

/// Why a user is refused (the session answers `530`, the same as for a bad
/// password, so that user names cannot be probed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No route matches and `unknown-users = "reject"`.
    #[error("no route for this user")]
    UnknownUser,
    /// `user@server` names a server the user's route does not allow.
    #[error("this user may not use that server")]
    ServerNotAllowed,
}

impl Routes {
    /// A table. Every server a route names must be in the pool: the
    /// configuration checks that.
    pub fn new(
        routes: Vec<Route>,
        unknown_users: UnknownUsers,
        allow_user_at_server: bool,
    ) -> Routes {
        Routes {
            routes,
            unknown_users,
            allow_user_at_server,
        }
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// `unknown-users`.
    pub fn unknown_users(&self) -> UnknownUsers {
        self.unknown_users
    }

    /// `allow-user-at-server`.
    pub fn allow_user_at_server(&self) -> bool {
        self.allow_user_at_server
    }

    /// Whether the server depends on the user: there are routes, or users
    /// may name a server. Then the session must greet the client itself
    /// and choose the server at `USER`; otherwise it can choose at connect.
    pub fn depends_on_user(&self) -> bool {
        !self.routes.is_empty() || self.allow_user_at_server
    }

    /// Routes the argument of `USER` (see the module's rules).
    ///
    /// # Errors
    /// [`Refused`]: answer `530` and contact no server.
    pub fn route<'a>(&self, argument: &'a str, pool: &PoolSpec) -> Result<Routed<'a>, Refused> {
        let (user, named) = match argument.rsplit_once('@') {
            Some((user, server)) if self.allow_user_at_server => match pool.get(server) {
                Some(spec) => (user, Some(spec.name.clone())),
                None => (argument, None),
            },
            _ => (argument, None),
        };
        let route = self.routes.iter().find(|r| r.matches(user));
        let open = self.routes.is_empty() || self.unknown_users == UnknownUsers::Pool;
        let target = match (named, route) {
            (Some(server), Some(route)) if route.servers.contains(&server) => {
                Target::Servers(vec![server])
            }
            (Some(_), Some(_)) => return Err(Refused::ServerNotAllowed),
            (Some(server), None) if open => Target::Servers(vec![server]),
            (None, Some(route)) => Target::Servers(route.servers.clone()),
            (None, None) if open => Target::Pool,
            (_, None) => return Err(Refused::UnknownUser),
        };
        Ok(Routed { user, target })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Upstream;
    use crate::upstream::{Balance, HealthPolicy, ServerSpec, Weight};

    fn name(n: &str) -> ServerName {
        ServerName::new(n).unwrap()
    }

    fn pool(names: &[&str]) -> PoolSpec {
        PoolSpec::new(
            names
                .iter()
                .map(|n| ServerSpec {
                    name: name(n),
                    address: Upstream {
                        host: "h".into(),
                        port: 21,
                    },
                    weight: Weight::default(),
                })
                .collect(),
            Balance::default(),
            Some(HealthPolicy::default()),
        )
        .unwrap()
    }

    fn route(users: &[&str], servers: &[&str]) -> Route {
        Route::new(
            users.iter().map(|u| UserPattern::new(u).unwrap()).collect(),
            servers.iter().map(|s| name(s)).collect(),
        )
        .unwrap()
    }

    fn servers(names: &[&str]) -> Target {
        Target::Servers(names.iter().map(|n| name(n)).collect())
    }

    #[test]
    fn patterns() {
        assert_eq!(
            UserPattern::new("bob*"),
            Ok(UserPattern::Prefix("bob".into()))
        );
        assert_eq!(
            UserPattern::new("*"),
            Ok(UserPattern::Prefix(String::new()))
        );
        assert!(UserPattern::new("").is_err());
        assert!(UserPattern::new("a*b").is_err());
        assert!(UserPattern::new("**").is_err());
        assert!(UserPattern::new("a\nb").is_err());
        let bob = UserPattern::new("bob*").unwrap();
        assert!(bob.matches("bob") && bob.matches("bobby"));
        assert!(!bob.matches("Bob"), "case-sensitive");
        assert!(!UserPattern::new("alice").unwrap().matches("alice2"));
        assert!(UserPattern::new("*").unwrap().matches(""));
        assert_eq!(
            Route::new(vec![], vec![name("a")]),
            Err(RouteError::NoUsers)
        );
        assert_eq!(
            Route::new(vec![UserPattern::new("x").unwrap()], vec![]),
            Err(RouteError::NoServers)
        );
    }

    #[test]
    fn first_matching_route_wins() {
        let p = pool(&["a", "b", "c"]);
        let r = Routes::new(
            vec![
                route(&["alice", "bob*"], &["a"]),
                route(&["b*"], &["b", "c"]),
            ],
            UnknownUsers::Reject,
            false,
        );
        assert_eq!(r.route("alice", &p).unwrap().target, servers(&["a"]));
        assert_eq!(r.route("bobby", &p).unwrap().target, servers(&["a"]));
        assert_eq!(r.route("bert", &p).unwrap().target, servers(&["b", "c"]));
        assert_eq!(r.route("carol", &p), Err(Refused::UnknownUser));
        assert_eq!(r.route("", &p), Err(Refused::UnknownUser));
        assert!(r.depends_on_user());
        let pool_them = Routes::new(r.routes.clone(), UnknownUsers::Pool, false);
        assert_eq!(pool_them.route("carol", &p).unwrap().target, Target::Pool);
    }

    #[test]
    fn without_routes_everyone_goes_to_the_pool() {
        let p = pool(&["a"]);
        let r = Routes::default();
        assert!(!r.depends_on_user());
        let routed = r.route("anyone@a", &p).unwrap();
        assert_eq!((routed.user, routed.target), ("anyone@a", Target::Pool));
        assert_eq!(r.route("", &p).unwrap().target, Target::Pool);
    }

    #[test]
    fn user_at_server() {
        let p = pool(&["a", "b", "c"]);
        let r = Routes::new(
            vec![route(&["alice"], &["a", "b"])],
            UnknownUsers::Reject,
            true,
        );
        let routed = r.route("alice@b", &p).unwrap();
        assert_eq!((routed.user, routed.target), ("alice", servers(&["b"])));
        assert_eq!(r.route("alice@c", &p), Err(Refused::ServerNotAllowed));
        // Not a server: the whole string is the user, and no route has it.
        assert_eq!(r.route("alice@unknown", &p), Err(Refused::UnknownUser));
        assert_eq!(r.route("bob@a", &p), Err(Refused::UnknownUser));
        // The last @ splits.
        let open = Routes::new(vec![], UnknownUsers::Reject, true);
        let routed = open.route("a@b@c", &p).unwrap();
        assert_eq!((routed.user, routed.target), ("a@b", servers(&["c"])));
        let routed = open.route("a@b@nope", &p).unwrap();
        assert_eq!((routed.user, routed.target), ("a@b@nope", Target::Pool));
        let routed = open.route("@a", &p).unwrap();
        assert_eq!((routed.user, routed.target), ("", servers(&["a"])));
        let routed = open.route("x@", &p).unwrap();
        assert_eq!((routed.user, routed.target), ("x@", Target::Pool));
        // Names are lowercase: A is not a.
        assert_eq!(open.route("x@A", &p).unwrap().target, Target::Pool);
        assert!(open.depends_on_user());
        // Unknown users may name any server when they may use the pool.
        let pool_them = Routes::new(vec![route(&["alice"], &["a"])], UnknownUsers::Pool, true);
        assert_eq!(
            pool_them.route("bob@c", &p).unwrap().target,
            servers(&["c"])
        );
        // Not allowed: @ is part of the name.
        let off = Routes::new(
            vec![route(&["alice@b"], &["c"])],
            UnknownUsers::Reject,
            false,
        );
        let routed = off.route("alice@b", &p).unwrap();
        assert_eq!((routed.user, routed.target), ("alice@b", servers(&["c"])));
    }
}
