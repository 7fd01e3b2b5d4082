//! Unit tests of the Graph backend's pure parts; whole sessions against the
//! stand-in API are in tests/graph.rs.

use super::*;

#[test]
fn config_defaults_and_checks() {
    let config: GraphConfig = toml::from_str("").unwrap();
    assert_eq!(config, GraphConfig::default());
    assert_eq!(
        (config.api_base.as_str(), config.user.as_str(), config.folder.as_str(), config.delete_policy),
        ("https://graph.microsoft.com/v1.0", "me", "inbox", GraphDeletePolicy::Move)
    );
    let full: GraphConfig = toml::from_str(
        "api_base = \"http://127.0.0.1:9/v1.0\"\nuser = \"scanner@contoso.com\"\nfolder = \"archive\"\n\
         delete_policy = \"permanent_delete\"\ntimeout_secs = 5\nmax_concurrent_requests = 2\nmax_retries = 1\n\
         max_retry_wait_secs = 3\nca_file = \"/etc/ca.pem\"",
    )
    .unwrap();
    assert_eq!((full.user.as_str(), full.delete_policy), ("scanner@contoso.com", GraphDeletePolicy::PermanentDelete));
    assert!(toml::from_str::<GraphConfig>("folders = \"x\"").is_err());
    let bad = |change: fn(&mut GraphConfig)| {
        let mut config = GraphConfig::default();
        change(&mut config);
        config.check().unwrap_err().key
    };
    assert_eq!(bad(|c| c.api_base = "graph.microsoft.com".into()), "api_base");
    assert_eq!(bad(|c| c.user = String::new()), "user");
    assert_eq!(bad(|c| c.folder = " ".into()), "folder");
    assert_eq!(bad(|c| c.max_concurrent_requests = 5), "max_concurrent_requests");
    assert_eq!(bad(|c| c.timeout_secs = 0), "timeout_secs");
    assert_eq!(bad(|c| c.folder = "DeletedItems".into()), "delete_policy");
    let mut ok = GraphConfig::with_folder(Some("deleteditems".into()));
    ok.delete_policy = GraphDeletePolicy::PermanentDelete;
    assert!(ok.check().is_ok());
}

/// Outlook's per-mailbox budget: 10 000 requests per 600 s by default,
/// accepted at its bounds and refused by name one past them.
#[test]
fn the_mailbox_request_budget_is_bounded() {
    let config = GraphConfig::default();
    assert_eq!((config.mailbox_requests_per_window, config.mailbox_window_secs), (10_000, 600));
    for (requests, window, fine) in [
        (1, 1, true),
        (1_000_000, 86_400, true),
        (0, 600, false),
        (1_000_001, 600, false),
        (10_000, 0, false),
        (10_000, 86_401, false),
    ] {
        let config = GraphConfig {
            mailbox_requests_per_window: requests,
            mailbox_window_secs: window,
            ..GraphConfig::default()
        };
        match config.check() {
            Ok(()) => assert!(fine, "{requests}/{window} accepted"),
            Err(e) => {
                assert!(!fine, "{requests}/{window} refused: {e}");
                let key = if requests == 10_000 { "mailbox_window_secs" } else { "mailbox_requests_per_window" };
                assert_eq!(e.key, key);
            }
        }
    }
}

/// Without a shared store, a process counts the budget itself: once it is
/// spent, nothing more is allowed until the window ends.
#[tokio::test]
async fn a_spent_budget_refuses_until_the_window_ends() {
    let budgets = http::Budgets::new(http::RequestBudget { requests: 5, window: Duration::from_secs(86_400) });
    assert!(budgets.spend("alice@contoso.com", 1).await.is_ok());
    assert!(budgets.spend("alice@contoso.com", 4).await.is_ok());
    let wait = budgets.spend("alice@contoso.com", 1).await.unwrap_err();
    assert!(wait <= Duration::from_secs(86_400) && !wait.is_zero(), "{wait:?}");
    assert!(budgets.spend("bob@contoso.com", 5).await.is_ok(), "per mailbox");
    assert!(budgets.spend("bob@contoso.com", 1).await.is_err());
}

