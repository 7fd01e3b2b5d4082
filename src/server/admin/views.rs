//! The admin page's HTML (maud: compiled into the binary, every value
//! escaped). Views take plain rows already stripped of secrets: nothing
//! here can reach a password, a token or a hash.

use maud::{DOCTYPE, Markup, html};

use crate::auth::oauth::commands::format_utc;
use crate::auth::oauth::connect::Connected;
use crate::server::activity::{DeviceActivity, Failure};
use crate::server::admin::connect::{DeviceStatus, DeviceView};

/// What the layout needs besides the body.
pub struct Frame<'a> {
    pub title: &'a str,
    pub csrf: &'a str,
    /// No credential configured: the page says it is loopback-only.
    pub loopback_only: bool,
    pub signed_in: bool,
}

fn when(unix: u64) -> String {
    format_utc(unix)
}

pub fn layout(frame: &Frame<'_>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "popgate — " (frame.title) }
                link rel="stylesheet" href="/static/admin.css";
            }
            body {
                header {
                    strong { "popgate" }
                    @if frame.signed_in {
                        nav {
                            a href="/" { "Overview" }
                            a href="/accounts" { "Accounts" }
                            a href="/devices" { "Devices" }
                        }
                        @if !frame.loopback_only {
                            form method="post" action="/logout" class="inline" {
                                input type="hidden" name="csrf" value=(frame.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                @if frame.loopback_only {
                    p.notice id="loopback-only" {
                        "No admin password is configured ([admin] password_hash or token_file): this page answers \
                         clients on this machine (loopback) only."
                    }
                }
                main { h1 { (frame.title) } (body) }
            }
        }
    }
}

pub fn sign_in(csrf: &str, failed: bool) -> Markup {
    html! {
        @if failed { p.error id="sign-in-failed" { "Wrong password or token." } }
        form method="post" action="/login" {
            input type="hidden" name="csrf" value=(csrf);
            label { "Admin password or token " input type="password" name="password" autocomplete="current-password" autofocus; }
            button type="submit" id="sign-in" { "Sign in" }
        }
    }
}

pub struct Overview {
    pub sessions_now: u64,
    pub chart: Markup,
    pub polls_24h: u64,
    pub failures_24h: u64,
    pub backend: String,
    /// Certificate file and expiry (Unix seconds).
    pub certificates: Vec<(String, u64)>,
    pub now: u64,
}

pub fn overview(o: &Overview) -> Markup {
    html! {
        section {
            dl.stats {
                dt { "Sessions now" } dd id="sessions-now" { (o.sessions_now) }
                dt { "Polls, 24 h" } dd id="polls-24h" { (o.polls_24h) }
                dt { "Failures, 24 h" } dd id="failures-24h" { (o.failures_24h) }
                dt { "Backend" } dd id="backend-health" { (o.backend) }
            }
        }
        section { h2 { "Polls and failures, last 24 hours" } (o.chart) }
        section {
            h2 { "Certificates" }
            @if o.certificates.is_empty() {
                p { "No TLS certificate configured." }
            } @else {
                table {
                    tr { th { "File" } th { "Expires" } th { "Days left" } }
                    @for (file, expires) in &o.certificates {
                        @let days = (*expires as i64 - o.now as i64) / 86_400;
                        tr class=@if days < 14 { "warn" } {
                            td { (file) } td { (when(*expires)) } td { (days) }
                        }
                    }
                }
            }
        }
    }
}

/// One account's row, secrets already left out.
pub struct AccountRow {
    /// How the page can sign this account in; `None`: not an OAuth
    /// account that signs in (or no token store).
    pub connect: Option<ConnectOptions>,
    pub name: String,
    pub mode: &'static str,
    pub backend: String,
    /// `None`: not an OAuth account.
    pub token: Option<TokenState>,
    pub last_error: Option<Failure>,
    pub connections: usize,
    pub devices: usize,
}

/// The sign-ins an OAuth account's provider offers.
pub struct ConnectOptions {
    /// "Google", "Microsoft", "your provider".
    pub provider: &'static str,
    /// Authorization code + PKCE (the provider has an authorization URL).
    pub code: bool,
    /// Device code (the provider has a device authorization URL).
    pub device: bool,
}

pub struct TokenState {
    /// Last successful refresh, as the refresher noted it.
    pub last_refresh: Option<u64>,
    /// Last `invalid_grant` answer to a refresh.
    pub last_invalid_grant: Option<u64>,
    /// Expiry of the stored access token, if there is one.
    pub valid_until: Option<u64>,
    pub stored: bool,
    pub refresh_token_held: bool,
    pub obtained_at: Option<u64>,
    pub needs_sign_in: bool,
    /// `popgate_oauth_refreshes_total` by result.
    pub refreshes: Vec<(String, u64)>,
    pub store_error: Option<String>,
}

pub fn accounts(rows: &[AccountRow], now: u64, csrf: &str, redirect_uri: Option<&str>) -> Markup {
    let connectable: Vec<&AccountRow> = rows.iter().filter(|r| r.connect.is_some()).collect();
    html! {
        @if rows.is_empty() {
            p { "No [[account]] is configured: every login passes through to [backend]." }
        }
        table id="accounts" {
            tr {
                th { "Account" } th { "Backend" } th { "Token" } th { "Last error" } th { "Sessions now" } th { "Devices" }
                th { "Connect" }
            }
            @for row in rows {
                tr id={"account-" (row.name)} {
                    td { (row.name) br; small { (row.mode) } }
                    td { (row.backend) }
                    td.token-state {
                        @match &row.token {
                            None => { "—" }
                            Some(t) => { (token_state(&row.name, t, now)) }
                        }
                    }
                    td { (failure(&row.last_error)) }
                    td { (row.connections) }
                    td { (row.devices) }
                    td.connect id={"connect-" (row.name)} {
                        @if let Some(c) = &row.connect { (connect_buttons(&row.name, c, csrf)) }
                    }
                }
            }
        }
        @if !connectable.is_empty() {
            h2 id="connect" { "Connect a mailbox" }
            p {
                "Sign an OAuth account in: the provider's sign-in page opens, and the token comes back to this page \
                 and goes to the token store (as " code { "popgate oauth login" } " does). For a browser on another \
                 machine, use a device code instead."
            }
            @if let Some(uri) = redirect_uri {
                p {
                    "Redirect address to register at the provider: " code id="redirect-uri" { (uri) }
                    " (Google desktop clients and Microsoft public clients accept any port on http://127.0.0.1 \
                     and http://localhost; any other address must be registered as it is — see docs/ADMIN.md)."
                }
            }
            form method="post" action="/accounts/connect" id="connect-form" {
                input type="hidden" name="csrf" value=(csrf);
                label { "Account " select name="account" {
                    @for row in &connectable { option value=(row.name) { (row.name) } }
                } }
                button type="submit" name="method" value="code" { "Sign in" }
                button type="submit" name="method" value="device" { "Use a device code" }
            }
        }
    }
}

fn connect_buttons(account: &str, c: &ConnectOptions, csrf: &str) -> Markup {
    html! {
        form method="post" action="/accounts/connect" class="inline" {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="account" value=(account);
            @if c.code {
                button type="submit" name="method" value="code" class="sign-in-code" { "Sign in with " (c.provider) }
            }
            @if c.device {
                button type="submit" name="method" value="device" class="sign-in-device" { "Use a device code" }
            }
        }
    }
}

fn token_state(account: &str, t: &TokenState, now: u64) -> Markup {
    html! {
        @if let Some(e) = &t.store_error { span.error { "token store: " (e) } br; }
        @if t.needs_sign_in {
            a.error.needs-sign-in href={"#connect-" (account)} { strong { "needs sign-in" } } br;
        }
        @if t.stored {
            @match t.valid_until {
                Some(until) if until > now => { span.valid { "valid until " (when(until)) } }
                Some(until) => { span.error { "expired " (when(until)) } }
                None => { span.valid { "valid (no expiry given)" } }
            }
            br;
            "refresh token: " (if t.refresh_token_held { "held" } else { "none" }) br;
            @if let Some(at) = t.obtained_at { "obtained: " (when(at)) br; }
        } @else {
            "no token stored" br;
        }
        @if let Some(at) = t.last_refresh { span.last-refresh { "last refresh: " (when(at)) } br; }
        @if let Some(at) = t.last_invalid_grant {
            span.error.last-invalid-grant { "last invalid_grant: " (when(at)) } br;
        }
        @for (result, count) in &t.refreshes {
            small { "refreshes " (result) ": " (count) } br;
        }
    }
}

fn failure(f: &Option<Failure>) -> Markup {
    html! {
        @match f {
            None => { "—" }
            Some(f) => { span.error { (f.what) } br; small { (when(f.at)) } }
        }
    }
}

/// One device's row.
pub struct DeviceRow {
    pub user: String,
    pub account: String,
    pub enabled: bool,
    pub activity: DeviceActivity,
}

pub fn devices(rows: &[DeviceRow], mapped_accounts: &[String], csrf: &str, can_change: Option<&str>) -> Markup {
    html! {
        @if let Some(why) = can_change { p.notice id="read-only" { (why) } }
        table id="devices" {
            tr {
                th { "Device user" } th { "Account" } th { "Enabled" } th { "Last poll" } th { "Last send" }
                th { "Last error" } th { "" }
            }
            @for row in rows {
                tr id={"device-" (row.user)} {
                    td { (row.user) }
                    td { (row.account) }
                    td.enabled { (if row.enabled { "yes" } else { "no" }) }
                    td.last-poll {
                        @match &row.activity.last_poll {
                            None => { "never" }
                            Some(p) => {
                                (when(p.at)) br;
                                small { "from " (p.address) ", " (p.retrieved) " retrieved, " (p.deleted) " deleted" }
                            }
                        }
                    }
                    td.last-send {
                        @match &row.activity.last_send {
                            None => { "never" }
                            Some(s) => {
                                (when(s.at)) br;
                                small { @match &s.refused { None => { "relayed" } Some(why) => { "refused: " (why) } } }
                            }
                        }
                    }
                    td.last-error { (failure(&row.activity.last_error)) }
                    td {
                        @if can_change.is_none() {
                            form method="post" action=(if row.enabled { "/devices/disable" } else { "/devices/enable" }) class="inline" {
                                input type="hidden" name="csrf" value=(csrf);
                                input type="hidden" name="user" value=(row.user);
                                button type="submit" class="toggle" { (if row.enabled { "Disable" } else { "Enable" }) }
                            }
                            form method="post" action="/devices/reset" class="inline" {
                                input type="hidden" name="csrf" value=(csrf);
                                input type="hidden" name="user" value=(row.user);
                                button type="submit" class="reset" { "Reset password" }
                            }
                        }
                    }
                }
            }
        }
        @if can_change.is_none() && !mapped_accounts.is_empty() {
            h2 { "Add a device" }
            form method="post" action="/devices/add" id="add-device" {
                input type="hidden" name="csrf" value=(csrf);
                label { "Account " select name="account" { @for a in mapped_accounts { option value=(a) { (a) } } } }
                label { "Device user name " input type="text" name="user" required maxlength="255"; }
                button type="submit" { "Add device" }
            }
        }
    }
}

/// The one time a device's password is shown.
pub fn new_password(user: &str, password: &str, added: bool) -> Markup {
    html! {
        p { (if added { "Device added: " } else { "New password for " }) strong id="new-user" { (user) } }
        p {
            "Its password, shown this once (popgate keeps only its hash): "
            code id="new-password" { (password) }
        }
        p { "Enter it in the device's POP3 (and SMTP) settings now. " a href="/devices" { "Back to the devices" } }
    }
}

/// The provider's redirect came back and the token is stored.
pub fn connected(account: &str, c: &Connected) -> Markup {
    html! {
        p id="connected" { "Connected " strong { (account) } ": " span.valid { (c.summary) } "." }
        @if c.no_refresh_issued {
            p.error id="no-refresh-token" {
                "The provider issued no refresh token, so popgate cannot renew this token. Google issues one only \
                 with consent (revoke popgate's access in the Google account and sign in again); Microsoft needs \
                 the offline_access scope."
            }
        }
        p { a href="/accounts" { "Back to the accounts" } }
    }
}

/// A sign-in that did not work, and why (nothing secret in `why`).
pub fn sign_in_failed(account: Option<&str>, why: &str) -> Markup {
    html! {
        p.error id="sign-in-error" {
            @if let Some(account) = account { "Signing in " strong { (account) } " failed: " } @else { "Sign-in failed: " }
            (why)
        }
        p { a href="/accounts" { "Back to the accounts" } }
    }
}

/// A device-code sign-in: the code to enter, then its outcome.
pub fn device_sign_in(view: &DeviceView) -> Markup {
    html! {
        @match &view.status {
            DeviceStatus::Waiting => {
                p {
                    "On any device, open " a id="verification-uri" href=(view.verification_uri) rel="noreferrer" { (view.verification_uri) }
                    " and enter the code"
                }
                p { code id="user-code" { (view.user_code) } }
                @if let Some(complete) = &view.verification_uri_complete {
                    p { "(or open " a href=(complete) rel="noreferrer" { (complete) } ")" }
                }
                @if let Some(login) = &view.login_hint { p { "Sign in as " strong { (login) } "." } }
                p id="device-status" { "Waiting for the sign-in to " strong { (view.account) } "… this page reloads itself; "
                    a href={"/accounts/device?id=" (view.id)} { "reload" } "." }
            }
            DeviceStatus::Connected(c) => {
                p id="device-status" { "Connected " strong { (view.account) } ": " span.valid { (c.summary) } "." }
                p { a href="/accounts" { "Back to the accounts" } }
            }
            DeviceStatus::Failed(why) => {
                p.error id="device-status" { "Signing in " strong { (view.account) } " failed: " (why) }
                p { a href="/accounts" { "Back to the accounts" } }
            }
        }
    }
}

pub fn message(text: &str) -> Markup {
    html! { p.error id="message" { (text) } p { a href="/" { "Back" } } }
}
