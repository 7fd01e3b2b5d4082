//! Which backend a configuration names, in one place: the `BackendConfig`
//! enum (`kind = "…"` in `[backend]` and `[backends.NAME]`), backend URLs
//! (`--backend`), a one-line description for the log, what each kind checks,
//! which OAuth API its tokens are for, and building the backend itself.
//! Adding a backend kind touches this file and the backend's own module.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::SharedBackend;
use super::demo::{DemoBackend, DemoConfig, DemoStore};
use super::gmail::{GmailBackend, GmailConfig};
use super::graph::{GraphBackend, GraphConfig};
use super::imap::{ImapBackend, ImapConfig, ImapTls};
use super::jmap::{JmapBackend, JmapConfig};
use crate::mail::{BackendError, InvalidSetting};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackendConfig {
    /// The built-in demo store (any user, any password).
    Demo(DemoConfig),
    Imap(ImapConfig),
    /// A JMAP server (RFC 8620/8621).
    Jmap(JmapConfig),
    /// The Gmail API (OAuth2 bearer tokens).
    Gmail(GmailConfig),
    /// Microsoft Graph mail (OAuth2 bearer tokens).
    Graph(GraphConfig),
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig::Demo(DemoConfig::default())
    }
}

/// Which API an account's OAuth tokens are for: the preset scopes differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailApi {
    /// IMAP (and JMAP, whose scopes are the server's business).
    Imap,
    /// The Gmail API: `https://mail.google.com/` covers it too.
    GmailApi,
    /// Microsoft Graph: `Mail.ReadWrite`.
    Graph,
}

/// A `--backend` URL that cannot be understood.
#[derive(Debug, thiserror::Error)]
#[error("invalid backend URL `{url}`: {why}")]
pub struct BadBackendUrl {
    pub url: String,
    pub why: String,
}

