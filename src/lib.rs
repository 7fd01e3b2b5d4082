//! popgate: a POP3 server whose maildrop lives in a remote mail store.
//!
//! # Layout
//! - `mail`: the shared words (credentials, secrets, message ids, failure
//!   classes); imports nothing else of the crate.
//! - `pop3`: the protocol, sans I/O — command parser, response writer,
//!   session state machine, maildrop snapshot.
//! - `smtp`: SMTP submission, sans I/O — the same shape as `pop3` (scanners
//!   sending scans), with the account's envelope rules.
//! - `canonical`: the CRLF form of a message, shared by sizing and sending.
//! - `lines`: bounded line framing, shared by the two protocol cores.
//! - `backend`: the `Backend`/`Mailbox` traits and one module per store
//!   (IMAP, JMAP, Gmail API, Microsoft Graph, the demo memory store), shared
//!   HTTP helpers, exact-size resolution and warm sessions common to all.
//! - `server`: listeners (TLS, STLS, login policy), limits and throttling,
//!   the per-connection driver, the admin listener, reload and shutdown.
//! - `auth`: client credentials and the secret type that never prints;
//!   routing of logins to backend accounts (pass-through or mapped device
//!   users), OAuth2 flows and the encrypted token store.
//! - `state`: state shared between replicas (Redis) or kept per process
//!   (the embedded default), behind one seam.
//! - `config`: the TOML configuration and `check-config`.
//! - `telemetry`: logging and Prometheus metrics.

#![forbid(unsafe_code)]

pub mod auth;
pub mod backend;
pub mod canonical;
pub mod config;
pub mod lines;
pub mod mail;
pub mod pop3;
pub mod server;
pub mod smtp;
pub mod state;
pub mod telemetry;
