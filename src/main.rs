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
use popgate::auth::accounts::reloadable::ReloadableRouter;
use popgate::auth::accounts::router::AccountRouter;
use popgate::auth::accounts::{PassThrough, Router};
use popgate::auth::oauth::commands::{self, LoginMethod};
use popgate::backend::select::BackendConfig;
use popgate::config::Config;
use popgate::server::Server;
use popgate::server::admin::AdminServer;
use popgate::server::admin::guard::Guard;
use popgate::server::admin::page::{LiveFleet, Page};
use popgate::server::config::ListenerConfig;
use popgate::telemetry::Metrics;

/// Where `oauth` subcommands look for the configuration by default.
const DEFAULT_CONFIG: &str = "/etc/popgate/popgate.toml";

#[derive(Parser)]
#[command(
    name = "popgate",
    version,
    about = "A POP3 gateway to IMAP, JMAP, Gmail API and Microsoft Graph mailboxes",
    long_about = "A POP3 gateway to IMAP, JMAP, Gmail API and Microsoft Graph mailboxes.\n\n\
        Without a command it serves: `popgate -c FILE` is `popgate serve -c FILE`.\n\
        Every key of the file can also be set by an environment variable POPGATE_SECTION__KEY \
        (a double underscore between the parts of its path: POPGATE_LIMITS__MAX_CONNECTIONS=200, \
        POPGATE_LISTENER__0__ADDRESS=0.0.0.0:110). Precedence: flag > environment > file.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default; with no configuration, the demo backend
    /// on 127.0.0.1:1110).
    Serve(ServeArgs),
    /// Validate a configuration file (with the POPGATE_… settings of the
    /// environment) and what it names — certificates, keys, secrets, the
    /// token store — then print the effective configuration. What it
    /// accepts, `serve` starts with (run it as the user popgate runs as).
    CheckConfig {
        #[arg(env = "POPGATE_CONFIG")]
        file: PathBuf,
    },
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
        #[arg(long, short, env = "POPGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Give the token store file to USER (the user popgate runs as):
        /// needed when running as root.
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
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
        #[arg(long, short, env = "POPGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Write a new random token store key to FILE (mode 0600; refuses to
    /// overwrite).
    Keygen {
        file: PathBuf,
        /// Give FILE to USER (the user popgate runs as): needed when
        /// running as root.
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
    },
}

#[derive(clap::Args, Default, Clone)]
struct ServeArgs {
    /// Configuration file (TOML).
    #[arg(long, short, env = "POPGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable; comma-separated in POPGATE_LISTEN);
    /// replaces the configured listeners.
    #[arg(long = "listen", value_name = "ADDR", env = "POPGATE_LISTEN", value_delimiter = ',')]
    listen: Vec<SocketAddr>,
    /// Accept cleartext logins (USER/PASS, AUTH without TLS) on the --listen
    /// listeners from this network, e.g. 192.168.1.0/24 (repeatable): for
    /// printers and scanners that cannot do TLS. Loopback is always allowed.
    #[arg(
        long = "allow-cleartext-from",
        value_name = "CIDR",
        env = "POPGATE_ALLOW_CLEARTEXT_FROM",
        value_delimiter = ',',
        requires = "listen"
    )]
    allow_cleartext_from: Vec<ipnet::IpNet>,
    /// Backend URL: imap://host:port[/mailbox], imap+starttls://…, imaps://…,
    /// jmap+http://host:port/path, jmap+https://…, gmail:[LABEL],
    /// graph:[FOLDER], demo: or demo:DIR; replaces the configured backend.
    #[arg(long, value_name = "URL", env = "POPGATE_BACKEND")]
    backend: Option<String>,
    /// Address of the admin HTTP listener (/metrics, /healthz, /readyz);
    /// replaces `[admin] address`.
    #[arg(long, value_name = "ADDR", env = "POPGATE_ADMIN")]
    admin: Option<SocketAddr>,
    /// Do not start the admin HTTP listener.
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,
    /// State shared between replicas: redis://host:port/db or rediss://…
    /// (no password in it: `[state] password_file`/`password_env`);
    /// replaces `[state] url`.
    #[arg(long = "state", value_name = "URL", env = "POPGATE_STATE")]
    state: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve(cli.serve)) {
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

/// The file with the environment's POPGATE_… settings on top.
fn load_config(path: Option<&Path>) -> anyhow::Result<(Config, Vec<String>)> {
    Ok(Config::load_layered(path, std::env::vars())?)
}

fn check_config(file: &Path) -> anyhow::Result<()> {
    let (config, from_env) = load_config(Some(file))?;
    // The admin page's state file is checked with what it changes.
    let config = config.with_admin_state()?;
    ready_to_serve(&config)?;
    println!("{}", toml::to_string_pretty(&config).context("printing the configuration")?);
    for warning in ListenerConfig::login_warnings(&config.listener) {
        eprintln!("warning: {warning}");
    }
    if !from_env.is_empty() {
        eprintln!("settings from the environment: {}", from_env.join(", "));
    }
    eprintln!("{}: OK", file.display());
    Ok(())
}

/// What `serve` needs besides its sockets, built and thrown away: the
/// files and secrets the configuration names, every backend and the
/// accounts' router. Whatever passes this, `serve` starts with.
fn ready_to_serve(config: &Config) -> anyhow::Result<()> {
    config.check_usable()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let _router = build_router(config, Arc::new(Metrics::new()))?;
        anyhow::Ok(())
    })
}

