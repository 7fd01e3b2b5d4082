//! TLS for tests: a private CA and server certificates made at run time
//! (rcgen), written as PEM files into a temporary directory; and a blocking
//! POP3 client that speaks cleartext, STLS and implicit TLS (rustls), from
//! any address of 127.0.0.0/8.
//!
//! Nothing here trusts popgate's own TLS code: certificates are checked by
//! the client against the test CA, and each certificate has its own
//! common name, so a test can tell which one it was given.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use popgate::server::tls::CertificateConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};

use super::IO_TIMEOUT;
use super::pop3::Dialogue;

/// A certificate authority that exists only for one test, and the directory
/// its files live in (removed on drop).
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (PEM), for `--cacert`, `-CAfile`, `cafile=`.
    pub ca_file: PathBuf,
    ca_der: CertificateDer<'static>,
    dir: tempfile::TempDir,
}

/// A server certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The leaf certificate (DER), to compare with what a client was given.
    pub der: Vec<u8>,
    /// Its subject's common name (unique per issued certificate).
    pub common_name: String,
    /// Its DNS subjectAltNames.
    pub names: Vec<String>,
}

impl ServerCert {
    /// The `[tls] certificates` entry for it (names from its SANs).
    pub fn config(&self) -> CertificateConfig {
        CertificateConfig { cert: self.cert.clone(), key: self.key.clone(), names: Vec::new() }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = tempfile::Builder::new().prefix("popgate-tls-").tempdir().expect("tempdir");
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, "popgate test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2090, 1, 1);
        let cert = params.self_signed(&key).expect("self-sign the CA");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).expect("write ca.pem");
        TestCa { issuer: Issuer::new(params, key), ca_file, ca_der: cert.der().clone(), dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues a certificate for `names` (DNS subjectAltNames) with the
    /// common name `common_name`, written to `STEM.crt` and `STEM.key`.
    pub fn issue(&self, stem: &str, common_name: &str, names: &[&str]) -> ServerCert {
        let (cert_pem, key_pem, der) = self.make(common_name, names);
        let cert = self.dir.path().join(format!("{stem}.crt"));
        let key = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert, cert_pem).expect("write certificate");
        std::fs::write(&key, key_pem).expect("write key");
        ServerCert {
            cert,
            key,
            der,
            common_name: common_name.to_string(),
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    /// A new key and certificate (common name `common_name`, same names)
    /// replacing `old`'s files, each by an atomic rename: the key first, then
    /// the certificate. Returns the new one.
    pub fn replace(&self, old: &ServerCert, common_name: &str) -> ServerCert {
        let names: Vec<&str> = old.names.iter().map(String::as_str).collect();
        let (cert_pem, key_pem, der) = self.make(common_name, &names);
        for (path, content) in [(&old.key, key_pem), (&old.cert, cert_pem)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, content).expect("write replacement");
            std::fs::rename(&tmp, path).expect("rename replacement into place");
        }
        ServerCert { der, common_name: common_name.to_string(), ..old.clone() }
    }

    fn make(&self, common_name: &str, names: &[&str]) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("server params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2090, 1, 1);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).expect("sign server certificate");
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    /// A rustls client configuration trusting only this CA, TLS 1.2 and 1.3.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client_config_for(&[&rustls::version::TLS13, &rustls::version::TLS12])
    }

    /// The same, limited to `versions`.
    pub fn client_config_for(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add the test CA");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

/// A TCP connection to `addr` from `local` (any 127.0.0.0/8 address, so a
/// test can play several client hosts), with the harness timeouts.
pub fn tcp_from(local: IpAddr, addr: SocketAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(local, 0)).unwrap_or_else(|e| panic!("bind {local}: {e}"));
        let stream = tokio::time::timeout(IO_TIMEOUT, socket.connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect {local} -> {addr}: timed out"))
            .unwrap_or_else(|e| panic!("connect {local} -> {addr}: {e}"));
        stream.into_std().expect("into_std")
    });
    stream.set_nonblocking(false).expect("blocking");
    with_timeouts(stream)
}

pub fn tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    with_timeouts(stream)
}

