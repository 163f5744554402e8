//! The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz`,
//! `/readyz` and `/flows`, served with hyper 1.
//!
//! Resources are bounded: a fixed number of connections at once, a deadline
//! for request headers (a client sending a byte a second is cut off), a
//! deadline for a whole connection, and small responses only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::Metrics;

/// HTTP connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// Time allowed to send the request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a whole connection (keep-alive included).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Serves HTTP on `listener` until `shutdown` is cancelled.
pub(crate) async fn serve(listener: TcpListener, state: HttpState, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(addr = %addr, "metrics endpoint listening");
    }
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
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
        let state = state.clone();
        tracker.spawn(async move {
            let _permit = permit;
            serve_connection(stream, peer, state).await;
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, state: HttpState) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let state = state.clone();
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        async move {
            // /metrics and /flows read the kernel's flow table, a system
            // call or two per flow: not on a worker that runs sessions.
            let response = tokio::task::spawn_blocking(move || respond(&state, &method, &path))
                .await
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"));
            Ok::<_, Infallible>(response)
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
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
}
