//! The byte stream under async-imap: plain TCP or TLS, behind one type
//! because async-imap's `Client<T>` is generic over a single stream type and
//! STARTTLS changes the type mid-connection. Server octets pass through
//! `Literal8` (see there: RFC 3516 BINARY replies async-imap cannot parse). Also builds the rustls client
//! configuration (once per backend) and performs the TLS handshake.

use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::literal8::Literal8;
use crate::mail::BackendError;

/// A connection to the IMAP server, encrypted or not. What the server sends
/// goes through `Literal8` on its way to async-imap (BINARY replies).
///
/// async-imap is handed at most one response per read: it buffers what it
/// reads, so this way it never holds octets past the response it returns,
/// and between commands every octet not yet parsed is here. That is what
/// lets `Conn` read one FETCH literal itself, as it arrives (`divert`,
/// `take_literal`), instead of async-imap buffering it whole.
pub struct Transport {
    stream: Stream,
    literal8: Literal8,
    /// Read and rewritten, not yet handed on (from `handed`).
    ready: Vec<u8>,
    /// How much of `ready` was handed out already.
    handed: usize,
    /// Stream offset (octets out of `Literal8`) of `ready[0]`.
    base: u64,
    /// Stream offsets where responses end, in order, not yet handed past.
    ends: VecDeque<u64>,
    /// Where the last response handed on whole ended.
    last_end: u64,
    /// Octets of a diverted literal not yet taken: `take_literal` reads
    /// them; a reader that stops early leaves them to be skipped before
    /// async-imap reads on.
    literal_left: u64,
    /// The diverted response's first line, its literal announced as `{0}`:
    /// what async-imap gets in its place, once the literal is gone.
    stand_in: Vec<u8>,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Octets read from the server at a time.
const READ_SIZE: usize = 16 * 1024;
/// `ready` keeps no more capacity than this between messages: an idle
/// connection must stay small.
const IDLE_CAPACITY: usize = 64 * 1024;

impl Transport {
    pub fn plain(tcp: TcpStream) -> Self {
        Transport::new(Stream::Plain(tcp))
    }

    fn new(stream: Stream) -> Self {
        Transport {
            stream,
            literal8: Literal8::default(),
            ready: Vec::new(),
            handed: 0,
            base: 0,
            ends: VecDeque::new(),
            last_end: 0,
            literal_left: 0,
            stand_in: Vec::new(),
        }
    }

    /// The TCP connection of a cleartext transport (for STARTTLS). Anything
    /// the server sent and nobody read yet is dropped with it: nothing sent
    /// before the TLS handshake may be taken as said inside TLS.
    pub fn into_plain(self) -> Option<TcpStream> {
        match self.stream {
            Stream::Plain(tcp) => Some(tcp),
            Stream::Tls(_) => None,
        }
    }

    /// Read but not handed on.
    fn buffered(&self) -> &[u8] {
        &self.ready[self.handed..]
    }

    fn consume(&mut self, n: usize) {
        self.handed += n;
        let at = self.base + self.handed as u64;
        while let Some(&end) = self.ends.front()
            && end <= at
        {
            self.last_end = end;
            self.ends.pop_front();
        }
        if self.handed == self.ready.len() {
            self.base += self.ready.len() as u64;
            self.ready.clear();
            self.handed = 0;
            if self.ready.capacity() > IDLE_CAPACITY {
                self.ready = Vec::new();
            }
        }
    }

