//! Listeners: accept connections (TLS or, when configured explicitly, plain), serve HTTP/1.1
//! and HTTP/2 on them, and shut down gracefully.
//!
//! This module knows nothing of policy or data: it hands each request and the peer address to
//! a handler and writes back what the handler returns. On shutdown it stops accepting, lets
//! in-flight requests finish (bounded by a grace period), then ends the connections still open
//! (dropping their handlers, which record what they leave unanswered) and returns, so the
//! caller can flush the audit log after the last record has been queued.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::connection::{Activity, Tracked, drive};
use crate::request_head;
use tokio_rustls::TlsAcceptor;

/// The data plane's TLS acceptor: HTTP/2 and HTTP/1.1 by ALPN, with the certificate `cert`
/// offers at each handshake (renewed on `SIGHUP`, `server_cert`).
pub fn tls_acceptor(cert: Arc<crate::server_cert::ServerCert>) -> anyhow::Result<TlsAcceptor> {
    let mut config = rustls::ServerConfig::builder_with_provider(cert.provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A digest of the files' contents as they are now (`None` when one cannot be read): what a
/// reload compares to know whether TLS files changed.
pub(crate) fn digest_files<'a>(files: impl IntoIterator<Item = &'a Path>) -> Option<[u8; 32]> {
    use sha2::Digest as _;
    let mut digest = sha2::Sha256::new();
    for path in files {
        let bytes = std::fs::read(path).ok()?;
        digest.update((bytes.len() as u64).to_be_bytes());
        digest.update(&bytes);
    }
    Some(digest.finalize().into())
}

/// The PEM certificates in `file` (`what` says whose, for the errors): at least one.
pub(crate) fn read_certificates(
    file: &Path,
    what: &str,
) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(file)
        .with_context(|| format!("cannot read {what} certificate `{}`", file.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("`{}` is not a PEM certificate chain", file.display()))?;
    if certs.is_empty() {
        anyhow::bail!("`{}` holds no certificate", file.display());
    }
    Ok(certs)
}

/// A certificate chain checked as usable now (`chain_usable`: refused when expired or not
/// yet valid, or written CA first; warned of when it ends within 30 days, the warning ending
/// with `then`, how the renewed one is taken up) and its key.
pub(crate) fn certificate_and_key(
    cert_file: &Path,
    key_file: &Path,
    what: &str,
    then: &str,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let certs = read_certificates(cert_file, what)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Some(warning) = chain_usable(cert_file, &certs, now)? {
        tracing::warn!(file = %cert_file.display(), "{warning}, {then}");
    }
    let key_pem = std::fs::read(key_file)
        .with_context(|| format!("cannot read {what} key `{}`", key_file.display()))?;
    crate::config::warn_if_others_may_read(key_file, what);
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("`{}` is not a PEM private key", key_file.display()))?
        .with_context(|| format!("`{}` holds no private key", key_file.display()))?;
    Ok((certs, key))
}

/// A certificate expiring within this many seconds is warned of at start.
const EXPIRY_WARNING: i64 = 30 * 86_400;

/// Refuses a chain with a certificate not valid at `now` (unix seconds), or whose first is a
/// CA's ahead of others or issued by another: rustls loads an expired or not yet valid
/// certificate (the server's own or an intermediate), and every handshake then fails; and it
/// reports a chain written CA first, or an issuer's certificate in place of the server's, as
/// a key that does not match. (A lone self-signed certificate is taken: `openssl req -x509`
/// marks its own as a CA's. A self-signed root sent at the end of a chain only warns when it
/// has expired: clients build their path to their own copy of the root.) What to warn of, if
/// anything: that, or the certificate of the chain that expires soonest, within
/// `EXPIRY_WARNING`.
fn chain_usable(
    cert_file: &Path,
    chain: &[rustls::pki_types::CertificateDer],
    now: i64,
) -> anyhow::Result<Option<String>> {
    let file = cert_file.display();
    if chain.is_empty() {
        anyhow::bail!("`{file}` holds no certificate");
    }
    let date = |t: &x509_parser::time::ASN1Time| {
        t.to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.to_string())
    };
    let mut warnings = Vec::new();
    let mut soonest: Option<(i64, String)> = None;
    let mut before: Option<x509_parser::certificate::X509Certificate> = None;
    for (i, der) in chain.iter().enumerate() {
        let which = if i == 0 {
            "the TLS certificate".to_owned()
        } else {
            format!("TLS certificate {} of the chain", i + 1)
        };
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| anyhow::anyhow!("`{file}`: {which} cannot be read: {e}"))?;
        let self_signed = cert.subject() == cert.issuer();
        // Each certificate after the first issued the one before it: a wrong intermediate
        // (an old one after the CA changed its issuing certificate) loads, and every client
        // without the right one cached then fails its handshake.
        if let Some(before) = before.replace(cert.clone()) {
            issued(&before, &cert).map_err(|why| anyhow::anyhow!("`{file}`: {which} {why}"))?;
        }
        if i == 0 && cert.is_ca() && (chain.len() > 1 || !self_signed) {
            anyhow::bail!(
                "`{file}`: its first certificate is a CA's (`{}`): the gateway's own certificate \
                 must come first, then the certificates that issued it",
                cert.subject()
            );
        }
        let validity = cert.validity();
        let (from, until) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        let subject = cert.subject();
        if i > 0 && i == chain.len() - 1 && self_signed {
            // A root sent at the end: clients build their path to their own copy of it, so its
            // dates here only warn, and it does not count as what is to be renewed.
            if now < from || now > until {
                warnings.push(format!(
                    "{which} (`{subject}`), a self-signed root, is not valid now ({} to {}): \
                     clients that trust their own copy of it are unaffected; drop it from the \
                     chain",
                    date(&validity.not_before),
                    date(&validity.not_after)
                ));
            }
            continue;
        }
        if now < from {
            anyhow::bail!(
                "`{file}`: {which} (`{subject}`) is not valid until {} (is this machine's clock \
                 right?)",
                date(&validity.not_before)
            );
        }
        if now > until {
            anyhow::bail!(
                "`{file}`: {which} (`{subject}`) expired on {}",
                date(&validity.not_after)
            );
        }
        if until - now < EXPIRY_WARNING && soonest.as_ref().is_none_or(|(t, _)| until < *t) {
            soonest = Some((
                until,
                format!(
                    "{which} (`{subject}`) expires on {}, within 30 days: renew it",
                    date(&validity.not_after)
                ),
            ));
        }
    }
    warnings.extend(soonest.map(|(_, w)| w));
    Ok((!warnings.is_empty()).then(|| warnings.join("; ")))
}

