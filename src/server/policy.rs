//! Who may log in how, per listener: the TLS mode and the cleartext-login
//! policy. Decides, for one connection, whether USER/PASS/AUTH are allowed
//! now and whether STLS is offered — the session only obeys.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    /// Cleartext only (a printer subnet; loopback).
    #[default]
    None,
    /// Cleartext with STLS (RFC 2595), port 110.
    Starttls,
    /// TLS from the first byte, port 995.
    Implicit,
}

/// The login policy of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginPolicy {
    pub tls: ListenerTls,
    /// Cleartext USER/PASS/AUTH accepted (from `cleartext_networks` if set).
    pub allow_cleartext_login: bool,
    pub cleartext_networks: Vec<IpNet>,
    /// Loopback clients count as secure (as in Dovecot).
    pub loopback_is_secure: bool,
}

impl LoginPolicy {
    /// May a client at `peer` log in, with TLS active or not?
    /// (`peer` is canonical already when it comes from the accept loop; an
    /// IPv4-mapped IPv6 address is made IPv4 here too.)
    pub fn login_permitted(&self, peer: IpAddr, tls_active: bool) -> bool {
        let peer = peer.to_canonical();
        if tls_active || (self.loopback_is_secure && is_loopback(peer)) {
            return true;
        }
        self.allow_cleartext_login
            && (self.cleartext_networks.is_empty() || self.cleartext_networks.iter().any(|n| n.contains(&peer)))
    }

    /// Can any client that is not on loopback log in at all? Not when the
    /// listener has no TLS and allows no cleartext login.
    pub fn any_network_login_possible(&self) -> bool {
        self.tls != ListenerTls::None || self.allow_cleartext_login
    }

    /// Why a login of a client at `peer` without TLS is refused, for the
    /// log (`None` when it is not).
    pub fn cleartext_refusal(&self, peer: IpAddr) -> Option<&'static str> {
        if self.login_permitted(peer, false) {
            return None;
        }
        Some(match (self.tls, self.allow_cleartext_login) {
            (ListenerTls::Starttls, false) => "cleartext login before STLS; this listener allows no cleartext login",
            (_, false) => {
                "no TLS on this listener and no cleartext login allowed \
                           (--allow-cleartext-from, or allow_cleartext_login + cleartext_networks)"
            }
            (_, true) => "the client is not in the listener's cleartext_networks (--allow-cleartext-from)",
        })
    }

    /// Is STLS offered on a cleartext connection of this listener?
    pub fn stls_offered(&self, tls_active: bool) -> bool {
        self.tls == ListenerTls::Starttls && !tls_active
    }
}

fn is_loopback(peer: IpAddr) -> bool {
    match peer {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tls: ListenerTls, allow: bool, nets: &[&str]) -> LoginPolicy {
        LoginPolicy {
            tls,
            allow_cleartext_login: allow,
            cleartext_networks: nets.iter().map(|n| n.parse().unwrap()).collect(),
            loopback_is_secure: true,
        }
    }

    #[test]
    fn cleartext_login_rules() {
        let printer: IpAddr = "192.168.10.23".parse().unwrap();
        let outsider: IpAddr = "203.0.113.9".parse().unwrap();
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();

        let secure = policy(ListenerTls::Starttls, false, &[]);
        assert!(!secure.login_permitted(outsider, false));
        assert!(secure.login_permitted(outsider, true));
        assert!(secure.login_permitted(loopback, false));
        assert!(secure.login_permitted(mapped, false));
        assert!(secure.stls_offered(false));
        assert!(!secure.stls_offered(true));

        let printers = policy(ListenerTls::None, true, &["192.168.10.0/24"]);
        assert!(printers.login_permitted(printer, false));
        assert!(!printers.login_permitted(outsider, false));
        assert!(printers.login_permitted("::ffff:192.168.10.23".parse().unwrap(), false));
        assert!(!printers.stls_offered(false));

        let open = policy(ListenerTls::None, true, &[]);
        assert!(open.login_permitted(outsider, false));

        let strict = LoginPolicy { loopback_is_secure: false, ..policy(ListenerTls::Implicit, false, &[]) };
        assert!(!strict.login_permitted(loopback, false));
        assert!(strict.login_permitted(loopback, true));
    }
}