    /// One read from the server into `ready`. `false`: end of stream (with
    /// whatever was held passed on).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.handed > 0 && self.handed >= self.ready.len() / 2 {
            // Keep `ready` from growing with what was handed out already.
            self.ready.drain(..self.handed);
            self.base += self.handed as u64;
            self.handed = 0;
        }
        let mut scratch = [0u8; READ_SIZE];
        let mut read = ReadBuf::new(&mut scratch);
        let polled = match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, &mut read),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, &mut read),
        };
        let open = match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) if read.filled().is_empty() => {
                self.literal8.finish(&mut self.ready);
                false
            }
            Poll::Ready(Ok(())) => {
                self.literal8.feed(read.filled(), &mut self.ready);
                true
            }
        };
        let base = self.base;
        self.ends.extend(self.literal8.ends.drain(..).map(|end| base + end as u64));
        Poll::Ready(Ok(open))
    }

    /// Whether the server has closed the connection, found without
    /// waiting: what it sent meanwhile is read (and kept for async-imap),
    /// up to the end of the stream or until nothing more is there.
    pub fn closed_by_server(&mut self) -> bool {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..4 {
            match self.poll_fill(&mut cx) {
                Poll::Pending => return false,
                Poll::Ready(Ok(true)) => continue,
                Poll::Ready(Ok(false) | Err(_)) => return true,
            }
        }
        false
    }

    /// Reads until at least `n` octets are buffered (fewer at end of
    /// stream). The caller bounds the wait.
    pub async fn fill_to(&mut self, n: usize) -> io::Result<()> {
        while self.buffered().len() < n {
            if !std::future::poll_fn(|cx| self.poll_fill(cx)).await? {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"));
            }
        }
        Ok(())
    }

    /// Whether every octet handed to async-imap belonged to responses it
    /// has returned whole, so what comes next is here, unread. (Always, as
    /// long as it is only read through `Conn`, one response at a time.)
    pub fn between_responses(&self) -> bool {
        self.literal_left == 0 && self.stand_in.is_empty() && self.base + self.handed as u64 == self.last_end
    }

    /// The next response's first line (through its LF) as it will be
    /// parsed, reading until it is here. `None`: no LF within `max`
    /// octets. The caller bounds the wait.
    pub async fn peek_line(&mut self, max: usize) -> io::Result<Option<Vec<u8>>> {
        loop {
            let buffered = self.buffered();
            if let Some(i) = memchr::memchr(b'\n', buffered) {
                return Ok(Some(buffered[..=i].to_vec()));
            }
            if buffered.len() >= max {
                return Ok(None);
            }
            let want = buffered.len() + 1;
            self.fill_to(want).await?;
        }
    }

    /// Takes the next response's first line (`line_len` octets, as
    /// `peek_line` gave it) and the `literal` octets it announces out of
    /// what async-imap will read: the literal is read with `take_literal`
    /// (or skipped), and async-imap gets `stand_in` in place of the line.
    pub fn divert(&mut self, line_len: usize, literal: u64, stand_in: Vec<u8>) {
        self.consume(line_len);
        self.literal_left = literal;
        self.stand_in = stand_in;
    }

    /// Octets of the diverted literal not taken yet.
    pub fn literal_left(&self) -> u64 {
        self.literal_left
    }

    /// Up to `max` octets of the diverted literal: after reading until
    /// `want` of them (or all that is left) are buffered. The caller bounds
    /// the wait.
    pub async fn take_literal(&mut self, want: usize, max: usize) -> io::Result<Bytes> {
        let left = usize::try_from(self.literal_left).unwrap_or(usize::MAX);
        self.fill_to(want.clamp(1, max).min(left)).await?;
        let n = self.buffered().len().min(left).min(max);
        let bytes = Bytes::copy_from_slice(&self.buffered()[..n]);
        self.handed += n;
        if self.handed == self.ready.len() {
            self.consume(0);
        }
        self.literal_left -= n as u64;
        Ok(bytes)
    }
}

// async-imap requires Debug on the stream; the TLS state is of no interest.
impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.stream {
            Stream::Plain(_) => f.write_str("Transport::Plain"),
            Stream::Tls(_) => f.write_str("Transport::Tls"),
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // What a reader left of a diverted literal is skipped first.
            if this.literal_left > 0 {
                let n = usize::try_from(this.literal_left).unwrap_or(usize::MAX).min(this.buffered().len());
                if n > 0 {
                    this.literal_left -= n as u64;
                    this.handed += n;
                    this.consume(0);
                    continue;
                }
            } else if !this.stand_in.is_empty() {
                let n = buf.remaining().min(this.stand_in.len());
                buf.put_slice(&this.stand_in[..n]);
                this.stand_in.drain(..n);
                return Poll::Ready(Ok(()));
            } else if !this.buffered().is_empty() {
                // Never past the end of a response (see the type).
                let at = this.base + this.handed as u64;
                let to_end =
                    this.ends.front().map_or(usize::MAX, |&end| usize::try_from(end - at).unwrap_or(usize::MAX));
                let n = buf.remaining().min(this.buffered().len()).min(to_end);
                buf.put_slice(&this.buffered()[..n]);
                this.consume(n);
                return Poll::Ready(Ok(()));
            }
            match this.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // End of stream: EOF once nothing is left to hand on.
                Poll::Ready(Ok(false)) if this.buffered().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// What every TLS connection of a backend shares: the verified-against roots
/// and the name the certificate must carry.
#[derive(Clone)]
pub struct TlsSetup {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl TlsSetup {
    /// Builds the rustls configuration: the system's trust store plus the
    /// CA certificates in `ca_file` (`backend::trust`). The ring provider is
    /// chosen explicitly so that nothing depends on a process-wide default
    /// provider being installed (or on which other crate installed which).
    pub fn new(host: &str, ca_file: Option<&Path>) -> Result<Self, BackendError> {
        let roots = crate::backend::trust::roots(ca_file).map_err(BackendError::Permanent)?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| BackendError::Permanent(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| BackendError::Permanent(format!("{host:?} is not a valid TLS server name: {e}")))?;
        Ok(TlsSetup { connector: TlsConnector::from(Arc::new(config)), server_name })
    }

    /// The TLS handshake over an established TCP connection (the caller
    /// bounds it with the command timeout).
    pub async fn handshake(&self, tcp: TcpStream) -> io::Result<Transport> {
        let tls = self.connector.connect(self.server_name.clone(), tcp).await?;
        Ok(Transport::new(Stream::Tls(Box::new(tls))))
    }
}
