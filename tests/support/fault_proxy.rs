//! A TCP fault proxy on 127.0.0.1, put between popgate and a real backend
//! (Dovecot's IMAP, Cyrus's JMAP over HTTP) to break one connection at a
//! chosen point and see what popgate makes of it.
//!
//! It forwards octets both ways unchanged until its one `Plan` fires, on
//! the first connection that reaches the plan's `Trigger`: after the client
//! has sent a pattern for the n-th time (counted over all connections; a
//! command, an HTTP method name, a blob id), optionally after the server
//! has then sent a pattern of its own (the end of a literal's announcement,
//! of HTTP headers), and after a number of further server octets. Then:
//!
//! - `Stall`: nothing more is forwarded either way, and both connections
//!   stay open: the client must give up on its own (its timeout).
//! - `Reset`: the client's connection is reset (SO_LINGER 0, then closed:
//!   an RST, not a FIN).
//! - `Truncate`: the client's connection is closed cleanly (a FIN) after
//!   exactly the octets allowed.
//! - `Delay`: the server's octets are held for a while at that point, then
//!   everything is forwarded (the connection stays whole).
//!
//! The server's connection is never broken by the fault: what the server
//! still sends is read and dropped until it closes, so a command that
//! reached it completes there (an EXPUNGE whose reply is lost has really
//! expunged). A client closing its side is passed on as a FIN, as a proxy
//! would. After the plan fired, later connections pass untouched.
//!
//! Separate from `proxy::RecordingProxy` (which only records): blocking
//! threads, one pair per connection, each polling a stop flag every 50 ms.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// How often blocked reads look at the stop flags.
const POLL: Duration = Duration::from_millis(50);
/// Client octets kept for `sent` (what a test may want to look at).
const RECORD_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Stop forwarding, keep the connection open.
    Stall,
    /// TCP reset of the client's connection.
    Reset,
    /// Clean close (FIN) of the client's connection.
    Truncate,
    /// Hold the server's octets this long at the trigger, then forward
    /// everything as if nothing happened: a slow backend, not a broken one.
    Delay(Duration),
}

/// Where a fault hits. Octets are counted in the server→client stream.
#[derive(Debug, Clone)]
pub struct Trigger {
    /// The client has sent this pattern for the `n`-th time (1-based,
    /// counted over all connections). `None`: from the start of the first
    /// connection.
    pub client_sent: Option<(Vec<u8>, usize)>,
    /// Then the server has sent this pattern (on that connection).
    pub server_sent: Option<Vec<u8>>,
    /// Then this many more server octets are forwarded, and no more.
    pub octets: u64,
}

impl Trigger {
    /// `octets` server octets into the first connection.
    pub fn at_octet(octets: u64) -> Trigger {
        Trigger { client_sent: None, server_sent: None, octets }
    }

    /// `octets` server octets after the `occurrence`-th time the client
    /// sent `pattern` (0: the reply to it is not forwarded at all).
    pub fn after_client(pattern: &[u8], occurrence: usize, octets: u64) -> Trigger {
        Trigger { client_sent: Some((pattern.to_vec(), occurrence)), server_sent: None, octets }
    }