/// Whether `issuer` issued `cert`: its name is `cert`'s issuer's, it is a CA's (a root at the
/// end of a chain may be an old self-signed one without the mark), and its key made `cert`'s
/// signature (not checked for a signature algorithm `ring` does not verify). What is wrong,
/// said of `issuer`, otherwise.
fn issued(
    cert: &x509_parser::certificate::X509Certificate,
    issuer: &x509_parser::certificate::X509Certificate,
) -> Result<(), String> {
    if cert.issuer() != issuer.subject() {
        return Err(format!(
            "(`{}`) did not issue the certificate before it, whose issuer is `{}`: the chain \
             must run from the gateway's certificate to the one that issued it, and so on",
            issuer.subject(),
            cert.issuer()
        ));
    }
    if !issuer.is_ca() && issuer.subject() != issuer.issuer() {
        return Err(format!(
            "(`{}`) is not a CA's certificate, so it cannot have issued the one before it",
            issuer.subject()
        ));
    }
    match cert.verify_signature(Some(issuer.public_key())) {
        Ok(()) | Err(x509_parser::error::X509Error::SignatureUnsupportedAlgorithm) => Ok(()),
        Err(e) => Err(format!(
            "(`{}`) has the name of the certificate before it's issuer, but its key did not \
             sign it ({e}): another certificate of that name (the CA's old or new one) belongs \
             here",
            issuer.subject()
        )),
    }
}

