//! The byte stream under async-imap: plain TCP or TLS, behind one type
//! because async-imap's `Client<T>` is generic over a single stream type and
//! STARTTLS changes the type mid-connection. Server octets pass through
//! `Literal8` (see there: RFC 3516 BINARY replies async-imap cannot parse). Also builds the rustls client
//! configuration (once per backend) and performs the TLS handshake.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::literal8::Literal8;
use crate::mail::BackendError;

/// A connection to the IMAP server, encrypted or not. What the server sends
/// goes through `Literal8` on its way to async-imap (BINARY replies).
pub struct Transport {
    stream: Stream,
    literal8: Literal8,
    /// Read and rewritten, not yet handed to the reader.
    ready: Vec<u8>,
    /// How much of `ready` was handed out already.
    handed: usize,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Octets read from the server at a time.
const READ_SIZE: usize = 16 * 1024;

impl Transport {
    pub fn plain(tcp: TcpStream) -> Self {
        Transport::new(Stream::Plain(tcp))
    }

    fn new(stream: Stream) -> Self {
        Transport { stream, literal8: Literal8::default(), ready: Vec::new(), handed: 0 }
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
            if this.handed < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.handed);
                buf.put_slice(&this.ready[this.handed..this.handed + n]);
                this.handed += n;
                if this.handed == this.ready.len() {
                    this.ready.clear();
                    this.handed = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; READ_SIZE];
            let mut read = ReadBuf::new(&mut scratch);
            let polled = match &mut this.stream {
                Stream::Plain(s) => Pin::new(s).poll_read(cx, &mut read),
                Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, &mut read),
            };
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // End of stream: pass on whatever was held, then EOF.
                    this.literal8.finish(&mut this.ready);
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                // A held partial line yields nothing yet: read on.
                Poll::Ready(Ok(())) => this.literal8.feed(read.filled(), &mut this.ready),
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