impl BackendConfig {
    /// Parses a backend URL: `imap://host[:port][/mailbox]`,
    /// `imap+starttls://…`, `imaps://…`, `jmap+https://…`, `demo:` or
    /// `demo:DIR`, `gmail:` or `gmail:LABEL`, `graph:` or `graph:FOLDER`.
    pub fn from_url(url: &str) -> Result<BackendConfig, BadBackendUrl> {
        let bad = |why: &str| BadBackendUrl { url: url.to_string(), why: why.to_string() };
        if let Some(dir) = url.strip_prefix("demo:") {
            let dir = dir.trim_start_matches("//");
            return Ok(BackendConfig::Demo(DemoConfig { messages_dir: (!dir.is_empty()).then(|| dir.into()) }));
        }
        // `gmail:LABEL` / `graph:FOLDER`: the name, %-escaped; the API is
        // the provider's own (set `api_base` in a file to change it).
        let named = |prefix: &str| -> Result<Option<Option<String>>, BadBackendUrl> {
            let Some(rest) =
                url.get(..prefix.len()).filter(|p| p.eq_ignore_ascii_case(prefix)).map(|_| &url[prefix.len()..])
            else {
                return Ok(None);
            };
            if rest.starts_with('/') {
                return Err(bad("no host here: `gmail:` or `gmail:LABEL`, `graph:` or `graph:FOLDER`"));
            }
            let name = percent_decode(rest).map_err(bad)?;
            Ok(Some((!name.trim().is_empty()).then_some(name)))
        };
        if let Some(label) = named("gmail:")? {
            return Ok(BackendConfig::Gmail(GmailConfig::with_label(label)));
        }
        if let Some(folder) = named("graph:")? {
            return Ok(BackendConfig::Graph(GraphConfig::with_folder(folder)));
        }
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("expected scheme://host"))?;
        let lowercase = scheme.to_ascii_lowercase();
        if let Some(http) = lowercase.strip_prefix("jmap+").filter(|s| matches!(*s, "http" | "https")) {
            let config = JmapConfig::new(format!("{http}://{rest}"));
            config.session_url().map_err(|why| bad(&why))?;
            return Ok(BackendConfig::Jmap(config));
        }
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "imap" => ImapTls::None,
            "imap+starttls" => ImapTls::Starttls,
            "imaps" => ImapTls::Implicit,
            _ => return Err(bad("scheme must be imap, imap+starttls, imaps, jmap+http, jmap+https or demo")),
        };
        let (authority, mailbox) = match rest.split_once('/') {
            Some((a, m)) => (a, Some(m)),
            None => (rest, None),
        };
        if authority.contains('@') {
            return Err(bad("credentials do not belong in the URL; clients log in with their own"));
        }
        let (host, port) = split_host_port(authority).map_err(bad)?;
        let mut config = ImapConfig::new(host, port, tls);
        if let Some(mailbox) = mailbox.filter(|m| !m.is_empty()) {
            config.mailbox = percent_decode(mailbox).map_err(bad)?;
        }
        Ok(BackendConfig::Imap(config))
    }

    /// What serde cannot check, with keys relative to the backend's table.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        match self {
            BackendConfig::Demo(_) => Ok(()),
            BackendConfig::Imap(imap) => imap.check(),
            BackendConfig::Jmap(jmap) => jmap.check(),
            BackendConfig::Gmail(gmail) => gmail.check(),
            BackendConfig::Graph(graph) => graph.check(),
        }
    }

    /// Whose OAuth scopes an account on this backend asks for.
    pub fn mail_api(&self) -> MailApi {
        match self {
            BackendConfig::Gmail(_) => MailApi::GmailApi,
            BackendConfig::Graph(_) => MailApi::Graph,
            BackendConfig::Demo(_) | BackendConfig::Imap(_) | BackendConfig::Jmap(_) => MailApi::Imap,
        }
    }

    /// The CA file this backend trusts besides the system's store.
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        match self {
            BackendConfig::Demo(_) => None,
            BackendConfig::Imap(c) => c.ca_file.as_deref(),
            BackendConfig::Jmap(c) => c.ca_file.as_deref(),
            BackendConfig::Gmail(c) => c.ca_file.as_deref(),
            BackendConfig::Graph(c) => c.ca_file.as_deref(),
        }
    }

    /// Builds the backend (no network: the first login connects).
    pub fn build(&self) -> Result<SharedBackend, BackendError> {
        Ok(match self {
            BackendConfig::Demo(demo) => {
                let store = DemoStore::from_config(demo)
                    .map_err(|e| BackendError::Permanent(format!("cannot load demo messages: {e}")))?;
                Arc::new(DemoBackend::new(store))
            }
            BackendConfig::Imap(imap) => Arc::new(ImapBackend::new(imap.clone())?),
            BackendConfig::Jmap(jmap) => Arc::new(JmapBackend::new(jmap.clone())?),
            BackendConfig::Gmail(gmail) => Arc::new(GmailBackend::new(gmail.clone())?),
            BackendConfig::Graph(graph) => Arc::new(GraphBackend::new(graph.clone())?),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            BackendConfig::Demo(_) => "demo".into(),
            BackendConfig::Imap(c) => format!("imap {}:{} ({:?}) {}", c.host, c.port(), c.tls, c.mailbox),
            BackendConfig::Jmap(c) => format!("jmap {} {}", c.url, c.mailbox.as_deref().unwrap_or("(inbox)")),
            BackendConfig::Gmail(c) => format!(
                "gmail {} label {} query {}",
                c.api_base,
                c.label.as_deref().unwrap_or(if c.query.is_some() { "(none)" } else { "INBOX" }),
                c.query.as_deref().unwrap_or("(none)")
            ),
            BackendConfig::Graph(c) => format!("graph {} user {} folder {}", c.api_base, c.user, c.folder),
        }
    }
}

