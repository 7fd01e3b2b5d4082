//! `popgate oauth login ACCOUNT` and `popgate oauth status`: the operator's
//! side of OAuth accounts.
//!
//! `login` gets an account's first token — authorization code with PKCE
//! (the redirected address pasted back, or a loopback listener), device
//! code, or client credentials, as the account is configured — and stores
//! it. `status` shows each account's token state and expiry. Neither ever
//! prints a token, a code or a secret.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use super::Grant;
pub use super::connect::format_utc;
use super::connect::{Connector, describe, effective_oauth, oauth_account, store_description};
use super::flows::{self, FlowError};
use crate::auth::accounts::config::{AccountConfig, AccountsSetup};
use crate::auth::tokens::{open_store, unix_now};

/// How `login` gets the authorization code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginMethod {
    /// Print the URL; read the redirected address from the input.
    Paste,
    /// Print the URL; receive the redirect on a loopback listener.
    Listen,
    /// RFC 8628 device code.
    Device,
}

/// The user who must own the files `oauth keygen` and `oauth login` write:
/// the user the service runs as (`User=popgate` in the systemd unit), or
/// it cannot read them and stops with "Permission denied".
#[derive(Debug, Clone)]
pub struct Owner {
    name: String,
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
}

impl Owner {
    pub fn lookup(name: &str) -> anyhow::Result<Owner> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| anyhow::anyhow!("looking up user {name}: {e}"))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no user {name} on this system (the packaged unit's user is created by \
                     deploy/systemd/popgate.sysusers: `systemd-sysusers popgate.sysusers`)"
                )
            })?;
        Ok(Owner { name: name.to_string(), uid: user.uid, gid: user.gid })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gives `path` to this user (and its group).
    pub fn apply(&self, path: &Path) -> anyhow::Result<()> {
        nix::unistd::chown(path, Some(self.uid), Some(self.gid))
            .map_err(|e| anyhow::anyhow!("chown {}:{} {}: {e}", self.name, self.gid, path.display()))
    }

    /// Which owner files written by `command` get: `--owner USER` if
    /// given. Run as root without it, the files would belong to root and
    /// the service could not read them: refused, with the command lines to
    /// run instead (`sudo -u popgate …` too when `as_service_user_works`:
    /// the service user can write where the command writes). `command` is
    /// the command as typed, without `--owner`.
    pub fn for_files(owner: Option<&str>, command: &str, as_service_user_works: bool) -> anyhow::Result<Option<Owner>> {
        match owner {
            Some(name) => Owner::lookup(name).map(Some),
            None if nix::unistd::geteuid().is_root() => {
                let sudo = if as_service_user_works {
                    format!("    sudo -u popgate {command}\nor give the files to that user:\n")
                } else {
                    String::new()
                };
                anyhow::bail!(
                    "running as root, this would leave files owned by root that the popgate service \
                     (User=popgate) cannot read. Run instead:\n{sudo}    {command} --owner popgate\n\
                     (`--owner root` if popgate really runs as root)"
                )
            }
            None => Ok(None),
        }
    }
}

/// How long a person has to sign in.
const SIGN_IN_TIME: Duration = Duration::from_secs(15 * 60);