/// `permanentDelete` is "Global service only" in Microsoft's reference.
#[test]
fn permanent_delete_is_refused_in_national_clouds() {
    for base in [
        "https://graph.microsoft.us/v1.0",
        "https://dod-graph.microsoft.us/v1.0",
        "https://microsoftgraph.chinacloudapi.cn/v1.0",
    ] {
        let config = GraphConfig {
            api_base: base.into(),
            delete_policy: GraphDeletePolicy::PermanentDelete,
            ..GraphConfig::default()
        };
        let refused = config.check().unwrap_err();
        assert_eq!(refused.key, "delete_policy", "{base}");
        assert!(refused.why.contains("move"), "{refused:?}");
        assert!(GraphConfig { delete_policy: GraphDeletePolicy::Move, ..config }.check().is_ok(), "{base}");
    }
    let global = GraphConfig { delete_policy: GraphDeletePolicy::PermanentDelete, ..GraphConfig::default() };
    assert!(global.check().is_ok());
}

fn api(user: &str, base: &str) -> Api {
    let retry = RetryPolicy { retries: 0, max_wait: Duration::from_secs(1) };
    let endpoint = Endpoint::new(base, None, 1, retry).unwrap();
    Api {
        account: endpoint.account(user, 1, &crate::mail::Secret::new("t"), judge),
        base: Url::parse(base).unwrap(),
        user: user.into(),
    }
}

#[test]
fn urls_for_delegated_and_app_only_access() {
    let me = api("me", "https://graph.microsoft.com/v1.0");
    let url = me.url(&["messages", "AAMk+a/b=", "$value"]);
    assert_eq!(url.as_str(), "https://graph.microsoft.com/v1.0/me/messages/AAMk+a%2Fb=/$value");
    assert_eq!(me.relative(&me.url(&["messages", "x", "move"])), "/me/messages/x/move");
    let app = api("scanner@contoso.com", "http://127.0.0.1:8/v1.0/");
    assert_eq!(
        app.url(&["mailFolders", "inbox"]).as_str(),
        "http://127.0.0.1:8/v1.0/users/scanner@contoso.com/mailFolders/inbox"
    );
    assert_eq!(
        app.relative(&app.url(&["messages", "x", "permanentDelete"])),
        "/users/scanner@contoso.com/messages/x/permanentDelete"
    );
}

#[test]
fn next_links_stay_on_the_api() {
    let me = api("me", "https://graph.microsoft.com/v1.0");
    assert!(me.check_next_link("https://graph.microsoft.com/v1.0/me/mailFolders/inbox/messages?$skip=500").is_ok());
    for elsewhere in [
        "https://evil.example.com/v1.0/me/messages",
        "http://graph.microsoft.com/v1.0/me/messages",
        "https://graph.microsoft.com:8443/v1.0/me/messages",
        "https://graph.microsoft.com/beta/me/messages",
        "not a url",
    ] {
        assert!(me.check_next_link(elsewhere).is_err(), "{elsewhere}");
    }
}

#[test]
fn uidls_hash_the_immutable_id() {
    let id = format!("AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A{}AAAAAAEJAAA=", "ge".repeat(55));
    assert!(id.len() > 70);
    let uidl = uidl_for(&id);
    assert_eq!(uidl.len(), 64);
    assert!(uidl.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(uidl, uidl_for(&id));
}

#[test]
fn errors_map_to_pop3_meanings() {
    let body = |code: &str| format!(r#"{{"error":{{"code":"{code}","message":"m","innerError":{{}}}}}}"#);
    let v = |status: u16, b: String| judge("t", StatusCode::from_u16(status).unwrap(), b.as_bytes());
    assert!(matches!(v(401, body("InvalidAuthenticationToken")), Verdict::Fail(BackendError::AuthFailed)));
    for status in [429, 503, 504] {
        assert!(matches!(v(status, body("ApplicationThrottled")), Verdict::Retry), "{status}");
    }
    assert!(matches!(v(404, body("ErrorItemNotFound")), Verdict::Fail(BackendError::MessageGone)));
    let denied = v(403, body("ErrorAccessDenied"));
    assert!(
        matches!(&denied, Verdict::Fail(BackendError::Permanent(m)) if m.contains("ErrorAccessDenied")),
        "{denied:?}"
    );
}

#[tokio::test]
async fn passwords_are_refused() {
    let backend =
        GraphBackend::new(GraphConfig { api_base: "http://127.0.0.1:9/v1.0".into(), ..GraphConfig::default() })
            .unwrap();
    assert!(backend.accepts_bearer_tokens());
    let e = backend.open(&Credentials::password("alice", "hunter2")).await.err().unwrap();
    assert!(matches!(&e, BackendError::Permanent(m) if m.contains("OAuth2") && !m.contains("hunter2")), "{e:?}");
}
