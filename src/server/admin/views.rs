//! The admin page's HTML (maud: compiled into the binary, every value
//! escaped). Views take plain rows already stripped of secrets: nothing
//! here can reach a password, a token or a hash.

use maud::{DOCTYPE, Markup, html};

use crate::auth::oauth::commands::format_utc;
use crate::server::activity::{DeviceActivity, Failure};

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
    pub name: String,
    pub mode: &'static str,
    pub backend: String,
    /// `None`: not an OAuth account.
    pub token: Option<TokenState>,
    pub last_error: Option<Failure>,
    pub connections: usize,
    pub devices: usize,
}

pub struct TokenState {
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

pub fn accounts(rows: &[AccountRow], now: u64) -> Markup {
    html! {
        @if rows.is_empty() {
            p { "No [[account]] is configured: every login passes through to [backend]." }
        }
        table id="accounts" {
            tr {
                th { "Account" } th { "Backend" } th { "Token" } th { "Last error" } th { "Sessions now" } th { "Devices" }
            }
            @for row in rows {
                tr id={"account-" (row.name)} {
                    td { (row.name) br; small { (row.mode) } }
                    td { (row.backend) }
                    td.token-state {
                        @match &row.token {
                            None => { "—" }
                            Some(t) => { (token_state(t, now)) }
                        }
                    }
                    td { (failure(&row.last_error)) }
                    td { (row.connections) }
                    td { (row.devices) }
                }
            }
        }
    }
}

fn token_state(t: &TokenState, now: u64) -> Markup {
    html! {
        @if let Some(e) = &t.store_error { span.error { "token store: " (e) } br; }
        @if t.needs_sign_in {
            strong.error.needs-sign-in { "needs sign-in" } br;
        }
        @if t.stored {
            @match t.valid_until {
                Some(until) if until > now => { span.valid { "valid until " (when(until)) } }
                Some(until) => { span.error { "expired " (when(until)) } }
                None => { span.valid { "valid (no expiry given)" } }
            }
            br;
            "refresh token: " (if t.refresh_token_held { "held" } else { "none" }) br;
            @if let Some(at) = t.obtained_at { "last refresh: " (when(at)) br; }
        } @else {
            "no token stored"
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

pub fn message(text: &str) -> Markup {
    html! { p.error id="message" { (text) } p { a href="/" { "Back" } } }
}