/// Gets and stores a token for `name`. Prompts go to `out`; a pasted
/// address is read from `input`.
pub async fn login(
    config: AccountsSetup<'_>,
    name: &str,
    method: LoginMethod,
    input: impl BufRead + Send + 'static,
    out: &mut (impl Write + Send),
) -> anyhow::Result<()> {
    let account = oauth_account(config, name)?;
    let oauth = effective_oauth(config, account).expect("an OAuth account");
    let connector = Connector::for_account(config, name)?;

    let connected = match (connector.client.grant, method) {
        (Grant::ClientCredentials, _) => {
            writeln!(out, "Requesting an app-only token for `{name}` (client credentials)…")?;
            connector.client_credentials().await?
        }
        (Grant::AuthorizationCode, LoginMethod::Device) => {
            let device = connector.start_device().await?;
            match &device.message {
                Some(message) => writeln!(out, "{message}")?,
                None => writeln!(
                    out,
                    "On any device, open {} and enter the code {}",
                    device.verification_uri, device.user_code
                )?,
            }
            if let Some(complete) = &device.verification_uri_complete {
                writeln!(out, "(or open {complete})")?;
            }
            if let Some(login) = &account.login {
                writeln!(out, "Sign in as {login}.")?;
            }
            writeln!(out, "Waiting for the sign-in (up to {} minutes)…", device.expires_in / 60)?;
            out.flush()?;
            connector.finish_device(&device).await?
        }
        (Grant::AuthorizationCode, LoginMethod::Paste | LoginMethod::Listen) => {
            let (redirect_uri, listener) = if method == LoginMethod::Listen {
                let configured = url::Url::parse(&oauth.redirect_uri)?;
                let port = configured.port().unwrap_or(0);
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on 127.0.0.1:{port} for the redirect: {e}"))?;
                let port = listener.local_addr()?.port();
                (flows::loopback_redirect_uri(&oauth.redirect_uri, port)?, Some(listener))
            } else {
                (oauth.redirect_uri.clone(), None)
            };
            let (url, flow) = connector.start_code(&redirect_uri)?;
            writeln!(
                out,
                "Open this address in a browser and sign in as {}:",
                account.login.as_deref().unwrap_or("the mailbox's user")
            )?;
            writeln!(out)?;
            writeln!(out, "{url}")?;
            writeln!(out)?;
            let code = match listener {
                Some(listener) => {
                    writeln!(out, "Waiting for the browser to come back to {redirect_uri} …")?;
                    out.flush()?;
                    flows::receive_redirect(listener, &flow.state, SIGN_IN_TIME).await?
                }
                None => {
                    writeln!(
                        out,
                        "The browser is then sent to {redirect_uri}…; that page may fail to load, which is fine.\nPaste the whole address from the browser's address bar here and press Enter:"
                    )?;
                    out.flush()?;
                    let pasted = read_line(input).await?;
                    flows::code_from_redirect(&pasted, &flow.state)?
                }
            };
            connector.finish_code(&flow, &code).await?
        }
    };

    if connected.no_refresh_issued {
        writeln!(
            out,
            "Warning: the provider issued no refresh token, so popgate cannot renew this token. Google issues one only with consent (revoke popgate's access in the Google account and sign in again); Microsoft needs the offline_access scope."
        )?;
    }
    writeln!(out, "Stored a token for `{name}` in {}: {}.", connector.store_name, connected.summary)?;
    out.flush()?;
    Ok(())
}

async fn read_line(input: impl BufRead + Send + 'static) -> Result<String, FlowError> {
    tokio::task::spawn_blocking(move || {
        let mut input = input;
        let mut line = String::new();
        input.read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| FlowError::Io(std::io::Error::other(e)))?
    .map_err(FlowError::Io)
}

/// Prints every OAuth account's token state. Fails only if the store
/// cannot be read (e.g. a wrong key).
pub async fn status(config: AccountsSetup<'_>, out: &mut impl Write) -> anyhow::Result<()> {
    let accounts: Vec<&AccountConfig> = config.accounts.iter().filter(|a| a.oauth.is_some()).collect();
    if accounts.is_empty() {
        writeln!(out, "No OAuth accounts are configured.")?;
        return Ok(());
    }
    let store_config = config.token_store.ok_or_else(|| anyhow::anyhow!("no [token_store] in the configuration"))?;
    let store = open_store(store_config, config.state)?;
    let mut tokens = store.load_all().await?;
    let now = unix_now();
    writeln!(
        out,
        "Token store: {} ({})",
        store_description(store_config, config.state),
        if store_config.refresh { "this process refreshes" } else { "read-only replica" }
    )?;
    for account in accounts {
        let oauth = account.oauth.as_ref().expect("filtered");
        let notes = store.notes(&account.name).await.unwrap_or_default();
        let mut noted = String::new();
        if let Some(at) = notes.last_refresh {
            noted.push_str(&format!("; last refresh {}", format_utc(at)));
        }
        if let Some(at) = notes.last_invalid_grant {
            noted.push_str(&format!("; last invalid_grant {}", format_utc(at)));
        }
        let state = match tokens.remove(&account.name) {
            Some(token) if notes.needs_sign_in(&token) => format!(
                "{}; obtained {}{noted}; NEEDS SIGN-IN (the refresh token was refused): run `popgate oauth login {}`",
                describe(&token, now),
                format_utc(token.obtained_at),
                account.name
            ),
            Some(token) => format!("{}; obtained {}{noted}", describe(&token, now), format_utc(token.obtained_at)),
            None if oauth.grant == Grant::ClientCredentials => "no token yet (requested at first use)".into(),
            None => format!("NO TOKEN: run `popgate oauth login {}`", account.name),
        };
        let grant = match oauth.grant {
            Grant::AuthorizationCode => "authorization code",
            Grant::ClientCredentials => "client credentials",
        };
        let devices = account.device.iter().filter(|d| d.enabled).count();
        writeln!(
            out,
            "{}: {} ({grant}) as {}, {devices} enabled device(s): {state}",
            account.name,
            oauth.provider.name(),
            account.login.as_deref().unwrap_or("?")
        )?;
    }
    for (name, token) in tokens {
        writeln!(out, "{name}: (not configured) {}", describe(&token, now))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_utc(4_102_444_799), "2099-12-31 23:59:59 UTC");
    }
}
