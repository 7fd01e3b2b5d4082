//! popgate: a POP3 server whose maildrop lives in a remote mail store.
//!
//! # Layout
//! - `pop3`: the protocol, sans I/O — command parser, response writer,
//!   session state machine, maildrop snapshot.
//! - `canonical`: the CRLF form of a message, shared by sizing and sending.
//! - `backend`: the `Backend`/`Mailbox` traits and one file per store (IMAP,
//!   demo memory store), plus exact-size resolution common to all.
//! - `server`: listeners, the per-connection driver, shutdown.
//! - `auth`: client credentials and the secret type that never prints.
//! - `config`: the TOML configuration and `check-config`.
//! - `telemetry`: logging.

pub mod auth;
pub mod backend;
pub mod canonical;
pub mod config;
pub mod pop3;
pub mod server;
pub mod telemetry;