    /// And then only once the server has sent `pattern`.
    pub fn then_server(mut self, pattern: &[u8]) -> Trigger {
        self.server_sent = Some(pattern.to_vec());
        self
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub trigger: Trigger,
    pub fault: Fault,
}

/// One connection's progress towards its fault.
#[derive(Default)]
struct Progress {
    /// This connection carries the plan (its client pattern was seen here).
    armed: bool,
    /// Waiting for this server pattern before counting octets.
    awaiting: Option<Vec<u8>>,
    /// Server octets read on this connection so far.
    server_octets: u64,
    /// Server octets that may be forwarded, once known.
    limit: Option<u64>,
    /// The fault happened on this connection.
    faulted: Option<Fault>,
}

struct Connection {
    /// Shared by both pumps for reading and writing (`&TcpStream` does
    /// both); taken out and dropped to reset it.
    client: RwLock<Option<TcpStream>>,
    server: TcpStream,
    progress: Mutex<Progress>,
    /// The client's side is finished (closed by us or by it).
    client_done: AtomicBool,
}

struct Shared {
    plan: Mutex<Option<Plan>>,
    /// Times the client pattern was seen, over all connections.
    seen: AtomicUsize,
    fired: Mutex<Option<String>>,
    connections: AtomicUsize,
    sent: Mutex<Vec<u8>>,
    stopping: AtomicBool,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Forwards every connection to `upstream`; `plan` fires once.
    pub fn start(upstream: SocketAddr, plan: Option<Plan>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fault proxy");
        let addr = listener.local_addr().expect("fault proxy addr");
        let shared = Arc::new(Shared {
            plan: Mutex::new(plan),
            seen: AtomicUsize::new(0),
            fired: Mutex::new(None),
            connections: AtomicUsize::new(0),
            sent: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
        });
        let accepting = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accepting.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                accepting.connections.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                for stream in [&client, &server] {
                    let _ = stream.set_nodelay(true);
                    let _ = stream.set_read_timeout(Some(POLL));
                }
                let mut progress = Progress::default();
                {
                    let plan = accepting.plan.lock().unwrap();
                    if let Some(plan) = plan.as_ref()
                        && plan.trigger.client_sent.is_none()
                        && accepting.fired.lock().unwrap().is_none()
                        && accepting.seen.fetch_add(1, Ordering::SeqCst) == 0
                    {
                        arm(&mut progress, &plan.trigger);
                    }
                }
                let connection = Arc::new(Connection {
                    client: RwLock::new(Some(client)),
                    server,
                    progress: Mutex::new(progress),
                    client_done: AtomicBool::new(false),
                });
                let (up, down) = (connection.clone(), accepting.clone());
                let shared_up = accepting.clone();
                std::thread::spawn(move || upstream_pump(&up, &shared_up));
                let connection_down = connection;
                std::thread::spawn(move || downstream_pump(&connection_down, &down));
            }
        });
        FaultProxy { addr, shared }
    }

    /// What happened, once the plan fired ("reset after 1234 server
    /// octets of connection 2"); `None` if it never did.
    pub fn fired(&self) -> Option<String> {
        self.shared.fired.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The first MiB clients sent upstream, in arrival order.
    pub fn sent(&self) -> Vec<u8> {
        self.shared.sent.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

fn arm(progress: &mut Progress, trigger: &Trigger) {
    progress.armed = true;
    match &trigger.server_sent {
        Some(pattern) => progress.awaiting = Some(pattern.clone()),
        None => progress.limit = Some(progress.server_octets + trigger.octets),
    }
}

/// Client → server: counts the client pattern, arms the connection that
/// completes its n-th occurrence before forwarding it (so no reply can slip
/// past), and passes the client's close on.
fn upstream_pump(connection: &Connection, shared: &Shared) {
    let pattern = shared.plan.lock().unwrap().as_ref().and_then(|p| p.trigger.client_sent.clone());
    let mut carry: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if shared.stopping.load(Ordering::SeqCst) || connection.client_done.load(Ordering::SeqCst) {
            break;
        }
        let read = match connection.client.read().unwrap().as_ref() {
            Some(mut client) => client.read(&mut buf),
            None => break,
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        let data = &buf[..n];
        {
            let mut sent = shared.sent.lock().unwrap();
            let room = RECORD_LIMIT.saturating_sub(sent.len()).min(n);
            sent.extend_from_slice(&data[..room]);
        }
        if let Some((pattern, occurrence)) = &pattern {
            carry.extend_from_slice(data);
            let found = count(&carry, pattern);
            if found > 0 {
                let before = shared.seen.fetch_add(found, Ordering::SeqCst);
                if before < *occurrence && before + found >= *occurrence {
                    let plan = shared.plan.lock().unwrap();
                    if let Some(plan) = plan.as_ref() {
                        arm(&mut connection.progress.lock().unwrap(), &plan.trigger);
                    }
                }
                // Keep only what follows the last match.
                let last = find_last(&carry, pattern).expect("found") + pattern.len();
                carry.drain(..last);
            }
            let keep = pattern.len().saturating_sub(1);
            let excess = carry.len().saturating_sub(keep);
            carry.drain(..excess);
        }
        if connection.progress.lock().unwrap().faulted.is_some() {
            continue; // a stalled or closed connection forwards nothing
        }
        if (&connection.server).write_all(data).is_err() {
            break;
        }
    }
    connection.client_done.store(true, Ordering::SeqCst);
    let _ = connection.server.shutdown(Shutdown::Write);
}

/// Server → client: forwards up to the armed limit, then performs the
/// fault; afterwards drains the server until it closes.
fn downstream_pump(connection: &Connection, shared: &Shared) {
    let fault = shared.plan.lock().unwrap().as_ref().map(|p| p.fault);
    let mut buf = vec![0u8; 64 * 1024];
    let mut window: Vec<u8> = Vec::new();
    let mut server_closed = false;
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let n = match (&connection.server).read(&mut buf) {
            Ok(0) => {
                server_closed = true;
                break;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => {
                server_closed = true;
                break;
            }
        };
        let data = &buf[..n];
        let allowed = {
            let mut progress = connection.progress.lock().unwrap();
            if progress.faulted.is_some() {
                progress.server_octets += n as u64;
                continue; // drained
            }
            if progress.armed
                && let Some(pattern) = progress.awaiting.clone()
            {
                // Look for the server pattern in what came since arming.
                let start = window.len();
                window.extend_from_slice(data);
                if let Some(at) = find_first(&window, &pattern) {
                    let end_in_data = (at + pattern.len()).saturating_sub(start);
                    let trigger_octets = shared.plan.lock().unwrap().as_ref().map(|p| p.trigger.octets).unwrap_or(0);
                    progress.awaiting = None;
                    progress.limit = Some(progress.server_octets + end_in_data as u64 + trigger_octets);
                    window.clear();
                } else {
                    let keep = pattern.len().saturating_sub(1);
                    let excess = window.len().saturating_sub(keep);
                    window.drain(..excess);
                }
            }
            let allowed = match progress.limit {
                Some(limit) => limit.saturating_sub(progress.server_octets).min(n as u64) as usize,
                None => n,
            };
            progress.server_octets += n as u64;
            allowed
        };
        if allowed > 0 {
            let written = match connection.client.read().unwrap().as_ref() {
                Some(mut client) => client.write_all(&data[..allowed]),
                None => Err(ErrorKind::NotConnected.into()),
            };
            if written.is_err() {
                break;
            }
        }
        if allowed < n {
            let fault = fault.expect("a limit comes from a plan");
            let at = connection.progress.lock().unwrap().server_octets - (n - allowed) as u64;
            if let Fault::Delay(pause) = fault {
                std::thread::sleep(pause);
                connection.progress.lock().unwrap().limit = None;
                *shared.fired.lock().unwrap() =
                    Some(format!("delay of {} ms after {at} server octets", pause.as_millis()));
                *shared.plan.lock().unwrap() = None;
                let written = match connection.client.read().unwrap().as_ref() {
                    Some(mut client) => client.write_all(&data[allowed..]),
                    None => Err(ErrorKind::NotConnected.into()),
                };
                if written.is_err() {
                    break;
                }
                continue;
            }
            // Recorded before the fault is performed: popgate reacts to it
            // (and the test reads `fired`) as soon as it is.
            *shared.fired.lock().unwrap() = Some(format!("{fault:?} after {at} server octets").to_lowercase());
            *shared.plan.lock().unwrap() = None;
            perform(connection, fault);
            connection.progress.lock().unwrap().faulted = Some(fault);
        }
    }
    // Pass a server close on (unless a fault decided otherwise).
    if server_closed
        && connection.progress.lock().unwrap().faulted.is_none()
        && let Some(client) = connection.client.read().unwrap().as_ref()
    {
        let _ = client.shutdown(Shutdown::Write);
    }
}

fn perform(connection: &Connection, fault: Fault) {
    match fault {
        Fault::Stall | Fault::Delay(_) => {}
        Fault::Truncate => {
            if let Some(client) = connection.client.read().unwrap().as_ref() {
                let _ = client.shutdown(Shutdown::Both);
            }
            connection.client_done.store(true, Ordering::SeqCst);
        }
        Fault::Reset => {
            // SO_LINGER 0: closing sends an RST (a shutdown would send a FIN
            // first). The write lock waits for a read in progress (POLL).
            connection.client_done.store(true, Ordering::SeqCst);
            let mut client = connection.client.write().unwrap();
            if let Some(stream) = client.as_ref() {
                let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
            }
            *client = None;
        }
    }
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || haystack.len() < needle.len() {
        return 0;
    }
    haystack.windows(needle.len()).filter(|w| *w == needle).count()
}

fn find_first(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}
