//! A recording TCP proxy on 127.0.0.1, put between popgate and its backend
//! to see exactly what popgate sends (or that it opens no connection at all).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Record {
    connections: AtomicUsize,
    /// Everything the proxy's clients sent upstream, in arrival order.
    sent: Mutex<Vec<u8>>,
    stopping: AtomicBool,
}

pub struct RecordingProxy {
    pub addr: SocketAddr,
    record: Arc<Record>,
}

impl RecordingProxy {
    /// Forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let record = Arc::new(Record::default());
        let shared = record.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                let (client_in, server_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = shared.clone();
                std::thread::spawn(move || pump(client_in, server_out, Some(up)));
                std::thread::spawn(move || pump(server, client, None));
            }
        });
        RecordingProxy { addr, record }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.record.connections.load(Ordering::SeqCst)
    }

    /// Every octet sent upstream so far.
    pub fn sent(&self) -> Vec<u8> {
        self.record.sent.lock().unwrap().clone()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.record.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

/// Copies `from` to `to` until either side closes; records if asked.
fn pump(mut from: TcpStream, mut to: TcpStream, record: Option<Arc<Record>>) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(record) = &record {
                    record.sent.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
