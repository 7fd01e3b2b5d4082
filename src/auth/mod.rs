//! Who logs in and which backend account that reaches: routing, device
//! users, OAuth2 and the token store. The credentials themselves are shared
//! words (`crate::mail`). Never logs a secret.
//!
//! - `accounts`: the `Router` seam (which backend account a login reaches);
//!   `accounts::config`, the `[[account]]` tables and their checks;
//!   `accounts::router`, the `AccountRouter` (pass-through by user or
//!   domain; mapped device users).
//! - `passwords`: Argon2id device password hashes; secrets from environment
//!   variables or files.
//! - `oauth`: providers, the token endpoint client, `popgate oauth login`
//!   flows and commands.
//! - `tokens`: the encrypted token store and per-account refresh.

pub mod accounts;
pub mod oauth;
pub mod passwords;
pub mod tokens;
