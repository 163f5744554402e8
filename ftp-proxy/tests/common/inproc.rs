//! The gateway's real wiring (`ftp_proxy::run`) started inside the test
//! process on 127.0.0.1:0, and a small async FTP client to drive it: the
//! unprivileged tier, which needs no root and no system packages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ftp_proxy::config::Cli;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

/// How long a test waits for any one reply before failing.
pub const REPLY_WAIT: Duration = Duration::from_secs(20);

/// The gateway running in this process; shut down on drop.
pub struct InProcess {
    pub addr: SocketAddr,
    /// The first implicit FTPS listener, if any.
    pub implicit_addr: Option<SocketAddr>,
    pub metrics_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), ftp_proxy::StartError>>>,
    _reloads: watch::Sender<Arc<ftp_proxy::Config>>,
}

impl InProcess {
    /// Starts the gateway in front of `upstream` with extra command-line
    /// arguments.
    pub fn start(upstream: SocketAddr, extra: &[&str]) -> InProcess {
        let upstream = upstream.to_string();
        let mut args = vec!["--upstream", upstream.as_str()];
        args.extend_from_slice(extra);
        InProcess::start_with(&args)
    }

    /// Starts the gateway with these arguments besides the listen and
    /// metrics addresses (the servers among them: `--upstream`, or a
    /// `--config` file with `[[servers]]`).
    pub fn start_with(extra: &[&str]) -> InProcess {
        // FTPX_SHOW_LOGS=1 shows the gateway's logs (debug level).
        if std::env::var_os("FTPX_SHOW_LOGS").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("debug")
                .with_test_writer()
                .try_init();
        }
        let mut args = vec![
            "ftp-proxy",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--ebpf",
            "off",
        ];
        args.extend_from_slice(extra);
        let mut cli = Cli::try_parse_from(args).unwrap();
        let settings = std::mem::take(&mut cli.settings);
        let config = cli.load(settings).unwrap();
        let listeners = ftp_proxy::Listeners::bind(&config).unwrap();
        let addr = listeners.control_addrs()[0];
        let implicit_addr = listeners.implicit_addrs().first().copied();
        let metrics_addr = listeners.metrics_addr().unwrap();
        let (reloads_tx, reloads) = watch::channel(Arc::new(config.clone()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ftp_proxy::run(
            config,
            listeners,
            None,
            shutdown.clone(),
            reloads,
        ));
        InProcess {
            addr,
            implicit_addr,
            metrics_addr,
            shutdown,
            task: Some(task),
            _reloads: reloads_tx,
        }
    }

