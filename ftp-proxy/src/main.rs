//! The `ftp-proxy` binary: parses the command line, sets up logging, binds,
//! and runs the gateway until a signal. Everything else is in the library.
//!
//! Signals: SIGTERM drains (stop accepting, let transfers finish up to
//! `--drain-timeout`, exit 0); SIGINT exits at once; SIGHUP reloads the
//! configuration file (new sessions use it; an invalid file is refused and
//! the running configuration kept). Under systemd, READY/RELOADING/STOPPING
//! are reported with sd_notify.
//!
//! A hidden `manual --out-dir DIR` command writes the man pages and shell
//! completions ([`ftp_proxy::manual`]); it is added here, not to `Cli`, so
//! that the manual and the completions, generated from `Cli`, never name
//! it.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use ftp_proxy::Listeners;
use ftp_proxy::config::{Action, Cli, Config, EXIT_CONFIG, LogFormat, Settings};
use ftp_proxy::flowtrack::{FlowTracker, FlowtrackOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.filter)
        .unwrap_or_else(|_| "info".into());
    // Colours only for a person at a terminal: journald, files and log
    // shippers get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// The hidden command that writes the manual.
const MANUAL: &str = "manual";

fn manual_command() -> clap::Command {
    clap::Command::new(MANUAL)
        .hide(true)
        .about("Write the man pages and shell completions (for packaging)")
        .arg(
            clap::Arg::new("out-dir")
                .long("out-dir")
                .value_name("DIR")
                .required(true)
                .value_parser(clap::value_parser!(std::path::PathBuf)),
        )
}

/// Writes every file of [`ftp_proxy::manual`] into `dir`.
fn write_manual(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let completions = ftp_proxy::manual::SHELLS.map(ftp_proxy::manual::completion);
    for file in ftp_proxy::manual::man_pages()
        .into_iter()
        .chain(completions)
    {
        let path = dir.join(&file.name);
        std::fs::write(&path, &file.contents)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// What the command line asks for.
enum Invocation {
    /// The gateway, or one of `Cli`'s commands.
    Cli(Box<Cli>),
    /// The hidden `manual` command.
    Manual(std::path::PathBuf),
}

/// `Cli::try_parse`, with the hidden command beside it.
fn parse() -> Result<Invocation, clap::Error> {
    let mut matches = Cli::command()
        .subcommand(manual_command())
        .try_get_matches()?;
    if let Some((MANUAL, args)) = matches.subcommand()
        && let Some(dir) = args.get_one::<std::path::PathBuf>("out-dir")
    {
        return Ok(Invocation::Manual(dir.clone()));
    }
    Cli::from_arg_matches_mut(&mut matches)
        .map(|cli| Invocation::Cli(Box::new(cli)))
        .map_err(|e| e.format(&mut Cli::command()))
}

fn main() -> ExitCode {
    let mut cli = match parse() {
        Ok(Invocation::Cli(cli)) => *cli,
        Ok(Invocation::Manual(dir)) => {
            return match write_manual(&dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ftp-proxy manual: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    let settings = std::mem::take(&mut cli.settings);
    if let Some(Action::Flows { from, json }) = &cli.command {
        let from = match from {
            Some(addr) => *addr,
            None => match cli.load(settings.clone()).map(|c| c.metrics) {
                Ok(Some(addr)) => addr,
                Ok(None) => {
                    eprintln!(
                        "ftp-proxy flows: give --from ADDR:PORT (the gateway's --metrics address)"
                    );
                    return ExitCode::from(EXIT_CONFIG as u8);
                }
                Err(e) => {
                    eprintln!("ftp-proxy flows: configuration error: {e}");
                    return ExitCode::from(EXIT_CONFIG as u8);
                }
            },
        };
        return match fetch_flows(from).and_then(|doc| {
            if *json {
                Ok(doc)
            } else {
                ftp_proxy::flows::render_table(&doc).map_err(anyhow::Error::msg)
            }
        }) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ftp-proxy flows: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match cli.load(settings.clone()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ftp-proxy: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if cli.check_config || matches!(cli.command, Some(Action::CheckConfig)) {
        println!("configuration OK\n{config:#?}");
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    match serve(config, cli, settings) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gateway failed");
            eprintln!("ftp-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// GET /flows from a running gateway.
fn fetch_flows(from: std::net::SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&from, std::time::Duration::from_secs(5))
        .with_context(|| format!("connecting to the gateway's metrics endpoint {from}"))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    stream.write_all(b"GET /flows HTTP/1.0\r\nHost: ftp-proxy\r\n\r\n")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .context("reading /flows")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!(
            "{from}/flows answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_owned())
}

/// Loads and attaches the flow tracker as `--ebpf` says.
fn start_tracker(config: &Config) -> anyhow::Result<Option<FlowTracker>> {
    let options = FlowtrackOptions {
        interfaces: config.interfaces.clone(),
        ports: Vec::new(),
        // At most two data listeners a session (passive toward the client,
        // active toward the server), and room for reloads that raise the
        // limit: the map is not preallocated, entries cost only while used.
        max_expectations: u32::try_from(config.limits.max_sessions.saturating_mul(2))
            .unwrap_or(u32::MAX)
            .clamp(1 << 16, 1 << 22),
        ingress: config.ebpf_ingress,
        ..FlowtrackOptions::default()
    };
    let tracker = FlowTracker::start_with_mode(config.ebpf, &options)
        .context("--ebpf required: the flow tracker cannot run")?;
    if tracker.is_some() {
        tracing::info!(interfaces = ?config.interfaces, "eBPF flow tracker attached");
    }
    Ok(tracker)
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    // Outside systemd NOTIFY_SOCKET is unset and this does nothing.
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

fn serve(config: Config, cli: Cli, settings: Settings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let listeners = Listeners::bind(&config).context("binding listeners")?;
        let tracker = start_tracker(&config)?;
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = watch::channel(Arc::new(config.clone()));
        let signals = tokio::spawn(handle_signals(shutdown.clone(), reload_tx, cli, settings));
        notify(&[sd_notify::NotifyState::Ready]);
        let result = ftp_proxy::run(config, listeners, tracker, shutdown, reload_rx).await;
        signals.abort();
        result.context("running the gateway")
    })
}

/// SIGTERM: graceful. SIGINT (or a second SIGTERM): exit now. SIGHUP: reload.
async fn handle_signals(
    shutdown: CancellationToken,
    reload: watch::Sender<Arc<Config>>,
    cli: Cli,
    settings: Settings,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                if shutdown.is_cancelled() {
                    tracing::info!("second SIGTERM: exiting now");
                    std::process::exit(0);
                }
                tracing::info!("SIGTERM: graceful shutdown");
                notify(&[sd_notify::NotifyState::Stopping]);
                shutdown.cancel();
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: exiting now");
                std::process::exit(0);
            }
            _ = hup.recv() => {
                notify(&[sd_notify::NotifyState::Reloading]);
                match cli.load(settings.clone()) {
                    Ok(config) => {
                        tracing::info!("SIGHUP: configuration file read");
                        reload.send_replace(Arc::new(config));
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: invalid configuration refused, keeping the running one"),
                }
                notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
}