/// The router logins go through, and the accounts' router behind it, if any
/// (for the token upkeep).
type Routing = (Arc<dyn Router>, Option<Arc<AccountRouter>>);

/// Pass-through to `[backend]` without accounts; the accounts' router with.
fn build_router(config: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Routing> {
    if config.account.is_empty() {
        let backend = config.backend.build().map_err(|e| anyhow::anyhow!("backend: {e}"))?;
        Ok((Arc::new(PassThrough::new(backend).labelled_by_login(config.admin.metrics_login_names)), None))
    } else {
        let router = AccountRouter::new(config.accounts(), metrics, BackendConfig::build)?;
        Ok((router.clone(), Some(router)))
    }
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
        OauthCommand::Login { account, config: path, listen, device, owner } => {
            let (config, _) = load_config(Some(&path))?;
            // The service user can write the token store's directory
            // (StateDirectory): `sudo -u popgate` works here.
            let typed = format!("popgate oauth login {account} -c {}", path.display());
            let owner = commands::Owner::for_files(owner.as_deref(), &typed, true)?;
            let method = match (listen, device) {
                (true, _) => LoginMethod::Listen,
                (_, true) => LoginMethod::Device,
                _ => LoginMethod::Paste,
            };
            let stdin = std::io::BufReader::new(std::io::stdin());
            let mut stdout = std::io::stdout();
            runtime.block_on(commands::login(config.accounts(), &account, method, stdin, &mut stdout))?;
            if let (Some(owner), Some(store)) = (owner, &config.token_store) {
                owner.apply(&store.path)?;
                eprintln!("{} now belongs to {}.", store.path.display(), owner.name());
            }
            Ok(())
        }
        OauthCommand::Status { config } => {
            let (config, _) = load_config(Some(&config))?;
            runtime.block_on(commands::status(config.accounts(), &mut std::io::stdout()))
        }
        OauthCommand::Keygen { file, owner } => {
            // /etc/popgate belongs to root: the service user cannot create
            // the key there, so only `--owner` is suggested.
            let typed = format!("popgate oauth keygen {}", file.display());
            let owner = commands::Owner::for_files(owner.as_deref(), &typed, false)?;
            keygen(&file, owner.as_ref())
        }
    }
}

fn keygen(file: &Path, owner: Option<&commands::Owner>) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("creating {}", file.display()))?;
    writeln!(out, "{}", popgate::auth::tokens::StoreKey::generate_text())?;
    out.sync_all()?;
    let owned = match owner {
        Some(owner) => {
            owner.apply(file)?;
            format!(", owner {}", owner.name())
        }
        None => String::new(),
    };
    eprintln!(
        "Wrote a new token store key to {} (mode 0600{owned}). Back it up: without it the stored tokens are lost.",
        file.display()
    );
    Ok(())
}

/// The configuration `serve` runs with: flags over the environment's
/// POPGATE_… settings over the file, with the admin page's device changes
/// laid over it.
fn effective_config(args: &ServeArgs) -> anyhow::Result<Config> {
    Ok(configured(args)?.with_admin_state()?)
}

