//! The `popgate` command: `serve` (the default) and `check-config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use popgate::config::{BackendConfig, Config, ListenerConfig};
use popgate::server::admin::AdminServer;
use popgate::server::{Server, build_backend};

#[derive(Parser)]
#[command(name = "popgate", version, about = "A POP3 gateway to IMAP and JMAP mailboxes")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default; with no configuration, the demo backend
    /// on 127.0.0.1:1110).
    Serve(ServeArgs),
    /// Validate a configuration file and print the effective configuration.
    CheckConfig { file: PathBuf },
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable); replaces the configured listeners.
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Backend URL: imap://host:port[/mailbox], imap+starttls://…, imaps://…,
    /// jmap+http://host:port/path, jmap+https://…, demo: or demo:DIR;
    /// replaces the configured backend.
    #[arg(long, value_name = "URL")]
    backend: Option<String>,
    /// Address of the admin HTTP listener (/metrics, /healthz, /readyz);
    /// replaces `[admin] address`.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Do not start the admin HTTP listener.
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args),
        Command::CheckConfig { file } => check_config(&file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("popgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    println!("{}", toml::to_string_pretty(&config).context("printing the configuration")?);
    eprintln!("{}: OK", file.display());
    Ok(())
}

fn effective_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if !args.listen.is_empty() {
        config.listener = args.listen.iter().map(|&address| ListenerConfig::plain(address)).collect();
    }
    if let Some(url) = &args.backend {
        config.backend = BackendConfig::from_url(url)?;
    }
    if let Some(address) = args.admin {
        config.admin.address = address;
        config.admin.enabled = true;
    }
    if args.no_admin {
        config.admin.enabled = false;
    }
    config.check()?;
    Ok(config)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = effective_config(&args)?;
    let log_reload = popgate::telemetry::init(&config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let backend = build_backend(&config.backend)?;
        let mut server = Server::start(&config, backend).await?;
        let admin = if config.admin.enabled {
            Some(AdminServer::start(config.admin.address, server.metrics(), server.health()).await?)
        } else {
            None
        };
        tracing::info!(backend = %config.backend.describe(), "popgate ready");
        wait_for_shutdown_signal(&mut server, &args, &config, log_reload.as_ref()).await;
        tracing::info!(grace_secs = config.limits.shutdown_grace_secs, "shutting down");
        server.shutdown().await;
        if let Some(admin) = admin {
            admin.stop();
        }
        Ok(())
    })
}

/// Waits for SIGTERM or SIGINT; on SIGHUP meanwhile, re-reads the
/// configuration and applies what can change without a restart.
async fn wait_for_shutdown_signal(
    server: &mut popgate::server::RunningServer,
    args: &ServeArgs,
    running: &Config,
    log_reload: Option<&popgate::telemetry::LogReload>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let mut current = running.clone();
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = tokio::signal::ctrl_c() => return,
            _ = hup.recv() => {
                let new = match effective_config(args) {
                    Ok(new) => new,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "SIGHUP: configuration invalid; nothing changed");
                        continue;
                    }
                };
                let mut changes = server.reload(&new);
                if new.log.level != current.log.level {
                    match log_reload.map(|r| r.set_level(&new.log.level)) {
                        Some(Ok(())) => changes.push(format!("log.level: {} -> {}", current.log.level, new.log.level)),
                        Some(Err(e)) => changes.push(format!("log.level NOT changed: {e}")),
                        None => {}
                    }
                }
                let needs_restart: Vec<&str> = [
                    ("listener", new.listener != current.listener),
                    ("backend", new.backend != current.backend),
                    ("backend_pool", new.backend_pool != current.backend_pool),
                    ("admin", new.admin != current.admin),
                    ("log.format", new.log.format != current.log.format),
                    ("tls.certificates (file list)", new.tls != current.tls),
                ]
                .into_iter()
                .filter_map(|(name, changed)| changed.then_some(name))
                .collect();
                if !needs_restart.is_empty() {
                    changes.push(format!("changed but need a restart: {}", needs_restart.join(", ")));
                }
                tracing::info!(changes = %changes.join("; "), "SIGHUP: configuration reloaded");
                current = new;
            }
        }
    }
}
