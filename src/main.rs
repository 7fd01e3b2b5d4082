//! The `popgate` command: `serve` (the default), `check-config`, `passwd`
//! (a device password's hash) and `oauth` (`login`, `status`, `keygen`).

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use popgate::auth::accounts::router::AccountRouter;
use popgate::auth::accounts::{PassThrough, Router};
use popgate::auth::oauth::commands::{self, LoginMethod};
use popgate::backend::select::BackendConfig;
use popgate::config::Config;
use popgate::server::Server;
use popgate::server::admin::AdminServer;
use popgate::server::config::ListenerConfig;
use popgate::telemetry::Metrics;

/// Where `oauth` subcommands look for the configuration by default.
const DEFAULT_CONFIG: &str = "/etc/popgate/popgate.toml";

#[derive(Parser)]
#[command(name = "popgate", version, about = "A POP3 gateway to IMAP, JMAP, Gmail API and Microsoft Graph mailboxes")]
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
    /// Read a device password (without echo on a terminal; one line from
    /// standard input otherwise) and print its Argon2id hash for
    /// `password_hash`.
    Passwd,
    /// OAuth tokens of mapped accounts.
    #[command(subcommand)]
    Oauth(OauthCommand),
}

#[derive(Subcommand)]
enum OauthCommand {
    /// Sign in once for ACCOUNT and store its token: prints an address to
    /// open in any browser, then reads the address the browser was sent to
    /// (works over SSH and `kubectl exec`).
    Login {
        account: String,
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Receive the browser's redirect on 127.0.0.1 instead (a browser
        /// on this machine; redirect_uri must be http://localhost or
        /// http://127.0.0.1).
        #[arg(long, conflicts_with = "device")]
        listen: bool,
        /// Device code flow (RFC 8628): enter a short code on any device
        /// (Microsoft; not Google for Gmail).
        #[arg(long)]
        device: bool,
    },
    /// Show each OAuth account's token state and expiry (never the token).
    Status {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Write a new random token store key to FILE (mode 0600; refuses to
    /// overwrite).
    Keygen { file: PathBuf },
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
    /// jmap+http://host:port/path, jmap+https://…, gmail:[LABEL],
    /// graph:[FOLDER], demo: or demo:DIR; replaces the configured backend.
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
        Command::Passwd => passwd(),
        Command::Oauth(command) => oauth(command),
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

fn passwd() -> anyhow::Result<()> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Device password: ").context("reading the password")?;
        let again = rpassword::prompt_password("Again: ").context("reading the password")?;
        if first != again {
            anyhow::bail!("the two passwords differ");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    if password.is_empty() {
        anyhow::bail!("empty password");
    }
    if password.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n')) {
        anyhow::bail!("a POP3 password cannot contain NUL, CR or LF");
    }
    println!("{}", popgate::auth::passwords::hash_password(&password)?);
    Ok(())
}

fn oauth(command: OauthCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match command {
        OauthCommand::Login { account, config, listen, device } => {
            let config = Config::load(&config)?;
            let method = match (listen, device) {
                (true, _) => LoginMethod::Listen,
                (_, true) => LoginMethod::Device,
                _ => LoginMethod::Paste,
            };
            let stdin = std::io::BufReader::new(std::io::stdin());
            let mut stdout = std::io::stdout();
            runtime.block_on(commands::login(config.accounts(), &account, method, stdin, &mut stdout))
        }
        OauthCommand::Status { config } => {
            let config = Config::load(&config)?;
            runtime.block_on(commands::status(config.accounts(), &mut std::io::stdout()))
        }
        OauthCommand::Keygen { file } => keygen(&file),
    }
}

fn keygen(file: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("creating {}", file.display()))?;
    writeln!(out, "{}", popgate::auth::tokens::StoreKey::generate_text())?;
    out.sync_all()?;
    eprintln!(
        "Wrote a new token store key to {} (mode 0600). Back it up: without it the stored tokens are lost.",
        file.display()
    );
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
        let metrics = Arc::new(Metrics::new());
        let (router, accounts): (Arc<dyn Router>, _) = if config.account.is_empty() {
            let pass_through = PassThrough::new(config.backend.build()?);
            (Arc::new(pass_through.labelled_by_login(config.admin.metrics_login_names)), None)
        } else {
            let router = AccountRouter::new(config.accounts(), metrics.clone(), BackendConfig::build)?;
            router.spawn_token_upkeep(Duration::from_secs(30));
            (router.clone(), Some(router))
        };
        let mut server = Server::start(&config, router, metrics).await?;
        let admin = if config.admin.enabled {
            Some(AdminServer::start(config.admin.address, server.metrics(), server.health()).await?)
        } else {
            None
        };
        match &accounts {
            None => tracing::info!(backend = %config.backend.describe(), "popgate ready"),
            Some(_) => tracing::info!(accounts = config.account.len(), "popgate ready"),
        }
        popgate::server::systemd::ready();
        wait_for_shutdown_signal(&mut server, &args, &config, log_reload.as_ref()).await;
        tracing::info!(grace_secs = config.limits.shutdown_grace_secs, "shutting down");
        popgate::server::systemd::stopping();
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
                    ("backends", new.backends != current.backends),
                    ("account", new.account != current.account),
                    ("token_store", new.token_store != current.token_store),
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
