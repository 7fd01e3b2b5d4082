//! Client credentials as they travel from the POP3 session to a backend,
//! and the accounts they reach.
//!
//! Owns the `Secret` type, which never prints its content (Debug and Display
//! are redacted), and the check that refuses credentials a backend command
//! could be confused by. Never logs a secret.
//!
//! - `accounts`: the `Router` seam (which backend account a login reaches).
//! - `routing`: `[[account]]` configuration and the `AccountRouter`
//!   (pass-through by user or domain; mapped device users).
//! - `passwords`: Argon2id device password hashes; secrets from environment
//!   variables or files.
//! - `oauth`: providers, the token endpoint client, `popgate oauth login`
//!   flows and commands.
//! - `tokens`: the encrypted token store and per-account refresh.

pub mod accounts;
pub mod oauth;
pub mod passwords;
pub mod routing;
pub mod tokens;
