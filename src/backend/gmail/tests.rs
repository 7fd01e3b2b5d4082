//! Unit tests of the Gmail backend's pure parts; whole sessions against the
//! stand-in API are in tests/gmail_api.rs.

use super::*;

#[test]
fn config_defaults_and_checks() {
    let config: GmailConfig = toml::from_str("").unwrap();
    assert_eq!(config, GmailConfig::default());
    assert_eq!(config.api_base, "https://gmail.googleapis.com");
    assert_eq!(
        (config.delete_policy, config.timeout_secs, config.max_concurrent_requests),
        (GmailDeletePolicy::Trash, 30, 4)
    );
    let full: GmailConfig = toml::from_str(
        "api_base = \"http://127.0.0.1:9\"\nlabel = \"Printers\"\nquery = \"has:attachment\"\n\
         delete_policy = \"archive\"\ntimeout_secs = 5\nmax_concurrent_requests = 2\nmax_retries = 1\n\
         max_retry_wait_secs = 3\nca_file = \"/etc/ca.pem\"",
    )
    .unwrap();
    assert_eq!((full.label.as_deref(), full.delete_policy), (Some("Printers"), GmailDeletePolicy::Archive));
    assert!(toml::from_str::<GmailConfig>("lable = \"x\"").is_err());
    assert!(toml::from_str::<GmailConfig>("delete_policy = \"shred\"").is_err());
    let bad = |change: fn(&mut GmailConfig)| {
        let mut config = GmailConfig::default();
        change(&mut config);
        config.check().unwrap_err().key
    };
    assert_eq!(bad(|c| c.api_base = "ftp://x".into()), "api_base");
    assert_eq!(bad(|c| c.api_base = "https://u:p@x".into()), "api_base");
    assert_eq!(bad(|c| c.timeout_secs = 0), "timeout_secs");
    assert_eq!(bad(|c| c.max_concurrent_requests = 0), "max_concurrent_requests");
    assert_eq!(bad(|c| c.label = Some(" ".into())), "label");
    assert_eq!(bad(|c| c.query = Some(String::new())), "query");
    assert_eq!(bad(|c| c.max_retry_wait_secs = 0), "max_retry_wait_secs");
}

#[test]
fn labels_by_id_or_name() {
    let label = |id: &str, name: &str| Label { id: id.into(), name: name.into() };
    let labels = [label("INBOX", "INBOX"), label("TRASH", "TRASH"), label("Label_7", "Printers/Scans")];
    assert_eq!(find_label(&labels, "INBOX").unwrap(), "INBOX");
    assert_eq!(find_label(&labels, "inbox").unwrap(), "INBOX");
    assert_eq!(find_label(&labels, "Label_7").unwrap(), "Label_7");
    assert_eq!(find_label(&labels, "printers/scans").unwrap(), "Label_7");
    assert!(matches!(find_label(&labels, "Nope"), Err(BackendError::Permanent(m)) if m.contains("Nope")));
}

#[test]
fn uidls_are_message_ids() {
    assert_eq!(uidl_for("18c2f0a1b2c3d4e5"), "18c2f0a1b2c3d4e5");
    assert_eq!(uidl_for(&"a".repeat(80)).len(), 64);
}