/// The most requests under way at once on one HTTP/2 connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// Counts and logs a connection that ended in an error. hyper answers a request it cannot
/// parse (a malformed request line or header; a head past twice the gateway's own bounds,
/// `request_head`) itself, with a 400, 414 or 431, before any handler runs (on HTTP/1 written
/// as a problem document, `unread_head`, whose request id `refused` is): no audit record
/// holds those (they name no caller, purpose or data), so they are counted (`wardgate_connection_errors_total{kind}`) and logged at warn (the client's
/// address only at debug: the audit log, which seals addresses, is where they are kept). A
/// timeout on a connection that has carried a request is an idle kept-alive connection
/// closed (`idle`), not a client that never finished (`timeout`).
fn connection_failed(
    e: &(dyn std::error::Error + 'static),
    peer: SocketAddr,
    served: bool,
    refused: Option<&str>,
) {
    // The first-bytes deadline's error, however deep hyper wrapped it; and the cancellation
    // of connections that never sent a request at a graceful shutdown, which is no error.
    let io_kind = std::iter::successors(Some(e), |e| e.source())
        .find_map(|e| e.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    if io_kind == Some(std::io::ErrorKind::Interrupted) {
        return;
    }
    let kind = match e.downcast_ref::<hyper::Error>() {
        Some(h) if h.is_parse_too_large() => "too_large",
        Some(h) if h.is_parse() => "malformed",
        Some(h) if h.is_timeout() && served => "idle",
        Some(h) if h.is_timeout() => "timeout",
        _ if stalled(e) => "stalled",
        _ if io_kind == Some(std::io::ErrorKind::TimedOut) => "timeout",
        _ => "other",
    };
    metrics::counter!("wardgate_connection_errors_total", "kind" => kind).increment(1);
    // At most once a minute: a scanner's every connection must not each write a line.
    static LAST_WARNED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(i64::MIN);
    if matches!(kind, "too_large" | "malformed") && crate::gateway::once_a_minute(&LAST_WARNED) {
        tracing::warn!(error = %e, kind,
            "requests refused before they could be read (logged at most once a minute; \
             wardgate_connection_errors_total counts them all)");
    }
    match refused {
        // The request id the problem document written in hyper's place gave the client.
        Some(request_id) => {
            tracing::debug!(error = %e, %peer, kind, request_id, "connection ended with an error")
        }
        None => tracing::debug!(error = %e, %peer, kind, "connection ended with an error"),
    }
}

/// Counts and logs a TLS handshake that failed or timed out (`kind="tls"`): a certificate
/// clients refuse, plain HTTP sent to the TLS port, a scanner. No request was read, so no
/// audit record holds it; warned at most once a minute, the client's address at debug.
fn tls_failed(e: &dyn std::fmt::Display, peer: SocketAddr) {
    metrics::counter!("wardgate_connection_errors_total", "kind" => "tls").increment(1);
    static LAST_WARNED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(i64::MIN);
    if crate::gateway::once_a_minute(&LAST_WARNED) {
        tracing::warn!(error = %e,
            "TLS handshakes failing (logged at most once a minute; \
             wardgate_connection_errors_total{{kind=\"tls\"}} counts them all)");
    }
    tracing::debug!(error = %e, %peer, "TLS handshake failed");
}

/// Whether `e` is, however deep hyper wrapped it, `FirstBytes`' error for a client that took
/// no bytes of its answer in time. (h2 keeps an I/O error's kind and text only, so there it
/// is known by its text.)
fn stalled(e: &(dyn std::error::Error + 'static)) -> bool {
    let text = Stalled.to_string();
    // (`io::Error::source` skips the error it wraps: its `get_ref` is that.)
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        let wrapped = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        wrapped.is_some_and(|w| w.is::<Stalled>()) || e.to_string().contains(&text)
    })
}

/// A write waited longer than `Limits::write_stall_timeout` for the client to take a byte.
#[derive(Debug, thiserror::Error)]
#[error("the client took no bytes of its answer in time")]
struct Stalled;

/// A connection's stream with a deadline on its first bytes: hyper's header timeout starts
/// only once it knows the protocol, which it learns from those bytes (up to HTTP/2's 24-byte
/// preface), so a client that connects and sends nothing, or a few bytes, would otherwise
/// hold the connection for ever. Past `FIRST_BYTES` bytes the deadline is gone. It also tells
/// the connection's `Activity` whether those bytes began HTTP/2's preface, and, for HTTP/2,
/// when an answer's bytes (`DATA` frames) go to the client (`H2Data`). And a deadline on
/// every write the client does not take (`stall`). And, on HTTP/1, hyper's bare answer to a
/// head it could not read written as a problem document (`write_answer`).
struct FirstBytes<T> {
    inner: T,
    /// Where the frames written so far have got to (HTTP/2 only).
    written: H2Data,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    left: usize,
    /// The first bytes, until there are enough to tell HTTP/2's preface.
    first: [u8; FIRST_BYTES],
    activity: Arc<Activity>,
    /// How long a write may wait for the client to take bytes (`Limits::write_stall_timeout`).
    stall_within: Duration,
    /// The stall clock (made at the first write that waits, then reset for each later one),
    /// and whether it is running: a write is waiting and nothing has gone since it started.
    stall_clock: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: bool,
    /// hyper's bare answer to a head it could not read, being written as a problem document
    /// (`unread_head`): that answer, how much of it has gone, and how many of hyper's bytes
    /// it stands for.
    rewrite: Option<(Vec<u8>, usize, usize)>,
}

/// HTTP/2's connection preface (RFC 9113 §3.4), the most hyper reads before it knows the
/// protocol.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FIRST_BYTES: usize = PREFACE.len();

impl<T> FirstBytes<T> {
    fn new(inner: T, within: Duration, stall_within: Duration, activity: Arc<Activity>) -> Self {
        FirstBytes {
            inner,
            written: H2Data::default(),
            deadline: Some(Box::pin(tokio::time::sleep(within))),
            left: FIRST_BYTES,
            first: [0; FIRST_BYTES],
            activity,
            stall_within,
            stall_clock: None,
            stalled: false,
            rewrite: None,
        }
    }

    /// After a write, a flush or a shutdown: one that got on clears the stall clock; one
    /// that waits starts it if it is not running, and fails once it has run out. hyper bounds
    /// no write on HTTP/1: a client that pipelines requests and never reads their answers
    /// would otherwise hold its connection for ever (the next request's head, already read,
    /// leaves no header timer running while the answer before it cannot be sent).
    fn stall<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        done: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if done.is_ready() {
            self.stalled = false;
            return done;
        }
        let deadline = tokio::time::Instant::now() + self.stall_within;
        let clock = match &mut self.stall_clock {
            Some(clock) if self.stalled => clock,
            Some(clock) => {
                clock.as_mut().reset(deadline);
                clock
            }
            None => self
                .stall_clock
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.stalled = true;
        if clock.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                Stalled,
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstBytes<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let read = &buf.filled()[before..];
                // The first bytes, however they arrive: the whole preface marks HTTP/2 (an
                // HTTP/1 request may begin `PRI `, whatever method it names).
                if this.left > 0 {
                    let at = FIRST_BYTES - this.left;
                    let n = read.len().min(this.left);
                    this.first[at..at + n].copy_from_slice(&read[..n]);
                    if at + n == FIRST_BYTES && &this.first == PREFACE {
                        this.activity.mark_http2();
                    }
                }
                this.left = this.left.saturating_sub(read.len());
                if this.left == 0 {
                    this.deadline = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let passed =
                    (this.deadline.as_mut()).is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if passed {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent no request in time",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

/// Reads the HTTP/2 frames a connection writes, as they are written (a write may end inside a
/// frame's header or payload), and says how many bytes of answers (`DATA` payloads) each write
/// carried: while they go, a slow client is taking an answer and the connection is not idle.
/// The connection's own frames (a `PING` answered, `SETTINGS`, `WINDOW_UPDATE`, `GOAWAY`) are
/// not answers: a client could otherwise keep an idle connection open by pinging it. (The
/// server writes no preface of its own: its first bytes are a frame.)
#[derive(Default)]
struct H2Data {
    header: [u8; 9],
    /// Bytes of the current frame's header read (9: its payload is being written).
    header_read: usize,
    payload_left: usize,
    is_data: bool,
}

impl H2Data {
    /// How many of `bytes` (the next ones written) are `DATA` payload.
    fn data_in(&mut self, mut bytes: &[u8]) -> usize {
        let mut data = 0;
        while !bytes.is_empty() {
            if self.header_read < 9 {
                let n = (9 - self.header_read).min(bytes.len());
                self.header[self.header_read..self.header_read + n].copy_from_slice(&bytes[..n]);
                self.header_read += n;
                bytes = &bytes[n..];
                if self.header_read == 9 {
                    let h = self.header;
                    self.payload_left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    self.is_data = h[3] == 0;
                    self.header_read = if self.payload_left == 0 { 0 } else { 9 };
                }
            } else {
                let n = self.payload_left.min(bytes.len());
                if self.is_data {
                    data += n;
                }
                self.payload_left -= n;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.header_read = 0;
                }
            }
        }
        data
    }
}

impl<T> FirstBytes<T> {
    /// Notes what a write sent: an answer's bytes to the client are activity (HTTP/2; an
    /// HTTP/1 connection's idleness is hyper's to bound).
    fn wrote(&mut self, bufs: &[std::io::IoSlice<'_>], written: &Poll<std::io::Result<usize>>) {
        let Poll::Ready(Ok(mut n)) = *written else {
            return;
        };
        if !self.activity.is_http2() {
            return;
        }
        let mut data = 0;
        for buf in bufs {
            let take = n.min(buf.len());
            data += self.written.data_in(&buf[..take]);
            n -= take;
            if n == 0 {
                break;
            }
        }
        if data > 0 {
            self.activity.touch();
        }
    }
}

impl<T: AsyncWrite + Unpin> FirstBytes<T> {
    /// Writes what hyper writes, but for its bare answer to an HTTP/1 head it could not read,
    /// which goes as a problem document (`unread_head`). The bytes before that answer in the
    /// same write (the end of an earlier answer) go first, as they are; hyper then writes the
    /// rest again, and is told its answer has gone once the whole document has.
    fn write_answer(
        &mut self,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.rewrite.is_none()
            && !self.activity.is_http2()
            && let Some(found) = crate::unread_head::find(bufs)
        {
            if found.at > 0 {
                let mut left = found.at;
                let before: Vec<std::io::IoSlice<'_>> = bufs
                    .iter()
                    .map_while(|b| {
                        let take = b.len().min(left);
                        left -= take;
                        (take > 0).then(|| std::io::IoSlice::new(&b[..take]))
                    })
                    .collect();
                return Pin::new(&mut self.inner).poll_write_vectored(cx, &before);
            }
            self.activity.refused(found.request_id);
            let claims = bufs.iter().map(|b| b.len()).sum();
            self.rewrite = Some((found.answer, 0, claims));
        }
        let Some((answer, sent, claims)) = &mut self.rewrite else {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        };
        while *sent < answer.len() {
            match std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*sent..])) {
                Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    *sent += n;
                    // Bytes went: the stall clock starts again at the next wait.
                    self.stalled = false;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        let claims = *claims;
        self.rewrite = None;
        Poll::Ready(Ok(claims))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstBytes<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = this.write_answer(cx, bufs);
        this.wrote(bufs, &written);
        this.stall(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.inner).poll_flush(cx);
        this.stall(cx, flushed)
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let shut = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.stall(cx, shut)
    }
}

/// What one listener allows.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Which plane it serves (`data`, `admin`), for the metrics and the log.
    pub plane: &'static str,
    /// How many connections it holds open at once: at the limit it accepts no more until one
    /// closes (those waiting queue in the kernel's backlog), so a client that opens many and
    /// sends nothing runs out of its share, not of the process's descriptors.
    pub max_connections: usize,
    /// How long a client has to send a request's headers (on a new connection, or the next
    /// request on a kept-alive one); then its connection is closed.
    pub header_read_timeout: Duration,
    /// How long requests under way may take to finish once `shutdown` resolves.
    pub grace: Duration,
    /// How long a write to a client may wait for it to take a byte (`server.client_stall_timeout`);
    /// then its connection is closed.
    pub write_stall_timeout: Duration,
    /// Whether a change's handler (any method but `GET` and `HEAD`) runs to its end when its
    /// client hangs up, rather than being dropped with the connection; at shutdown it is
    /// waited for, within `grace`. The admin plane's do: a change whose record is queued is
    /// then applied, not logged as made and never made (a read abandoned is still dropped:
    /// a subject access report nobody waits for is not built). The data plane's do not: a
    /// handler dropped records what it leaves unanswered (`client_closed`).
    pub run_to_end: bool,
}

/// Waits for a free connection slot (counting and, at most once a minute, logging each time
/// the listener is full), then for a connection. Cancel-safe: a slot taken for a connection
/// not yet accepted is given back when the future is dropped.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    limits: Limits,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr, Slot)> {
    let permit = match Arc::clone(slots).try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) => {
            metrics::counter!("wardgate_connections_limit_reached_total", "plane" => limits.plane)
                .increment(1);
            // One throttle per plane: a full data plane must not hide the admin plane's.
            use std::sync::atomic::AtomicI64;
            static DATA: AtomicI64 = AtomicI64::new(i64::MIN);
            static OTHERS: AtomicI64 = AtomicI64::new(i64::MIN);
            let last = if limits.plane == "data" {
                &DATA
            } else {
                &OTHERS
            };
            if crate::gateway::once_a_minute(last) {
                tracing::warn!(
                    plane = limits.plane,
                    max_connections = limits.max_connections,
                    "connection limit reached: no more are accepted until one closes (logged at \
                     most once a minute; wardgate_connections_limit_reached_total counts them)"
                );
            }
            Arc::clone(slots)
                .acquire_owned()
                .await
                .map_err(std::io::Error::other)?
        }
    };
    let (stream, peer) = listener.accept().await?;
    metrics::gauge!("wardgate_connections_open", "plane" => limits.plane).increment(1.0);
    Ok((
        stream,
        peer,
        Slot {
            _permit: permit,
            plane: limits.plane,
        },
    ))
}

