//! The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz`,
//! `/readyz` and `/flows`, served with hyper 1.
//!
//! Probes stay fast under load (issue 13, item 7): `/healthz` and `/readyz`
//! answer within a second while a thousand idle or slow connections are
//! held on the port. So:
//! - accepting never waits for a free slot: past [`MAX_CONNECTIONS`] a new
//!   connection sheds the oldest one that is idle (not serving a request)
//!   and older than [`SHED_AGE`]; past [`HARD_MAX_CONNECTIONS`] the oldest
//!   idle one whatever its age, and only when every connection is busy is
//!   the new one closed at once. A probe sends its request at once and is
//!   answered in a few milliseconds, well within its first [`SHED_AGE`];
//!   the connections shed are the old idle ones, the holders;
//! - request headers have [`HEADER_TIMEOUT`] from the connection's start
//!   (hyper arms it before the first byte), and there is one request per
//!   connection (no keep-alive), so nothing idles after its answer;
//! - `/healthz` and `/readyz` are answered on the connection's task from
//!   atomics; only `/metrics` and `/flows`, which read the kernel's flow
//!   table, go to the blocking pool;
//! - the listener's backlog is 1024 (`crate::Listeners`), so a burst waits
//!   in the kernel instead of having its SYNs dropped.
//!
//! Other bounds: a deadline for a whole connection, small request buffers.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::Metrics;

/// HTTP connections kept at once when older ones are idle; a new one past
/// this sheds the oldest idle one older than [`SHED_AGE`].
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// HTTP connections at most; a new one past this sheds the oldest idle one,
/// or is closed at once when all are serving requests.
pub(crate) const HARD_MAX_CONNECTIONS: usize = 1024;
/// Below the hard bound, a connection this young is never shed: a
/// connection accepted in a burst must get the chance to send its request
/// and be answered before it counts as a holder.
pub(crate) const SHED_AGE: Duration = Duration::from_secs(1);
/// Time allowed to send the request headers, from the connection's start.
/// Probes and scrapers send theirs in the first round trip.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for a whole connection (a slow reader of `/metrics`).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether any server is up, asked at each `/readyz`.
type ServersUp = Box<dyn Fn() -> bool + Send + Sync>;

/// What `/readyz` reports.
#[derive(Default)]
pub(crate) struct Readiness {
    listening: AtomicBool,
    tracker_required: AtomicBool,
    tracker_attached: AtomicBool,
    servers_up: OnceLock<ServersUp>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

impl Readiness {
    /// The client listeners are accepting.
    pub(crate) fn set_listening(&self, on: bool) {
        self.listening.store(on, Ordering::Relaxed);
    }

    /// Whether readiness needs the flow tracker (`--ebpf required`), and whether it is attached.
    pub(crate) fn set_tracker(&self, required: bool, attached: bool) {
        self.tracker_required.store(required, Ordering::Relaxed);
        self.tracker_attached.store(attached, Ordering::Relaxed);
    }

    /// Readiness needs a server that is up, as `any_up` says (the pool's
    /// health; cheap, called at each `/readyz`). Set once.
    pub(crate) fn set_servers(&self, any_up: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.servers_up.set(Box::new(any_up));
    }

    fn ready(&self) -> Result<(), &'static str> {
        if !self.listening.load(Ordering::Relaxed) {
            return Err("not accepting sessions");
        }
        if self.tracker_required.load(Ordering::Relaxed)
            && !self.tracker_attached.load(Ordering::Relaxed)
        {
            return Err("flow tracker required but not attached");
        }
        if self.servers_up.get().is_some_and(|any_up| !any_up()) {
            return Err("no server is up");
        }
        Ok(())
    }
}

/// Produces the `/flows` document.
pub(crate) type FlowsSource = Arc<dyn Fn() -> String + Send + Sync>;

/// Brings the gauges read from elsewhere (the kernel's flow table) up to
/// date; runs before each `/metrics` encoding.
pub(crate) type MetricsRefresh = Arc<dyn Fn() + Send + Sync>;

/// What the endpoint serves.
#[derive(Clone)]
pub(crate) struct HttpState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Run before `/metrics` is encoded.
    pub refresh: MetricsRefresh,
    /// Readiness.
    pub readiness: Arc<Readiness>,
    /// The `/flows` document.
    pub flows: FlowsSource,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Routes one request. Pure apart from reading the state.