fn with_timeouts(stream: TcpStream) -> TcpStream {
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("write timeout");
    let _ = stream.set_nodelay(true);
    stream
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Runs a TLS handshake on `tcp` for the server name `name`.
pub fn handshake(
    mut tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<TlsStream, std::io::Error> {
    let server_name = ServerName::try_from(name.to_string()).expect("server name");
    let mut conn = rustls::ClientConnection::new(config, server_name).map_err(std::io::Error::other)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// A strict, blocking POP3 client over any byte stream: cleartext TCP, or
/// TLS from the first byte or after STLS. No read waits longer than
/// `IO_TIMEOUT`; every line must end in CRLF.
pub struct Client<S: Read + Write> {
    reader: BufReader<S>,
    pub greeting: String,
}

impl Client<TcpStream> {
    /// Cleartext from 127.0.0.1; checks the greeting.
    pub fn connect(addr: SocketAddr) -> Self {
        Self::greet(tcp(addr))
    }

    /// Cleartext from `local`; checks the greeting.
    pub fn connect_from(local: IpAddr, addr: SocketAddr) -> Self {
        Self::greet(tcp_from(local, addr))
    }

    /// A connection whose greeting has not been read.
    pub fn raw(stream: TcpStream) -> Self {
        Client { reader: BufReader::with_capacity(64 * 1024, stream), greeting: String::new() }
    }

    fn greet(stream: TcpStream) -> Self {
        let mut client = Self::raw(stream);
        let greeting = client.line();
        assert!(greeting.starts_with("+OK"), "greeting: {greeting:?}");
        client.greeting = greeting;
        client
    }

    /// Sends STLS, expects +OK, and runs the handshake. Panics if the server
    /// sent anything after its +OK in cleartext (that would be read as if it
    /// came under TLS by a careless client).
    pub fn stls(mut self, config: Arc<rustls::ClientConfig>, name: &str) -> Client<TlsStream> {
        self.ok("STLS");
        self.start_tls(config, name).unwrap_or_else(|e| panic!("TLS handshake after STLS: {e}"))
    }

    /// The handshake on this connection now (after an STLS reply was read).
    pub fn start_tls(self, config: Arc<rustls::ClientConfig>, name: &str) -> Result<Client<TlsStream>, std::io::Error> {
        assert!(
            self.reader.buffer().is_empty(),
            "the server sent cleartext after its STLS reply: {:?}",
            String::from_utf8_lossy(self.reader.buffer())
        );
        let tls = handshake(self.reader.into_inner(), config, name)?;
        Ok(Client { reader: BufReader::with_capacity(64 * 1024, tls), greeting: self.greeting })
    }

    /// The TCP stream, once everything received was read.
    pub fn into_stream(self) -> TcpStream {
        assert!(self.reader.buffer().is_empty(), "unread: {:?}", String::from_utf8_lossy(self.reader.buffer()));
        self.reader.into_inner()
    }

    /// Closes abruptly, without QUIT.
    pub fn drop_connection(self) {
        let _ = self.reader.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

impl Client<TlsStream> {
    /// Implicit TLS from `local` to `addr` for the server name `name`;
    /// checks the greeting.
    pub fn implicit(local: IpAddr, addr: SocketAddr, config: Arc<rustls::ClientConfig>, name: &str) -> Self {
        Self::try_implicit(local, addr, config, name).unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"))
    }

    pub fn try_implicit(
        local: IpAddr,
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> Result<Self, std::io::Error> {
        let tls = handshake(tcp_from(local, addr), config, name)?;
        let mut client = Client { reader: BufReader::with_capacity(64 * 1024, tls), greeting: String::new() };
        let greeting = client.line();
        assert!(greeting.starts_with("+OK"), "greeting: {greeting:?}");
        client.greeting = greeting;
        Ok(client)
    }

    /// The leaf certificate the server presented (DER).
    pub fn peer_certificate(&self) -> Vec<u8> {
        let certs = self.reader.get_ref().conn.peer_certificates().expect("a server certificate");
        certs[0].to_vec()
    }

    pub fn protocol_version(&self) -> rustls::ProtocolVersion {
        self.reader.get_ref().conn.protocol_version().expect("negotiated")
    }
}

impl<S: Read + Write> Dialogue for Client<S> {
    fn send(&mut self, line: &str) {
        Client::send(self, line)
    }

    fn line(&mut self) -> String {
        Client::line(self)
    }
}

impl<S: Read + Write> Client<S> {
    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes());
    }

    /// Writes the bytes in one write (one TCP segment or TLS record, for
    /// the sizes tests use).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let stream = self.reader.get_mut();
        stream.write_all(bytes).unwrap_or_else(|e| panic!("write: {e}"));
        stream.flush().unwrap_or_else(|e| panic!("flush: {e}"));
    }

    /// The next line without CRLF; `None` when the server closed.
    pub fn try_line(&mut self) -> Option<String> {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("no complete line within {IO_TIMEOUT:?} (got {:?})", String::from_utf8_lossy(&line))
            }
            Err(e) if line.is_empty() && matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof) => {
                return None;
            }
            Err(e) => panic!("read: {e}"),
        }
        assert!(line.ends_with(b"\r\n"), "line not ended by CRLF: {:?}", String::from_utf8_lossy(&line));
        line.truncate(line.len() - 2);
        Some(String::from_utf8_lossy(&line).into_owned())
    }

    pub fn line(&mut self) -> String {
        self.try_line().expect("the server closed the connection while a line was expected")
    }

    /// A multi-line body up to ".", un-stuffed, without CRLFs.
    pub fn body_lines(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            if line == "." {
                return lines;
            }
            lines.push(line.strip_prefix('.').map(str::to_string).unwrap_or(line));
        }
    }

    pub fn capa(&mut self) -> Vec<String> {
        self.ok("CAPA");
        self.body_lines()
    }

    /// RETR n: the message, each line with CRLF.
    pub fn retr(&mut self, n: u32) -> Vec<u8> {
        self.ok(&format!("RETR {n}"));
        let mut out = Vec::new();
        for line in self.body_lines() {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    pub fn stat(&mut self) -> (usize, u64) {
        super::pop3::parse_stat(&self.ok("STAT"))
    }

    pub fn user_pass(&mut self, user: &str, password: &str) -> String {
        self.ok(&format!("USER {user}"));
        self.ok(&format!("PASS {password}"))
    }

    /// QUIT; the server must then close.
    pub fn quit(&mut self) -> String {
        let reply = self.cmd("QUIT");
        self.expect_closed();
        reply
    }

    pub fn expect_closed(&mut self) {
        if let Some(line) = self.try_line() {
            panic!("expected the server to close the connection; got {line:?}");
        }
    }
}

/// Whether CAPA lists `name` as a capability (the first word of a line).
pub fn has_capability(capa: &[String], name: &str) -> bool {
    capa.iter().any(|line| line.split(' ').next().is_some_and(|w| w.eq_ignore_ascii_case(name)))
}

/// The SASL mechanisms CAPA lists (empty without a SASL line).
pub fn sasl_mechanisms(capa: &[String]) -> Vec<String> {
    capa.iter()
        .find_map(|line| line.strip_prefix("SASL "))
        .map(|m| m.split(' ').map(str::to_string).collect())
        .unwrap_or_default()
}
