//! SMTP submission (RFC 6409), with no I/O: framing and parsing
//! (`command`), the state machine with the account's envelope rules
//! (`session`) and the one writer of protocol bytes (`reply`). Nothing here
//! knows tokio, a socket or the upstream; the driver in
//! `server::submission` feeds it lines and performs the steps it asks for
//! (check a login, relay a message).

pub mod command;
pub mod reply;
pub mod session;

pub use command::{Command, Line, LineReader};
pub use reply::Reply;
pub use session::{Envelope, RelayFailure, Rule, SenderRules, Session, SessionConfig, Step, header_recipients};