#[test]
fn arrivals_parse_strings_and_numbers() {
    let (arrival, labels) =
        parse_arrival(br#"{"id":"a","internalDate":"1700000000123","sizeEstimate":42,"labelIds":["INBOX"]}"#).unwrap();
    assert_eq!(arrival, Arrival { internal_date: 1_700_000_000_123, size_estimate: 42 });
    assert_eq!(labels, ["INBOX"]);
    assert_eq!(parse_arrival(br#"{"internalDate":5}"#).unwrap().0.internal_date, 5);
    assert!(parse_arrival(br#"{"id":"a"}"#).is_err());
}

fn mailbox(label: Option<&str>, policy: GmailDeletePolicy) -> GmailMailbox {
    let retry = RetryPolicy { retries: 0, max_wait: Duration::from_secs(1) };
    let endpoint = Endpoint::new("http://127.0.0.1:9/prefix/", None, 1, retry).unwrap();
    GmailMailbox {
        api: Api {
            account: endpoint.account("alice", 1, &crate::mail::Secret::new("t"), wire::judge),
            base: endpoint.base.clone(),
        },
        account: "alice".into(),
        label: label.map(Into::into),
        query: None,
        policy,
        configured_policy: policy,
        arrivals: moka::sync::Cache::new(10),
        concurrency: 1,
        listings: ListingStates::new(0, 60),
        membership: None,
        seal: TokenSeal::of(&crate::mail::Secret::new("t")),
        prefetched: None,
        flag_label: None,
    }
}

/// The maildrop a history is followed for is the one `messages.list`
/// selects with `labelIds` (and `q=-in:sent`).
#[test]
fn membership_is_decided_as_messages_list_decides() {
    let labels = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let inbox = Membership { label: "INBOX".into(), exclude_sent: true };
    assert!(inbox.holds(&labels(&["INBOX", "UNREAD"])));
    assert!(!inbox.holds(&labels(&["UNREAD"])));
    assert!(!inbox.holds(&labels(&["INBOX", "SENT"])), "-in:sent");
    assert!(!inbox.holds(&labels(&["INBOX", "TRASH"])), "no Spam or Trash without includeSpamTrash");
    assert!(!inbox.holds(&labels(&["INBOX", "SPAM"])));
    let with_sent = Membership { label: "INBOX".into(), exclude_sent: false };
    assert!(with_sent.holds(&labels(&["INBOX", "SENT"])));
    let trash = Membership { label: "TRASH".into(), exclude_sent: true };
    assert!(trash.holds(&labels(&["TRASH", "SPAM"])), "Spam and Trash when asked for");
}

#[test]
fn delete_policies_become_label_changes() {
    let labels = |change: Change| match change {
        Change::Labels { add, remove } => (add, remove),
        Change::Delete => panic!("expected a label change"),
    };
    let trash = labels(mailbox(Some("INBOX"), GmailDeletePolicy::Trash).change());
    assert_eq!(trash, (vec!["TRASH".to_string()], vec!["INBOX".to_string()]));
    let archive = labels(mailbox(Some("Label_7"), GmailDeletePolicy::Archive).change());
    assert_eq!(archive, (vec![], vec!["Label_7".to_string()]));
    let query_only = labels(mailbox(None, GmailDeletePolicy::Archive).change());
    assert_eq!(query_only.1, ["INBOX"]);
    assert!(matches!(mailbox(None, GmailDeletePolicy::Delete).change(), Change::Delete));
}

#[test]
fn urls_keep_a_base_path_and_escape_ids() {
    let m = mailbox(None, GmailDeletePolicy::Trash);
    assert_eq!(m.api.url(&["messages", "a/b"]).as_str(), "http://127.0.0.1:9/prefix/gmail/v1/users/me/messages/a%2Fb");
    let mut url = m.api.url(&["messages", "18c"]);
    url.query_pairs_mut().append_pair("format", "minimal");
    assert_eq!(inner_path(&url), "/prefix/gmail/v1/users/me/messages/18c?format=minimal");
}

#[tokio::test]
async fn passwords_are_refused_and_tokens_checked() {
    let backend =
        GmailBackend::new(GmailConfig { api_base: "http://127.0.0.1:9".into(), ..GmailConfig::default() }).unwrap();
    assert!(backend.accepts_bearer_tokens());
    let e = backend.open(&Credentials::password("alice", "hunter2")).await.err().unwrap();
    assert!(matches!(&e, BackendError::Permanent(m) if m.contains("OAuth2") && !m.contains("hunter2")), "{e:?}");
    use crate::mail::{Proof, Secret};
    let bad = Credentials { user: "alice".into(), proof: Proof::Bearer(Secret::new("a b")) };
    assert!(matches!(backend.open(&bad).await, Err(BackendError::BadCredentials(_))));
}

/// A search covers All Mail: archiving (removing INBOX) would not take a
/// served message out of it (issue #19 item 1).
#[test]
fn a_query_with_archive_needs_a_label() {
    let config = GmailConfig {
        query: Some("has:attachment".into()),
        delete_policy: GmailDeletePolicy::Archive,
        ..GmailConfig::default()
    };
    let refused = config.check().unwrap_err();
    assert_eq!(refused.key, "delete_policy");
    assert!(refused.to_string().contains("label = \"INBOX\""), "{refused}");
    assert!(GmailConfig { label: Some("INBOX".into()), ..config.clone() }.check().is_ok());
    assert!(GmailConfig { delete_policy: GmailDeletePolicy::Trash, ..config }.check().is_ok());
}

#[test]
fn the_search_leaves_out_sent_mail_unless_asked() {
    assert_eq!(search(None, true).as_deref(), Some("-in:sent"));
    assert_eq!(search(None, false), None);
    assert_eq!(search(Some(" a OR b "), true).as_deref(), Some("(a OR b) -in:sent"));
    assert_eq!(search(Some("a"), false).as_deref(), Some("a"));
    let config: GmailConfig = toml::from_str("exclude_sent = false").unwrap();
    assert!(!config.exclude_sent);
    assert!(GmailConfig::default().exclude_sent, "on by default");
}
