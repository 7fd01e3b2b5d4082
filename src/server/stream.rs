//! The client connection's byte stream, which STLS can turn from cleartext
//! into TLS halfway through a session.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only during an upgrade; never read or written.
    Upgrading,
}

impl ClientStream {
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Runs the TLS handshake on a cleartext stream (implicit TLS or STLS).
    pub async fn upgrade(&mut self, config: Arc<rustls::ServerConfig>) -> io::Result<()> {
        let ClientStream::Plain(tcp) = std::mem::replace(self, ClientStream::Upgrading) else {
            return Err(io::Error::other("TLS is already active"));
        };
        let tls = TlsAcceptor::from(config).accept(tcp).await?;
        *self = ClientStream::Tls(Box::new(tls));
        Ok(())
    }
}

impl ClientStream {
    /// Writes the replies queued in `out` and flushes, within `limit`: a
    /// client that stops reading must not hold a session (and its backend
    /// connection) forever. `out` is empty afterwards when all went out.
    pub async fn send_queued(&mut self, out: &mut Vec<u8>, limit: std::time::Duration) -> io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let write = async {
            if !out.is_empty() {
                self.write_all(out).await?;
                out.clear();
            }
            self.flush().await
        };
        tokio::time::timeout(limit, write)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))?
    }
}

/// What waiting for the client gave.
pub enum ClientRead {
    /// The server is shutting down.
    Stopped,
    /// Nothing arrived before the deadline.
    TimedOut,
    /// The client closed the connection.
    Closed,
    /// This many octets arrived in the buffer.
    Data(usize),
}

impl ClientStream {
    /// Reads what the client sends next, until `deadline` or until
    /// `stopped` completes (shutdown wins a tie). Shared by the POP3 and
    /// submission drivers.
    pub async fn read_before(
        &mut self,
        buf: &mut [u8],
        deadline: tokio::time::Instant,
        stopped: impl std::future::Future<Output = ()>,
    ) -> io::Result<ClientRead> {
        use tokio::io::AsyncReadExt as _;
        tokio::select! {
            biased;
            _ = stopped => Ok(ClientRead::Stopped),
            read = tokio::time::timeout_at(deadline, self.read(buf)) => match read {
                Err(_) => Ok(ClientRead::TimedOut),
                Ok(Ok(0)) => Ok(ClientRead::Closed),
                Ok(Ok(n)) => Ok(ClientRead::Data(n)),
                Ok(Err(e)) => Err(e),
            },
        }
    }
}

fn upgrading() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream is being upgraded to TLS")
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientStream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Upgrading => Poll::Ready(Ok(())),
        }
    }
}