pub(crate) fn respond(state: &HttpState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz" | "/flows");
    if !known {
        return text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz or /flows\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET\n",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => {
            (state.refresh)();
            let mut response = text(StatusCode::OK, state.metrics.encode());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match state.readiness.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => {
            let mut response = text(StatusCode::OK, (state.flows)());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
    }
}

/// Whether a request is answered from memory, on the connection's task:
/// everything but `GET`/`HEAD` of `/metrics` and `/flows`.
fn is_cheap(method: &Method, path: &str) -> bool {
    !(matches!(path, "/metrics" | "/flows") && (method == Method::GET || method == Method::HEAD))
}

/// One open connection, oldest first in [`Slots`].
struct Slot {
    id: u64,
    opened: Instant,
    /// Serving a request now: not to be shed.
    busy: Arc<AtomicBool>,
    /// Cancelled to shed the connection.
    shed: CancellationToken,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Slots {
    next: u64,
    open: VecDeque<Slot>,
}

/// A connection's place in [`Slots`].
struct Admitted {
    id: u64,
    busy: Arc<AtomicBool>,
    shed: CancellationToken,
}

impl Slots {
    /// Registers a connection accepted at `now`, shedding another to stay
    /// within the bounds (see the module's notes). `None`: close the new
    /// one, every connection is busy. Says whether one was shed.
    fn admit(&mut self, now: Instant) -> (Option<Admitted>, bool) {
        let mut shed = false;
        if self.open.len() >= MAX_CONNECTIONS {
            let hard = self.open.len() >= HARD_MAX_CONNECTIONS;
            let victim = self.open.iter().position(|s| {
                !s.busy.load(Ordering::Relaxed)
                    && (hard || now.saturating_duration_since(s.opened) >= SHED_AGE)
            });
            match victim {
                Some(at) => {
                    if let Some(slot) = self.open.remove(at) {
                        slot.shed.cancel();
                        shed = true;
                    }
                }
                None if hard => return (None, false),
                None => {}
            }
        }
        let admitted = Admitted {
            id: self.next,
            busy: Arc::new(AtomicBool::new(false)),
            shed: CancellationToken::new(),
        };
        self.next += 1;
        self.open.push_back(Slot {
            id: admitted.id,
            opened: now,
            busy: Arc::clone(&admitted.busy),
            shed: admitted.shed.clone(),
        });
        (Some(admitted), shed)
    }

    /// Forgets a connection that ended (or was shed).
    fn remove(&mut self, id: u64) {
        // Ids grow with each admission and the deque keeps that order.
        if let Ok(at) = self.open.binary_search_by_key(&id, |s| s.id) {
            self.open.remove(at);
        }
    }
}

/// Removes its connection from the slots when the connection's task ends.
struct Leave {
    slots: Arc<Mutex<Slots>>,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(self.id);
    }
}

/// Marks a connection busy while a request is served.
struct Busy(Arc<AtomicBool>);

impl Busy {
    fn new(flag: &Arc<AtomicBool>) -> Busy {
        flag.store(true, Ordering::Relaxed);
        Busy(Arc::clone(flag))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Serves HTTP on `listener` until `shutdown` is cancelled. Accepting never
/// waits on the connections already open (see the module's notes).
pub(crate) async fn serve(listener: TcpListener, state: HttpState, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(addr = %addr, "metrics endpoint listening");
    }
    let slots = Arc::new(Mutex::new(Slots::default()));
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (admitted, shed) = slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .admit(Instant::now());
        if shed {
            state.metrics.http_connection_shed();
        }
        let Some(Admitted { id, busy, shed }) = admitted else {
            debug!(client = %peer, "metrics endpoint: every connection busy, closing the new one");
            state.metrics.http_connection_shed();
            continue;
        };
        let state = state.clone();
        let leave = Leave {
            slots: Arc::clone(&slots),
            id,
        };
        tracker.spawn(async move {
            let _leave = leave;
            tokio::select! {
                () = shed.cancelled() => debug!(client = %peer, "metrics endpoint: idle connection shed"),
                () = serve_connection(stream, peer, state, busy) => {}
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: HttpState,
    busy: Arc<AtomicBool>,
) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let state = state.clone();
        let busy = Busy::new(&busy);
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        async move {
            let _busy = busy;
            let response = if is_cheap(&method, &path) {
                respond(&state, &method, &path)
            } else {
                // /metrics and /flows read the kernel's flow table, a system
                // call or two per flow: not on a worker that runs sessions.
                tokio::task::spawn_blocking(move || respond(&state, &method, &path))
                    .await
                    .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"))
            };
            Ok::<_, Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(client = %peer, error = %e, "metrics endpoint: connection error"),
        Err(_) => debug!(client = %peer, "metrics endpoint: connection deadline"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> HttpState {
        HttpState {
            metrics: Arc::new(Metrics::new().unwrap()),
            refresh: Arc::new(|| {}),
            readiness: Arc::new(Readiness::default()),
            flows: Arc::new(|| "{\"flows\":[]}".to_owned()),
        }
    }

    #[test]
    fn routes() {
        let s = state();
        assert_eq!(
            respond(&s, &Method::GET, "/metrics").status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&s, &Method::HEAD, "/healthz").status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&s, &Method::GET, "/nope").status(),
            StatusCode::NOT_FOUND
        );
        let r = respond(&s, &Method::POST, "/metrics");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "GET, HEAD");
        assert_eq!(
            respond(&s, &Method::GET, "/flows").headers()[CONTENT_TYPE],
            "application/json"
        );
    }

    #[test]
    fn readiness() {
        let s = state();
        assert_eq!(
            respond(&s, &Method::GET, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        s.readiness.set_listening(true);
        assert_eq!(
            respond(&s, &Method::GET, "/readyz").status(),
            StatusCode::OK
        );
        s.readiness.set_tracker(true, false);
        assert_eq!(
            respond(&s, &Method::GET, "/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        s.readiness.set_tracker(true, true);
        assert_eq!(
            respond(&s, &Method::GET, "/readyz").status(),
            StatusCode::OK
        );
        let up = Arc::new(AtomicBool::new(true));
        s.readiness.set_servers({
            let up = Arc::clone(&up);
            move || up.load(Ordering::Relaxed)
        });
        assert_eq!(
            respond(&s, &Method::GET, "/readyz").status(),
            StatusCode::OK
        );
        up.store(false, Ordering::Relaxed);
        let r = respond(&s, &Method::GET, "/readyz");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            respond(&s, &Method::GET, "/healthz").status(),
            StatusCode::OK,
            "alive all the same"
        );
    }

    #[test]
    fn cheap_requests_are_answered_inline() {
        assert!(is_cheap(&Method::GET, "/healthz"));
        assert!(is_cheap(&Method::HEAD, "/readyz"));
        assert!(is_cheap(&Method::POST, "/metrics"), "405 from memory");
        assert!(is_cheap(&Method::GET, "/nope"));
        assert!(!is_cheap(&Method::GET, "/metrics"));
        assert!(!is_cheap(&Method::HEAD, "/flows"));
    }

    #[test]
    fn the_oldest_idle_connection_is_shed_never_a_busy_or_young_one() {
        let start = Instant::now();
        let later = start + SHED_AGE;
        let mut slots = Slots::default();
        let admitted: Vec<Admitted> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let (a, shed) = slots.admit(start);
                assert!(!shed);
                a.unwrap()
            })
            .collect();
        // All young: the soft bound does not shed them.
        let (young, shed) = slots.admit(start);
        assert!(!shed);
        slots.remove(young.unwrap().id);
        // Old enough, and the two oldest are serving requests: the third goes.
        admitted[0].busy.store(true, Ordering::Relaxed);
        admitted[1].busy.store(true, Ordering::Relaxed);
        let (new, shed) = slots.admit(later);
        let new = new.unwrap();
        assert!(shed);
        assert!(!admitted[0].shed.is_cancelled() && !admitted[1].shed.is_cancelled());
        assert!(admitted[2].shed.is_cancelled());
        assert_eq!(slots.open.len(), MAX_CONNECTIONS);
        slots.remove(admitted[2].id);
        assert_eq!(slots.open.len(), MAX_CONNECTIONS, "already gone");
        slots.remove(admitted[5].id);
        assert_eq!(slots.open.len(), MAX_CONNECTIONS - 1);
        // With the old ones busy, young connections fill up to the hard
        // bound; there the oldest idle one goes, young as it is.
        for a in admitted.iter().chain([&new]) {
            a.busy.store(true, Ordering::Relaxed);
        }
        let mut extra = Vec::new();
        while slots.open.len() < HARD_MAX_CONNECTIONS {
            let (a, shed) = slots.admit(later);
            assert!(!shed);
            extra.push(a.unwrap());
        }
        let (last, shed) = slots.admit(later);
        assert!(shed && extra[0].shed.is_cancelled());
        // All busy at the hard bound: the new one is refused.
        last.unwrap().busy.store(true, Ordering::Relaxed);
        for a in &extra {
            a.busy.store(true, Ordering::Relaxed);
        }
        let (refused, shed) = slots.admit(later);
        assert!(refused.is_none() && !shed);
        assert_eq!(slots.open.len(), HARD_MAX_CONNECTIONS);
    }
}
