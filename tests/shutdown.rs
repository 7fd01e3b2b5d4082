//! Shutdown never cuts a commit in half: a session inside UPDATE when the
//! grace period (and the five seconds after it) runs out finishes its
//! deletions and gets its reply before the process ends.

mod support;

use std::time::Duration;

use popgate::backend::demo::DemoStore;
use support::gateway::Gateway;
use support::messages::simple;
use support::pop3::Dialogue as _;

#[test]
fn a_session_inside_update_finishes_before_shutdown_ends_it() {
    let store = DemoStore::new();
    store.add_user("alice", "pw");
    store.append("alice", simple("first"));
    store.append("alice", simple("second"));
    // The backend takes longer to commit than grace + 5 s.
    store.delay_removals(Duration::from_secs(7));
    let gateway = Gateway::memory_with(&store, |limits| limits.shutdown_grace_secs = 0);
    let mut client = gateway.login("alice", "pw");
    client.ok("DELE 1");
    client.send("QUIT");
    std::thread::sleep(Duration::from_millis(500));
    let stopping = std::thread::spawn(move || gateway.shutdown(Duration::from_secs(60)));
    let reply = client.line();
    assert!(reply.starts_with("+OK"), "the client must hear how its commit ended: {reply:?}");
    stopping.join().expect("shutdown");
    assert_eq!(
        store.contents("alice"),
        vec![bytes::Bytes::from(simple("second"))],
        "exactly the marked message is gone"
    );
}