/// A connection's place among the listener's `max_connections`, given back (and the open
/// connections' gauge lowered) when its task ends or is aborted.
struct Slot {
    _permit: OwnedSemaphorePermit,
    plane: &'static str,
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("wardgate_connections_open", "plane" => self.plane).decrement(1.0);
    }
}

/// Serves `handler` on `listener` until `shutdown` resolves, then drains for up to
/// `limits.grace`, holding at most `limits.max_connections` connections at once.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) -> anyhow::Result<()>
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Turned true at shutdown: every connection then closes gracefully (`connection::drive`).
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper enforces no timeout at all: a client that opens a connection and
    // sends half a request line would hold it (and a descriptor) for ever.
    // hyper buffers a request's head (its line and headers) up to 128 KiB (and, on HTTP/1, 200
    // fields), and answers a larger one itself (a 431 or 414, `unread_head`). That is twice the
    // gateway's own bounds, which each plane checks first and refuses with a problem document
    // (`request_head::check`); hyper's defaults (about 400 KiB for HTTP/1, 16 MiB for HTTP/2's
    // header list) would let each connection hold far more.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(request_head::HARD_HEAD_BYTES)
        .max_headers(request_head::HARD_HEADERS);
    // And at most 32 requests at once on one HTTP/2 connection (hyper's default is 200): each
    // may hold a datastore connection, and `max_connections` is sized for a few per
    // connection, not hundreds.
    builder
        .http2()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(request_head::HARD_HEAD_BYTES as u32)
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    // Every connection's task, so that those still open after the grace period are ended
    // here, before the caller flushes the log, rather than with the runtime, after it.
    let mut connections = tokio::task::JoinSet::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let changes = Arc::new(Semaphore::new(MAX_CHANGES_UNDER_WAY));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer, slot) = tokio::select! {
            // Finished connections are reaped as they finish, busy or idle.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = accept(&listener, &slots, limits) => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Running out of file descriptors must not end the server.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let activity = Activity::new();
        let requests = Arc::clone(&activity);
        let running = Arc::clone(&changes);
        let run_to_end = limits.run_to_end;
        let service = service_fn(move |req: Request<Incoming>| {
            let request = requests.begin();
            let change = run_to_end && !matches!(*req.method(), Method::GET | Method::HEAD);
            let handled = h(req, peer);
            // A change is spawned here, as hyper hands the request over, not when hyper first
            // polls what this returns (which a hang-up already seen may never do), and holds
            // a permit while it runs: shutdown waits for them all. Past the permits (a flood
            // of changes whose callers hung up), one runs as a read does.
            let permit = change
                .then(|| match Arc::clone(&running).try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        tracing::warn!("too many admin changes under way to run each to its end");
                        None
                    }
                })
                .flatten();
            let run = match permit {
                Some(permit) => futures_util::future::Either::Left(tokio::spawn(async move {
                    let resp = handled.await;
                    drop(permit);
                    resp
                })),
                None => futures_util::future::Either::Right(handled),
            };
            async move {
                let resp = match run {
                    // A panic in the handler closes the connection, as hyper does for one.
                    futures_util::future::Either::Left(spawned) => spawned.await?,
                    futures_util::future::Either::Right(here) => here.await,
                };
                Ok::<_, tokio::task::JoinError>(resp.map(|b| Tracked::new(b, request)))
            }
        });
        let stopping = stopping.clone();
        let idle = limits.header_read_timeout;
        match &tls {
            None => {
                let stream = FirstBytes::new(
                    stream,
                    limits.header_read_timeout,
                    limits.write_stall_timeout,
                    Arc::clone(&activity),
                );
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                connections.spawn(async move {
                    let _slot = slot;
                    let close = |c: Pin<&mut _>| auto::UpgradeableConnection::graceful_shutdown(c);
                    if let Some(Err(e)) = drive(conn, close, stopping, &activity, idle).await {
                        connection_failed(&*e, peer, activity.served(), activity.refusal());
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    let stream = match tokio::time::timeout(
                        Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        // Closed before a hello: a TCP health check, a port probe, a
                        // connection a client raced and dropped. No TLS failure.
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            return tracing::debug!(error = %e, %peer, "closed before a TLS hello");
                        }
                        Ok(Err(e)) => return tls_failed(&e, peer),
                        Err(_) => return tls_failed(&"the handshake took over 10 s", peer),
                    };
                    // The idle clock starts now, not at the connection.
                    activity.touch();
                    let stream = FirstBytes::new(
                        stream,
                        limits.header_read_timeout,
                        limits.write_stall_timeout,
                        Arc::clone(&activity),
                    );
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    let close = |c: Pin<&mut _>| auto::UpgradeableConnection::graceful_shutdown(c);
                    if let Some(Err(e)) = drive(conn, close, stopping, &activity, idle).await {
                        connection_failed(&*e, peer, activity.served(), activity.refusal());
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = stop.send(true);
    let deadline = tokio::time::Instant::now() + limits.grace;
    let drained = async { while connections.join_next().await.is_some() {} };
    tokio::select! {
        () = drained => tracing::info!("all connections drained"),
        () = tokio::time::sleep_until(deadline) => tracing::warn!("grace period over; closing remaining connections"),
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    // Changes whose callers hung up, still being made: waited for, within the same grace
    // period, so that the log and the controls are not closed under them.
    let all = u32::try_from(MAX_CHANGES_UNDER_WAY).unwrap_or(u32::MAX);
    if tokio::time::timeout_at(deadline, changes.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("grace period over; changes still being made are abandoned");
    }
    Ok(())
}

/// The most admin changes run to their end at once (`Limits::run_to_end`); past it, one runs
/// as a read does, dropped if its caller hangs up.
const MAX_CHANGES_UNDER_WAY: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    /// Only `DATA` payloads written count as an answer's bytes, however the frames are cut
    /// across writes: a client's `PING`s answered (a connection's own frames) are not.
    #[test]
    fn only_data_frames_written_are_an_answers_bytes() {
        let frame = |kind: u8, payload: &[u8]| {
            let n = payload.len();
            let mut f = vec![
                (n >> 16) as u8,
                (n >> 8) as u8,
                n as u8,
                kind,
                0,
                0,
                0,
                0,
                1,
            ];
            f.extend_from_slice(payload);
            f
        };
        let ping = frame(6, &[7; 8]);
        let settings = frame(4, &[]);
        let data = frame(0, &[b'x'; 1000]);
        let mut w = H2Data::default();
        // Four PINGs answered in one write (68 bytes), then SETTINGS: nothing of an answer.
        assert_eq!(w.data_in(&ping.repeat(4)), 0);
        assert_eq!(w.data_in(&settings), 0);
        // A DATA frame cut anywhere, its header too: its payload counted exactly once.
        let mut stream = [ping.clone(), data.clone(), ping.clone(), data.clone()].concat();
        stream.extend_from_slice(&settings);
        for cut in [1, 5, 9, 17, 26, 500, 1026, 1050, 2000] {
            let mut w = H2Data::default();
            let (a, b) = stream.split_at(cut.min(stream.len()));
            assert_eq!(w.data_in(a) + w.data_in(b), 2000, "cut at {cut}");
            assert_eq!(w.data_in(&ping), 0, "in step after the cut at {cut}");
        }
        let mut w = H2Data::default();
        let total: usize = stream
            .iter()
            .map(|b| w.data_in(std::slice::from_ref(b)))
            .sum();
        assert_eq!(total, 2000, "byte by byte");
    }

    /// Hands out its bytes one at a time, as a slow client's may arrive.
    struct Trickle(Vec<u8>, usize);

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            if let Some(&b) = this.0.get(this.1) {
                buf.put_slice(&[b]);
                this.1 += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Takes at most seven bytes a write, and every other write not at all (as a socket
    /// whose buffer is full).
    #[derive(Default)]
    struct Dribble {
        out: Vec<u8>,
        wait: bool,
    }

    impl AsyncWrite for Dribble {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            this.wait = !this.wait;
            if !this.wait {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(7);
            this.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// hyper's bare answer to a head it could not read leaves as a problem document, after
    /// the rest of an earlier answer written with it, however few bytes the socket takes at a
    /// time; hyper is told all its bytes went. The request id is the connection's, for the log.
    #[tokio::test]
    async fn hypers_bare_answer_leaves_as_a_problem_document() {
        use tokio::io::AsyncWriteExt;
        let earlier = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        let hypers = "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
                      content-length: 0\r\ndate: Mon, 07 Dec 2026 06:53:11 GMT\r\n\r\n";
        let activity = Activity::new();
        let mut stream = FirstBytes::new(
            Dribble::default(),
            Duration::from_secs(5),
            Duration::from_secs(5),
            Arc::clone(&activity),
        );
        // As hyper writes: what is left of its buffer, again after each partial write.
        let all = format!("{earlier}{hypers}");
        let mut at = 0;
        while at < all.len() {
            at += stream.write(&all.as_bytes()[at..]).await.unwrap();
        }
        assert_eq!(at, all.len());
        let out = String::from_utf8(stream.inner.out).unwrap();
        let answer = out.strip_prefix(earlier).unwrap_or_else(|| panic!("{out}"));
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with(
                "HTTP/1.1 431 Request Header Fields Too Large\r\n\
                 content-type: application/problem+json\r\n"
            ),
            "{head}"
        );
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            problem["type"],
            "urn:wardgate:problem:request-head-too-large"
        );
        assert_eq!(
            Some(problem["request_id"].as_str().unwrap()),
            activity.refusal()
        );
    }

    /// Only the whole preface marks a connection HTTP/2, however its bytes arrive: an HTTP/1
    /// request may begin `PRI ` too.
    #[tokio::test]
    async fn the_whole_preface_marks_http2_byte_by_byte() {
        use tokio::io::AsyncReadExt;
        for (bytes, http2) in [
            (
                &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04"[..],
                true,
            ),
            (b"PRI / HTTP/1.1\r\nhost: wardgate\r\n\r\n", false),
            (b"GET / HTTP/1.1\r\nhost: wardgate\r\n\r\n", false),
            (b"PRI * HTTP/2.0\r\n", false),
        ] {
            let activity = Activity::new();
            let trickle = Trickle(bytes.to_vec(), 0);
            let mut stream = FirstBytes::new(
                trickle,
                Duration::from_secs(5),
                Duration::from_secs(5),
                Arc::clone(&activity),
            );
            let mut read = Vec::new();
            let mut byte = [0u8; 1];
            while stream.read(&mut byte).await.unwrap() == 1 {
                read.push(byte[0]);
            }
            assert_eq!(read, bytes, "passed on unchanged");
            assert_eq!(
                activity.is_http2(),
                http2,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    /// A listener at its `max_connections` accepts no more: the next connection stays in the
    /// kernel's backlog (not accepted and parked) until one closes, and the gauge says so.
    #[tokio::test]
    async fn a_full_listener_leaves_the_next_connection_unaccepted_until_one_closes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let handle = crate::admin::metrics_handle().expect("a metrics recorder");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            plane: "limit-test",
            max_connections: 2,
            header_read_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(1),
            write_stall_timeout: Duration::from_secs(30),
            run_to_end: false,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            None,
            |_req: Request<Incoming>, _peer| async {
                Response::new(http_body_util::Full::new(Bytes::from_static(b"ok")))
            },
            async {
                let _ = stopped.await;
            },
            limits,
        ));
        let open = || {
            let text = handle.render();
            let line = text
                .lines()
                .find(|l| l.starts_with("wardgate_connections_open{plane=\"limit-test\"}"));
            line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        let until = |want: f64| async move {
            for _ in 0..200 {
                if open() == Some(want) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("connections open: {:?}, not {want}", open());
        };
        let a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        until(2.0).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(open(), Some(2.0), "a third connection was accepted");
        drop(a);
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut answer))
            .await
            .expect("not served after a connection closed")
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// A handler whose client hangs up is dropped with the connection, unless the listener
    /// runs changes to their end (the admin plane: a change logged is then made); a read is
    /// dropped all the same.
    #[tokio::test]
    async fn a_change_runs_to_its_end_after_a_hang_up_only_where_asked() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (run_to_end, method, finishes) in [
            (false, "POST", false),
            (true, "POST", true),
            (true, "GET", false),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let limits = Limits {
                plane: "hang-up-test",
                max_connections: 8,
                header_read_timeout: Duration::from_secs(30),
                grace: Duration::from_secs(10),
                write_stall_timeout: Duration::from_secs(30),
                run_to_end,
            };
            let go = Arc::new(tokio::sync::Notify::new());
            let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<()>();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let handler = {
                let go = Arc::clone(&go);
                move |_req: Request<Incoming>, _peer| {
                    let (go, done_tx) = (Arc::clone(&go), done_tx.clone());
                    async move {
                        go.notified().await;
                        let _ = done_tx.send(());
                        Response::new(http_body_util::Full::new(Bytes::from_static(b"ok")))
                    }
                }
            };
            let server = tokio::spawn(serve(
                listener,
                None,
                handler,
                async {
                    let _ = stopped.await;
                },
                limits,
            ));
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!("{method} / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n");
            c.write_all(head.as_bytes()).await.unwrap();
            // The client hangs up; the server closes the connection once it sees that.
            c.shutdown().await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut answer))
                .await
                .expect("the connection was not closed")
                .unwrap();
            assert!(answer.is_empty(), "{answer:?}");
            // Shut down while the handler still waits: the listener ends only once a change
            // run to its end is done (within the grace period), and has not waited for one
            // dropped.
            let _ = stop.send(());
            if finishes {
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert!(!server.is_finished(), "the listener ended under a change");
                go.notify_one();
                server.await.unwrap().unwrap();
            } else {
                // Nothing to wait for: the listener ends with the handler still waiting.
                tokio::time::timeout(Duration::from_secs(5), server)
                    .await
                    .expect("the listener waited for a dropped handler")
                    .unwrap()
                    .unwrap();
                go.notify_one();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let finished = done.try_recv().is_ok();
            assert_eq!(finished, finishes, "run_to_end {run_to_end}, {method}");
        }
    }

    /// An HTTP/1 client that sends requests back to back and never reads the answers holds
    /// its connection only until `write_stall_timeout`: hyper runs no header timer while the
    /// next request's head is read and the answer before it cannot be sent.
    #[tokio::test]
    async fn a_client_that_pipelines_and_never_reads_loses_its_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let handle = crate::admin::metrics_handle().expect("a metrics recorder");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            plane: "stall-test",
            max_connections: 8,
            header_read_timeout: Duration::from_secs(1),
            grace: Duration::from_secs(1),
            write_stall_timeout: Duration::from_secs(2),
            run_to_end: false,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            None,
            |_req: Request<Incoming>, _peer| async {
                let body = Bytes::from(vec![b'x'; 64 * 1024]);
                Response::new(http_body_util::Full::new(body))
            },
            async {
                let _ = stopped.await;
            },
            limits,
        ));
        let gauge = |name: &str| {
            let text = handle.render();
            let line = text.lines().find(|l| l.starts_with(name));
            line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        let open = || gauge("wardgate_connections_open{plane=\"stall-test\"}");
        let stalled = || gauge("wardgate_connection_errors_total{kind=\"stalled\"}");
        let stalled_before = stalled().unwrap_or(0.0);
        // Pipelining itself still works: two requests sent together, both answered.
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        let two = "GET / HTTP/1.1\r\nhost: x\r\n\r\n".repeat(2);
        ok.write_all(two.as_bytes()).await.unwrap();
        let mut got = vec![0u8; 2 * 64 * 1024];
        let mut answers = Vec::new();
        while answers.windows(8).filter(|w| w == b"HTTP/1.1").count() < 2
            || !answers.ends_with(&[b'x'; 64])
            || answers.len() < 2 * 64 * 1024
        {
            let n = ok.read(&mut got).await.unwrap();
            assert!(n > 0, "the connection closed before both answers");
            answers.extend_from_slice(&got[..n]);
        }
        drop(ok);
        // Then one that never reads: 200 answers of 64 KiB are more than both ends' buffers.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(1024).unwrap();
        let mut greedy = socket.connect(addr).await.unwrap();
        let many = "GET / HTTP/1.1\r\nhost: x\r\n\r\n".repeat(200);
        greedy.write_all(many.as_bytes()).await.unwrap();
        let mut closed = false;
        for _ in 0..300 {
            if open() == Some(0.0) {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(closed, "the connection is still held: {:?} open", open());
        assert!(
            stalled().unwrap_or(0.0) > stalled_before,
            "counted as stalled"
        );
        drop(greedy);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// A self-signed certificate valid from `from` to `until` (unix seconds), a CA's or not.
    fn certificate(from: i64, until: i64, ca: bool) -> rustls::pki_types::CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    #[test]
    fn a_certificate_valid_now_is_taken_and_one_near_its_end_warned_of() {
        let file = Path::new("tls/server.pem");
        let cert = certificate(NOW - DAY, NOW + 90 * DAY, false);
        assert_eq!(chain_usable(file, &[cert], NOW).unwrap(), None);
        let cert = certificate(NOW - DAY, NOW + DAY, false);
        let warning = chain_usable(file, &[cert], NOW).unwrap().unwrap();
        assert!(warning.contains("expires on 2027-01-16"), "{warning}");
        // A lone self-signed certificate marked as a CA's (as `openssl req -x509` makes them).
        let cert = certificate(NOW - DAY, NOW + 90 * DAY, true);
        assert_eq!(chain_usable(file, &[cert], NOW).unwrap(), None);
    }

    #[test]
    fn an_expired_or_not_yet_valid_certificate_stops_the_start_naming_its_file_and_date() {
        let file = Path::new("tls/server.pem");
        let expired = certificate(NOW - 90 * DAY, NOW - DAY, false);
        let err = chain_usable(file, &[expired], NOW).unwrap_err().to_string();
        assert!(
            err.contains("`tls/server.pem`: the TLS certificate (`CN=rcgen self signed cert`) expired on 2027-01-14"),
            "{err}"
        );
        let early = certificate(NOW + DAY, NOW + 90 * DAY, false);
        let err = chain_usable(file, &[early], NOW).unwrap_err().to_string();
        assert!(err.contains("not valid until 2027-01-16"), "{err}");
    }

    #[test]
    fn a_chain_with_its_ca_first_is_named_for_what_it_is() {
        let file = Path::new("tls/server.pem");
        let root = Ca::root(NOW - DAY, NOW + 90 * DAY, "Party Root");
        let leaf = root.leaf(NOW - DAY, NOW + 90 * DAY);
        let err = chain_usable(file, &[root.der.clone(), leaf.clone()], NOW)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("first certificate is a CA's") && err.contains("must come first"),
            "{err}"
        );
        assert_eq!(
            chain_usable(file, &[leaf.clone(), root.der.clone()], NOW).unwrap(),
            None
        );
        // An intermediate past its end fails every handshake as surely as the server's own;
        // an expired self-signed root at the end only warns (clients build their path to
        // their own copy of the root).
        let expired = root.intermediate(NOW - 90 * DAY, NOW - DAY, "Party Issuing");
        let by_expired = expired.leaf(NOW - DAY, NOW + 90 * DAY);
        let err = chain_usable(file, &[by_expired, expired.der.clone()], NOW)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TLS certificate 2 of the chain (`CN=Party Issuing`) expired"),
            "{err}"
        );
        let old_root = Ca::root(NOW - 90 * DAY, NOW - DAY, "Old Root");
        let good = old_root.intermediate(NOW - DAY, NOW + 90 * DAY, "Party Issuing");
        let by_good = good.leaf(NOW - DAY, NOW + 90 * DAY);
        let warning = chain_usable(file, &[by_good, good.der.clone(), old_root.der], NOW)
            .unwrap()
            .unwrap();
        assert!(
            warning.contains("certificate 3 of the chain")
                && warning.contains("a self-signed root"),
            "{warning}"
        );
        // The warning names the certificate that ends soonest, wherever it is in the chain.
        let soon = root.intermediate(NOW - DAY, NOW + 3 * DAY, "Party Issuing");
        let sooner = soon.leaf(NOW - DAY, NOW + 2 * DAY);
        let warning = chain_usable(file, &[sooner, soon.der.clone()], NOW)
            .unwrap()
            .unwrap();
        assert!(
            warning.contains("the TLS certificate (") && warning.contains("2027-01-17"),
            "{warning}"
        );
        // An intermediate alone, in place of the server's own: issued by another, so not one
        // self-signed certificate standing for itself.
        let err = chain_usable(file, &[good.der], NOW)
            .unwrap_err()
            .to_string();
        assert!(err.contains("first certificate is a CA's"), "{err}");
    }

    /// Each certificate after the first must have issued the one before it: its name, a CA's
    /// mark and its key. A wrong intermediate loads, and then fails every client that does
    /// not have the right one already.
    #[test]
    fn a_chain_whose_certificates_did_not_issue_each_other_stops_the_start() {
        let file = Path::new("tls/server.pem");
        let root = Ca::root(NOW - DAY, NOW + 90 * DAY, "Party Root");
        let issuing = root.intermediate(NOW - DAY, NOW + 90 * DAY, "Party Issuing");
        let leaf = issuing.leaf(NOW - DAY, NOW + 90 * DAY);
        let whole = [leaf.clone(), issuing.der.clone(), root.der.clone()];
        assert_eq!(chain_usable(file, &whole, NOW).unwrap(), None);
        // Another CA's certificate after it.
        let other = root.intermediate(NOW - DAY, NOW + 90 * DAY, "Party Other");
        let err = chain_usable(file, &[leaf.clone(), other.der], NOW)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "`tls/server.pem`: TLS certificate 2 of the chain (`CN=Party Other`) did not issue"
            ) && err.contains("whose issuer is `CN=Party Issuing`"),
            "{err}"
        );
        // The issuing CA's other certificate of the same name (renewed with a new key).
        let renewed = root.intermediate(NOW - DAY, NOW + 90 * DAY, "Party Issuing");
        let err = chain_usable(file, &[leaf.clone(), renewed.der], NOW)
            .unwrap_err()
            .to_string();
        assert!(err.contains("its key did not sign it"), "{err}");
        // The root in the intermediate's place, and the intermediate after the root.
        let err = chain_usable(file, &[leaf.clone(), root.der.clone()], NOW)
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not issue"), "{err}");
        let err = chain_usable(file, &[leaf.clone(), root.der.clone(), issuing.der], NOW)
            .unwrap_err()
            .to_string();
        assert!(err.contains("TLS certificate 2 of the chain"), "{err}");
        // A certificate of the issuer's name that is not a CA's.
        let not_ca = root.signed(NOW - DAY, NOW + 90 * DAY, "Party Issuing", false);
        let err = chain_usable(file, &[leaf, not_ca.der], NOW)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a CA's certificate"), "{err}");
    }

    /// A certificate authority for the tests' chains: its certificate and what signs with it.
    struct Ca {
        der: rustls::pki_types::CertificateDer<'static>,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    impl Ca {
        fn params(from: i64, until: i64, name: &str, ca: bool) -> rcgen::CertificateParams {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            if ca {
                params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            }
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
            params.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
            params
        }

        /// A self-signed root valid from `from` to `until`.
        fn root(from: i64, until: i64, name: &str) -> Ca {
            let params = Ca::params(from, until, name, true);
            let key = rcgen::KeyPair::generate().unwrap();
            let der = params.self_signed(&key).unwrap().der().clone();
            Ca {
                der,
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        /// A certificate named `name` issued by this one, a CA's or not, with a key of its own.
        fn signed(&self, from: i64, until: i64, name: &str, ca: bool) -> Ca {
            let params = Ca::params(from, until, name, ca);
            let key = rcgen::KeyPair::generate().unwrap();
            let der = params.signed_by(&key, &self.issuer).unwrap().der().clone();
            Ca {
                der,
                issuer: rcgen::Issuer::new(params, key),
            }
        }

        /// An intermediate CA's certificate issued by this one.
        fn intermediate(&self, from: i64, until: i64, name: &str) -> Ca {
            self.signed(from, until, name, true)
        }

        /// A server's certificate for `localhost` issued by this one.
        fn leaf(&self, from: i64, until: i64) -> rustls::pki_types::CertificateDer<'static> {
            let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
            params.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            params.signed_by(&key, &self.issuer).unwrap().der().clone()
        }
    }
}