fn split_host_port(authority: &str) -> Result<(String, Option<u16>), &'static str> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed [ in host")?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("missing host");
    }
    let port = port.map(|p| p.parse::<u16>().map_err(|_| "invalid port")).transpose()?;
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> Result<String, &'static str> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Two hex digits exactly: `u8::from_str_radix` alone would take
            // a sign (`%+f`).
            let hex = s.get(i + 1..i + 3).filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
            let hex = hex.ok_or("bad % escape in mailbox")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad % escape in mailbox")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "mailbox is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls() {
        let imap = |url| match BackendConfig::from_url(url).unwrap() {
            BackendConfig::Imap(c) => c,
            other => panic!("{other:?}"),
        };
        let c = imap("imap://127.0.0.1:143");
        assert_eq!((c.host.as_str(), c.port(), c.tls, c.mailbox.as_str()), ("127.0.0.1", 143, ImapTls::None, "INBOX"));
        let c = imap("imaps://imap.gmail.com");
        assert_eq!((c.port(), c.tls), (993, ImapTls::Implicit));
        let c = imap("imap+starttls://mail.example.com:1143/Print%20Queue");
        assert_eq!((c.port(), c.tls, c.mailbox.as_str()), (1143, ImapTls::Starttls, "Print Queue"));
        let c = imap("imap://[::1]:143/Archive");
        assert_eq!((c.host.as_str(), c.mailbox.as_str()), ("::1", "Archive"));
        assert_eq!(BackendConfig::from_url("demo:").unwrap(), BackendConfig::Demo(DemoConfig::default()));
        assert_eq!(
            BackendConfig::from_url("demo:/srv/mail").unwrap(),
            BackendConfig::Demo(DemoConfig { messages_dir: Some("/srv/mail".into()) })
        );
        for bad in [
            "pop3://x",
            "imap://",
            "imap://h:99999",
            "imap://u:p@h",
            "nothing",
            "imap://h/%zz",
            "imap://h/%+f",
            "gmail:%-1",
        ] {
            assert!(BackendConfig::from_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jmap_backend_urls() {
        let jmap = |url| match BackendConfig::from_url(url).unwrap() {
            BackendConfig::Jmap(c) => c,
            other => panic!("{other:?}"),
        };
        assert_eq!(jmap("jmap+http://127.0.0.1:8080").url, "http://127.0.0.1:8080");
        assert_eq!(jmap("JMAP+HTTPS://api.fastmail.com/jmap/session").url, "https://api.fastmail.com/jmap/session");
        let c = jmap("jmap+https://mail.example.com/");
        assert_eq!(c.session_url().unwrap().as_str(), "https://mail.example.com/.well-known/jmap");
        assert_eq!(c, crate::backend::jmap::JmapConfig::new("https://mail.example.com/"));
        for bad in ["jmap+ftp://h", "jmap://h", "jmap+https://u:p@h/", "jmap+http://", "jmap+http://h:99999"] {
            assert!(BackendConfig::from_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gmail_and_graph_backend_urls() {
        match BackendConfig::from_url("gmail:").unwrap() {
            BackendConfig::Gmail(c) => assert_eq!(c, GmailConfig::default()),
            other => panic!("{other:?}"),
        }
        match BackendConfig::from_url("GMAIL:Printers%2FScans").unwrap() {
            BackendConfig::Gmail(c) => assert_eq!(c.label.as_deref(), Some("Printers/Scans")),
            other => panic!("{other:?}"),
        }
        match BackendConfig::from_url("graph:").unwrap() {
            BackendConfig::Graph(c) => assert_eq!(c, GraphConfig::default()),
            other => panic!("{other:?}"),
        }
        match BackendConfig::from_url("graph:archive").unwrap() {
            BackendConfig::Graph(c) => assert_eq!((c.folder.as_str(), c.user.as_str()), ("archive", "me")),
            other => panic!("{other:?}"),
        }
        for bad in ["gmail://host", "graph:%zz", "gmailx:"] {
            assert!(BackendConfig::from_url(bad).is_err(), "{bad}");
        }
    }
}
