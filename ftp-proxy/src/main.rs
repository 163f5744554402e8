//! The `ftp-proxy` binary: parses the command line, sets up logging, binds,
//! and runs the gateway until a signal. Everything else is in the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ftp_proxy::config::{Action, Cli, Config, EXIT_CONFIG, LogFormat};
use tokio_util::sync::CancellationToken;

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.filter)
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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

fn main() -> ExitCode {
    let mut cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    let settings = std::mem::take(&mut cli.settings);
    let config = match cli.load(settings) {
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
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gateway failed");
            eprintln!("ftp-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let drain = config.timeouts.transfer_idle;
        let gateway = ftp_proxy::Gateway::bind(config).context("binding listeners")?;
        let shutdown = CancellationToken::new();
        let signals = tokio::spawn(wait_for_signal(shutdown.clone()));
        gateway.run(shutdown, drain).await;
        signals.abort();
        Ok(())
    })
}

/// SIGTERM: graceful (stop accepting, finish transfers). SIGINT: fast exit.
async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {
            tracing::info!("SIGTERM: graceful shutdown");
            shutdown.cancel();
        }
        _ = int.recv() => {
            tracing::info!("SIGINT: exiting now");
            std::process::exit(0);
        }
    }
    // A second SIGTERM or a SIGINT during the drain ends it at once.
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("second signal: exiting now");
    let _ = tokio::time::timeout(Duration::from_millis(10), std::future::pending::<()>()).await;
    std::process::exit(0);
}
