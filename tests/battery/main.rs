//! The behaviour battery: one suite of POP3 session scenarios, written once
//! (`scenarios.rs`) and run unchanged against every store popgate serves
//! (`fixture/`: the in-memory store, Dovecot and Cyrus over IMAP, Cyrus over
//! JMAP, and
//! the Gmail API and Microsoft Graph stand-ins), so that every backend is
//! held to the same behaviour as the in-memory reference; the in-memory
//! store and Dovecot once more with state shared through Redis
//! (`memory_redis`, `dovecot_redis`).
//!
//! # Layout
//! - `fixture/`: the `Fixture` trait — start a store with one user, fill it,
//!   look at it, stop it — and one implementation per store.
//! - `scenarios.rs`: the sessions, each a `pub fn name<F: Fixture>()`.
//! - `gateway.rs`: popgate in-process, logins routed by the fixture.
//! - `memory_use.rs`: counting popgate's allocations, and the gate that
//!   lets a measurement run alone.
//! - here: `battery!` makes one test per (store, scenario) pair, named like
//!   `dovecot::dele_then_quit_removes_exactly_those`.
//!
//! Nothing is skipped: a store that is not installed fails its tests loudly
//! (scripts/test installs Dovecot and Cyrus). Each test starts its own store
//! and its own popgate on ports chosen at run time, so the tests run in
//! parallel; every wait is bounded by the harness's timeouts.

#[path = "../support/mod.rs"]
mod support;

mod fixture;
mod gateway;
mod memory_use;
mod scenarios;

/// `battery!(module, Fixture)`: every scenario against that fixture, in a
/// module of that name.
macro_rules! battery {
    ($backend:ident, $fixture:ty) => {
        mod $backend {
            battery!(@tests $fixture;
                login_needs_the_right_password,
                stat_list_uidl_top_and_retr_show_the_maildrop,
                hard_messages_have_exact_sizes,
                uidl_is_unique_printable_and_stable_across_sessions,
                dele_then_quit_removes_exactly_those,
                dele_then_dropped_connection_removes_nothing,
                rset_undoes_dele,
                new_mail_during_a_session_is_not_shown,
                pipelined_commands_get_replies_in_order,
                a_30_mb_message_is_streamed_in_bounded_memory,
                backend_down_is_sys_temp_and_deletes_nothing,
                a_message_another_client_flagged_deleted_is_left_alone,
                real_clients_list_retrieve_and_delete,
                on_delete_keep_removes_nothing,
                on_delete_expunge_removes_exactly_those,
                on_delete_trash_moves_exactly_those_to_the_trash,
                on_delete_archive_moves_exactly_those_to_the_archive,
                on_delete_flag_keeps_marks_and_hides_them,
                each_device_once_two_devices_get_each_message_once,
                each_device_once_with_keep_removes_nothing,
                only_unseen_hides_messages_marked_read,
                attachment_types_show_only_listed_attachments,
                oversize_notice_replaces_and_dele_removes_the_original,
            );
        }
    };
    (@tests $fixture:ty; $($scenario:ident),* $(,)?) => {
        /// The scenarios this module runs.
        #[allow(dead_code)]
        pub const SCENARIOS: &[&str] = &[$(stringify!($scenario)),*];

        $(
            #[test]
            fn $scenario() {
                let _running = crate::memory_use::running();
                crate::scenarios::$scenario::<$fixture>();
            }
        )*
    };
}

battery!(memory, crate::fixture::MemoryFixture);
battery!(dovecot, crate::fixture::DovecotFixture);
battery!(cyrus, crate::fixture::CyrusFixture);
battery!(cyrus_imap, crate::fixture::CyrusImapFixture);
battery!(gmail, crate::fixture::GmailFixture);
battery!(graph, crate::fixture::GraphFixture);
// The same scenarios with `[state] url` pointing at a Redis of the test's
// own: the embedded default and the shared store must behave alike.
battery!(memory_redis, crate::fixture::WithRedis<crate::fixture::MemoryFixture>);
battery!(dovecot_redis, crate::fixture::WithRedis<crate::fixture::DovecotFixture>);

/// A scenario written but missing from `battery!` would silently not run.
#[test]
fn battery_runs_every_scenario() {
    assert_eq!(memory::SCENARIOS, memory_redis::SCENARIOS);
    let written: Vec<&str> = include_str!("scenarios.rs")
        .lines()
        .filter_map(|line| line.strip_prefix("pub fn ")?.split_once("<F: Fixture>()").map(|(name, _)| name))
        .collect();
    assert_eq!(memory::SCENARIOS, written);
}