/// Flags over the environment over the file (what the admin page lays its
/// state over).
fn configured(args: &ServeArgs) -> anyhow::Result<Config> {
    let (mut config, _) = load_config(args.config.as_deref())?;
    if !args.listen.is_empty() {
        config.listener = args
            .listen
            .iter()
            .map(|&address| ListenerConfig::plain(address).allowing_cleartext_from(&args.allow_cleartext_from))
            .collect();
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
    if let Some(url) = &args.state {
        config.state.url = Some(url.clone());
    }
    config.check()?;
    Ok(config)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = effective_config(&args)?;
    config.check_usable()?;
    let log_reload = popgate::telemetry::init(&config.log);
    for warning in ListenerConfig::login_warnings(&config.listener) {
        tracing::warn!("{warning}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let metrics = Arc::new(Metrics::new());
        // Before anything listens: a SIGTERM right after "ready" (or
        // READY=1) must be a graceful stop, not the default action's kill.
        let signals = Signals::install()?;
        let (router, accounts) = build_router(&config, metrics.clone())?;
        if let Some(accounts) = &accounts {
            accounts.spawn_token_upkeep(Duration::from_secs(30));
        }
        let router = Arc::new(ReloadableRouter::new(router));
        let mut server = Server::start(&config, router.clone(), metrics.clone()).await?;
        let admin = if config.admin.enabled {
            let page = admin_page(&config, &args, router.clone(), &server)?;
            Some(
                AdminServer::start_with_page(config.admin.address, server.metrics(), server.health(), Some(page))
                    .await?,
            )
        } else {
            None
        };
        match &accounts {
            None => tracing::info!(backend = %config.backend.describe(), "popgate ready"),
            Some(_) => tracing::info!(accounts = config.account.len(), "popgate ready"),
        }
        popgate::server::systemd::ready();
        let reload = Reload { router: &router, metrics, log: log_reload.as_ref() };
        wait_for_shutdown_signal(&mut server, &args, &config, reload, signals).await;
        tracing::info!(grace_secs = config.limits.shutdown_grace_secs, "shutting down");
        popgate::server::systemd::stopping();
        server.shutdown().await;
        if let Some(admin) = admin {
            admin.stop();
        }
        Ok(())
    })
}

/// The admin page: its changes rebuild `router` from the configuration
/// read again (as SIGHUP does for accounts).
fn admin_page(
    config: &Config,
    args: &ServeArgs,
    router: Arc<ReloadableRouter>,
    server: &popgate::server::RunningServer,
) -> anyhow::Result<Arc<Page>> {
    let guard = Guard::new(&config.admin, config.throttle.clone()).map_err(anyhow::Error::msg)?;
    let args = args.clone();
    let fleet = LiveFleet {
        router,
        metrics: server.metrics(),
        load: Box::new(move || configured(&args).map_err(|e| format!("{e:#}"))),
    };
    Ok(Arc::new(Page::new(guard, Arc::new(fleet), server.activity(), server.metrics(), server.health())))
}

/// What SIGHUP reloads besides the server's own settings.
struct Reload<'a> {
    router: &'a ReloadableRouter,
    metrics: Arc<Metrics>,
    log: Option<&'a popgate::telemetry::LogReload>,
}

impl Reload<'_> {
    /// Accounts, device users, `[backends]` and the token store: a new
    /// router for new logins (sessions in progress keep theirs). `[backend]`
    /// stays as it runs until a restart. On any error the old router stays.
    fn accounts(&self, running: &Config, new: &Config) -> Option<String> {
        if new.account == running.account && new.backends == running.backends && new.token_store == running.token_store
        {
            return None;
        }
        let routing = Config { backend: running.backend.clone(), ..new.clone() };
        let built = routing
            .check_usable()
            .map_err(anyhow::Error::from)
            .and_then(|()| build_router(&routing, self.metrics.clone()));
        Some(match built {
            Ok((router, accounts)) => {
                if let Some(accounts) = &accounts {
                    accounts.spawn_token_upkeep(Duration::from_secs(30));
                }
                self.router.replace(router);
                let devices: usize = new.account.iter().map(|a| a.device.iter().filter(|d| d.enabled).count()).sum();
                format!("accounts reloaded ({} accounts, {devices} enabled device users)", new.account.len())
            }
            Err(e) => format!("accounts NOT reloaded, the old ones stay: {e:#}"),
        })
    }
}

/// Waits for SIGTERM or SIGINT; on SIGHUP meanwhile, re-reads the
/// configuration and applies what can change without a restart.
/// The signal streams serve reacts to, installed before it listens.
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }
}

async fn wait_for_shutdown_signal(
    server: &mut popgate::server::RunningServer,
    args: &ServeArgs,
    running: &Config,
    reload: Reload<'_>,
    signals: Signals,
) {
    let log_reload = reload.log;
    let Signals { mut term, mut hup } = signals;
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
                changes.extend(reload.accounts(&current, &new));
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