    /// GET `path` from the HTTP endpoint: (status line, body).
    pub async fn http(&self, path: &str) -> (String, String) {
        let mut stream = TcpStream::connect(self.metrics_addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        tokio::time::timeout(REPLY_WAIT, stream.read_to_string(&mut response))
            .await
            .unwrap()
            .unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    /// The value of a metric, e.g. `ftp_proxy_rejected_total{reason="bounce"}`:
    /// the sum over every series of that name whose labels include the
    /// ones given (0 when there is none).
    pub async fn metric(&self, selector: &str) -> f64 {
        let (_, body) = self.http("/metrics").await;
        metric_value(&body, selector)
    }

    /// Waits until `/readyz` says 200: the listeners accept from when
    /// `start` returns, but readiness turns on once the accept loops run.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + REPLY_WAIT;
        loop {
            let (status, body) = self.http("/readyz").await;
            if status.contains("200") {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not ready: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until a metric reaches `want` (sessions end asynchronously).
    pub async fn wait_metric(&self, series: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + REPLY_WAIT;
        loop {
            let now = self.metric(series).await;
            if now == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} is {now}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful shutdown; waits for the drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(REPLY_WAIT, task)
                .await
                .expect("the gateway drains in time")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Sums the series of an exposition that a selector `name{a="b",...}`
/// matches (a series may carry more labels than the selector names).
pub fn metric_value(exposition: &str, selector: &str) -> f64 {
    let (name, wanted) = match selector.split_once('{') {
        Some((name, labels)) => (name, labels.trim_end_matches('}')),
        None => (selector, ""),
    };
    let wanted: Vec<&str> = wanted.split(',').filter(|l| !l.is_empty()).collect();
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels: Vec<&str> = labels.split(',').collect();
            (series_name == name && wanted.iter().all(|w| labels.contains(w)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The code of a reply.
pub fn code(reply: &str) -> u16 {
    reply.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// A control connection driven by hand, plain or TLS.
pub struct FtpClient {
    conn: Conn,
}

enum Conn {
    Plain {
        rx: BufReader<OwnedReadHalf>,
        tx: OwnedWriteHalf,
    },
    Tls {
        rx: BufReader<tokio::io::ReadHalf<TlsStream<TcpStream>>>,
        tx: tokio::io::WriteHalf<TlsStream<TcpStream>>,
    },
    Gone,
}

fn name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from("localhost").unwrap()
}

impl FtpClient {
    fn plain(stream: TcpStream) -> FtpClient {
        let (rx, tx) = stream.into_split();
        FtpClient {
            conn: Conn::Plain {
                rx: BufReader::new(rx),
                tx,
            },
        }
    }

    fn tls(stream: TlsStream<TcpStream>) -> FtpClient {
        let (rx, tx) = tokio::io::split(stream);
        FtpClient {
            conn: Conn::Tls {
                rx: BufReader::new(rx),
                tx,
            },
        }
    }

    /// Connects and reads the banner.
    pub async fn connect(addr: SocketAddr) -> (FtpClient, String) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut client = FtpClient::plain(stream);
        let banner = client.reply().await;
        (client, banner)
    }

    /// Connects, checks the banner, and protects the control connection.
    pub async fn connect_tls(
        addr: SocketAddr,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> FtpClient {
        let (mut client, banner) = FtpClient::connect(addr).await;
        assert_eq!(code(&banner), 220, "{banner}");
        client.starttls(config).await;
        client
    }

    /// Implicit FTPS: the handshake, then the banner.
    pub async fn connect_implicit(
        addr: SocketAddr,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> FtpClient {
        let stream = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name(), stream)
            .await
            .unwrap();
        let mut client = FtpClient::tls(tls);
        let banner = client.reply().await;
        assert_eq!(code(&banner), 220, "{banner}");
        client
    }

    /// `AUTH TLS` and the handshake.
    pub async fn starttls(&mut self, config: std::sync::Arc<rustls::ClientConfig>) {
        self.starttls_with("AUTH TLS", config).await;
    }

    /// `command` (`AUTH TLS`, `AUTH SSL`...) and the handshake.
    pub async fn starttls_with(
        &mut self,
        command: &str,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) {
        let reply = self.cmd(command).await;
        assert_eq!(code(&reply), 234, "{reply}");
        let Conn::Plain { rx, tx } = std::mem::replace(&mut self.conn, Conn::Gone) else {
            panic!("not a plain control connection");
        };
        assert!(rx.buffer().is_empty(), "bytes after 234");
        let stream = rx.into_inner().reunite(tx).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name(), stream)
            .await
            .unwrap();
        *self = FtpClient::tls(tls);
    }

    /// Reads until the connection ends; whether it did within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut rest = Vec::new();
        let read = async {
            match &mut self.conn {
                Conn::Plain { rx, .. } => rx.read_to_end(&mut rest).await,
                Conn::Tls { rx, .. } => rx.read_to_end(&mut rest).await,
                Conn::Gone => Ok(0),
            }
        };
        tokio::time::timeout(wait, read).await.is_ok()
    }

    /// Connects, checks the banner and logs in.
    pub async fn login(addr: SocketAddr) -> FtpClient {
        let (mut client, banner) = FtpClient::connect(addr).await;
        assert_eq!(code(&banner), 220, "{banner}");
        assert_eq!(code(&client.cmd("USER test").await), 331);
        assert_eq!(code(&client.cmd("PASS secret").await), 230);
        client
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        match &mut self.conn {
            Conn::Plain { tx, .. } => tx.write_all(bytes).await.unwrap(),
            Conn::Tls { tx, .. } => tx.write_all(bytes).await.unwrap(),
            Conn::Gone => panic!("connection gone"),
        }
    }

    pub async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
    }

    /// The socket, for urgent data (plain connections only).
    pub fn socket(&self) -> socket2::SockRef<'_> {
        match &self.conn {
            Conn::Plain { tx, .. } => socket2::SockRef::from(tx.as_ref()),
            _ => panic!("not a plain control connection"),
        }
    }

    /// Reads one whole reply (multi-line aware), lines joined by '\n';
    /// `<closed>` when the connection ends. Fails after [`REPLY_WAIT`].
    pub async fn reply(&mut self) -> String {
        self.reply_within(REPLY_WAIT)
            .await
            .expect("a reply in time")
    }

    /// A reply within `wait`, or `None`.
    pub async fn reply_within(&mut self, wait: Duration) -> Option<String> {
        tokio::time::timeout(wait, async {
            let mut lines = Vec::new();
            let mut first_code = String::new();
            loop {
                let mut line = String::new();
                let n = match &mut self.conn {
                    Conn::Plain { rx, .. } => rx.read_line(&mut line).await,
                    Conn::Tls { rx, .. } => rx.read_line(&mut line).await,
                    Conn::Gone => Ok(0),
                };
                if n.unwrap_or(0) == 0 {
                    lines.push("<closed>".to_owned());
                    break;
                }
                let line = line.trim_end().to_owned();
                if first_code.is_empty() {
                    first_code = line.chars().take(3).collect();
                    let more = line.chars().nth(3) == Some('-');
                    lines.push(line);
                    if !more {
                        break;
                    }
                } else {
                    let end = line.starts_with(&first_code) && line.chars().nth(3) == Some(' ');
                    lines.push(line);
                    if end {
                        break;
                    }
                }
            }
            lines.join("\n")
        })
        .await
        .ok()
    }

    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(line).await;
        self.reply().await
    }

    /// EPSV: the gateway's data address.
    pub async fn epsv(&mut self, gateway: SocketAddr) -> SocketAddr {
        let reply = self.cmd("EPSV").await;
        assert_eq!(code(&reply), 229, "{reply}");
        let port: u16 = reply.split('|').nth(3).unwrap().parse().unwrap();
        SocketAddr::new(gateway.ip(), port)
    }

    /// PORT toward a fresh listener on 127.0.0.1.
    pub async fn port(&mut self) -> tokio::net::TcpListener {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let reply = self
            .cmd(&format!("PORT 127,0,0,1,{},{}", port / 256, port % 256))
            .await;
        assert_eq!(code(&reply), 200, "{reply}");
        listener
    }
}

/// A protected data connection to `at`, resuming through `config`'s store.
pub async fn tls_data(
    at: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> TlsStream<TcpStream> {
    let stream = TcpStream::connect(at).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name(), stream)
        .await
        .unwrap()
}

/// Reads a protected data connection to its end (its close_notify).
pub async fn read_all_tls(mut stream: TlsStream<TcpStream>) -> Vec<u8> {
    let mut data = Vec::new();
    tokio::time::timeout(REPLY_WAIT, stream.read_to_end(&mut data))
        .await
        .unwrap()
        .unwrap();
    data
}

/// Reads a data connection to its end.
pub async fn read_all(mut stream: TcpStream) -> Vec<u8> {
    let mut data = Vec::new();
    tokio::time::timeout(REPLY_WAIT, stream.read_to_end(&mut data))
        .await
        .unwrap()
        .unwrap();
    data
}
