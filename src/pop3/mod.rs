//! The POP3 protocol, with no I/O: framing and parsing (`command`), the
//! state machine (`session`), the login snapshot (`maildrop`), SASL decoding
//! (`sasl`) and the one writer of protocol bytes (`response`). Nothing here
//! knows tokio or a socket; the driver in `server` feeds it lines and performs
//! the steps it asks for.

pub mod command;
pub mod maildrop;
pub mod response;
pub mod sasl;
pub mod session;

pub use command::{Command, Line, LineReader};
pub use maildrop::{Maildrop, Message};
pub use response::{BodyEncoder, Response, ResponseCode};
pub use session::{Retention, Session, SessionConfig, Step};
