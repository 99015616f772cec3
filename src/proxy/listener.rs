//! Every listener's connections: how many may be open, how long one may idle, how slowly a
//! request head may arrive, and the answer to a head Pingora would refuse without a word.
//!
//! Pingora's HTTP/1 loop waits for a kept-alive client's next request forever, times a
//! request head per read (one byte every 59 s keeps it open), accepts connections until file
//! descriptors run out, and answers a head it cannot parse with an empty 400. [`Listener`]
//! runs that loop itself, around an HTTP application — the proxy ([`super::Gate`] in Pingora's
//! `HttpProxy`), the ops listener, the admin API — each with a cap of its own:
//!
//! 1. A connection beyond the listener's cap (`connections.max` for the proxy) is answered
//!    `503 connection_limit` and closed at once, so descriptors stay available for the
//!    upstream, the store and the other listeners: probes and scrapes still get through while
//!    the proxy is saturated.
//! 2. Each request head is read here, whole, under a deadline: `head_timeout` from the first
//!    byte (from the connection's start for its first request), after at most `idle_timeout`
//!    of silence between requests. A partial head that runs out of time gets
//!    `408 request_timeout`; silence just closes.
//! 3. The head is checked with the same parser Pingora uses (httparse) and the same target
//!    rules tollgate prices by ([`crate::target`]): a refusal is tollgate's JSON with an access
//!    line and a metric, like every other refusal.
//! 4. The bytes read are handed to a Pingora session as its first bytes, and the application
//!    runs as usual; the proxy watches the body's pace ([`super::Gate`]: `body_timeout`,
//!    `body_min_rate`), and a response write that stalls for `body_timeout` (a client that
//!    stopped reading) ends the connection.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::refusal::Refusal;
use super::{Access, RequestIds};
use crate::config::ConnectionLimits;
use crate::metrics::Metrics;
use crate::reload::Live;

/// The largest request head accepted (request line and headers). Pingora's own limit is
/// 1 MiB; an API request's head is a few hundred bytes, nginx's default limit is 4 × 8 KiB.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields in a request head (Pingora's limit too).
pub const MAX_HEADERS: usize = 256;

/// What every listener shares: request ids for its refusals, the policy (the service label),
/// the metrics.
#[derive(Clone)]
pub struct Shared {
    pub ids: Arc<RequestIds>,
    pub live: Arc<Live>,
    pub metrics: Arc<Metrics>,
}

/// A Pingora service's application: connection limits around an HTTP application.
pub struct Listener<A> {
    app: Arc<A>,
    /// `proxy`, `ops` or `admin`: the `listener` label of the connection metrics.
    name: &'static str,
    limits: ConnectionLimits,
    open: Arc<Semaphore>,
    shared: Shared,
}

impl<A> Listener<A> {
    /// `max_connections` is the effective cap (see [`crate::server`] for the proxy's `auto`).
    pub fn new(
        name: &'static str,
        app: A,
        limits: ConnectionLimits,
        max_connections: usize,
        shared: Shared,
    ) -> Listener<A> {
        Listener {
            app: Arc::new(app),
            name,
            limits,
            open: Arc::new(Semaphore::new(max_connections)),
            shared,
        }
    }
}

/// A connection counted in `tollgate_connections_open` while it lives.
struct Counted(prometheus::IntGauge);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Listener<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Ok(_permit) = self.open.clone().try_acquire_owned() else {
            self.shared
                .metrics
                .connections_rejected
                .with([self.name])
                .inc();
            let mut refusal = Refusal::new(
                503,
                "connection_limit",
                "tollgate has too many open connections; retry shortly",
            );
            refusal.retry_after = Some(1);
            self.answer(&mut stream, None, refusal).await;
            return None;
        };
        let open = self.shared.metrics.connections_open.with([self.name]);
        open.inc();
        let _counted = Counted(open);
        let head_timeout = Duration::from_secs(self.limits.head_timeout_secs);
        let idle_timeout = Duration::from_secs(self.limits.idle_timeout_secs);
        let body_timeout = Duration::from_secs(self.limits.body_timeout_secs);
        let mut first = true;
        loop {
            let wait = if first { head_timeout } else { idle_timeout };
            let head = match read_head(&mut stream, wait, head_timeout, shutdown).await {
                Head::Complete(bytes) => bytes,
                Head::Closed => return None,
                Head::Refused(partial, refusal) => {
                    if refusal.code == "request_timeout" {
                        self.shared.metrics.client_timeouts.with(["head"]).inc();
                    }
                    self.answer(&mut stream, Some(&partial), refusal).await;
                    return None;
                }
            };
            let mut session = ServerSession::new_http1(stream);
            session.set_pipelined_prefix(head);
            // A client that stops reading its answer (or whose unread body is being drained)
            // does not hold the connection, and an upstream one, for longer than this.
            session.set_write_timeout(Some(body_timeout));
            session.set_total_drain_timeout(Some(body_timeout));
            // The next request's wait is timed above, not by Pingora.
            session.set_keepalive(Some(0));
            let reused = self.app.process_new_http(session, shutdown).await?;
            (stream, _) = reused.consume();
            if *shutdown.borrow() {
                return None;
            }
            first = false;
        }
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

impl<A> Listener<A> {
    /// Answers a connection no Pingora session holds with a refusal, then closes it; the
    /// refusal is logged and counted first, like every other.
    async fn answer(&self, stream: &mut Stream, head: Option<&[u8]>, refusal: Refusal) {
        let line = head.map(request_line).unwrap_or_default();
        let given_id = head.and_then(given_request_id);
        let request_id = self.shared.ids.take_or_make_from(given_id.as_deref());
        if self.name == "proxy" {
            let loaded = self.shared.live.current();
            self.shared
                .metrics
                .requests
                .with([loaded.policy.service.as_str(), "", "none", refusal.code])
                .inc();
        }
        Access {
            request_id: &request_id,
            method: line.0.as_str(),
            path: &line.1,
            route: "",
            rail: "none",
            outcome: refusal.code,
            status: refusal.status,
            upstream_status: 0,
            payer: None,
            account: None,
            error: None,
        }
        .log();
        let Ok((head, body)) = refusal.render(&request_id) else {
            return;
        };
        let mut bytes = Vec::with_capacity(256 + body.len());
        bytes.extend_from_slice(
            format!(
                "HTTP/1.1 {} {}\r\n",
                head.status.as_u16(),
                head.status.canonical_reason().unwrap_or("")
            )
            .as_bytes(),
        );
        for (name, value) in head.headers.iter() {
            bytes.extend_from_slice(name.as_str().as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"connection: close\r\n\r\n");
        bytes.extend_from_slice(&body);
        let write = async {
            stream.write_all(&bytes).await?;
            stream.flush().await?;
            stream.shutdown().await
        };
        // A client that does not read its answer does not hold the connection either.
        let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
    }
}

/// What reading a request head gave.
enum Head {
    /// The head, and whatever followed it in the same reads (body bytes, a pipelined request).
    Complete(BytesMut),
    /// The client closed, stayed silent past the wait, or shutdown began before a byte came.
    Closed,
    /// A head that will not be served: the bytes so far, and the answer.
    Refused(BytesMut, Refusal),
}

/// Reads until a whole head is buffered: the first byte within `wait`, the rest within
/// `deadline` of it (of the start, when the wait is the deadline itself).
async fn read_head(
    stream: &mut Stream,
    wait: Duration,
    deadline: Duration,
    shutdown: &ShutdownWatch,
) -> Head {
    let mut buf = BytesMut::with_capacity(4096);
    let mut shutdown = shutdown.clone();
    let started = Instant::now();
    // Until the first byte: the wait, or shutdown.
    let first = tokio::select! {
        read = tokio::time::timeout(wait, stream.read_buf(&mut buf)) => read,
        _ = shutdown.changed() => return Head::Closed,
    };
    match first {
        Ok(Ok(n)) if n > 0 => {}
        _ => return Head::Closed,
    }
    let due = if wait == deadline {
        started + deadline
    } else {
        Instant::now() + deadline
    };
    loop {
        let size = match head_state(&buf) {
            HeadState::Complete(size) if size <= MAX_HEAD_BYTES => return Head::Complete(buf),
            HeadState::Complete(size) => size,
            HeadState::Refused(refusal) => return Head::Refused(buf, *refusal),
            HeadState::Partial => buf.len(),
        };
        if size > MAX_HEAD_BYTES {
            let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
            let refusal = if line_end <= MAX_HEAD_BYTES / 2 {
                Refusal::new(
                    431,
                    "request_header_too_large",
                    format!("the request head is larger than {MAX_HEAD_BYTES} bytes"),
                )
            } else {
                Refusal::new(
                    414,
                    "uri_too_long",
                    format!(
                        "the request line is longer than {} bytes",
                        MAX_HEAD_BYTES / 2
                    ),
                )
            };
            return Head::Refused(buf, refusal);
        }
        match tokio::time::timeout_at(due, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Head::Closed,
            Err(_) => {
                let refusal = Refusal::new(
                    408,
                    "request_timeout",
                    format!(
                        "the request head did not arrive within {}s",
                        deadline.as_secs()
                    ),
                );
                return Head::Refused(buf, refusal);
            }
        }
    }
}

enum HeadState {
    /// A whole head of this many bytes.
    Complete(usize),
    Partial,
    Refused(Box<Refusal>),
}

/// Whether `buf` starts with a whole request head, by httparse's reading (as Pingora's), and
/// for a whole one, whether tollgate will take it ([`check_head`]).
fn head_state(buf: &[u8]) -> HeadState {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(size)) => match check_head(&request) {
            Ok(()) => HeadState::Complete(size),
            Err(refusal) => HeadState::Refused(refusal),
        },
        Ok(httparse::Status::Partial) => HeadState::Partial,
        Err(httparse::Error::TooManyHeaders) => HeadState::Refused(Box::new(Refusal::new(
            431,
            "request_header_too_large",
            format!("the request has more than {MAX_HEADERS} header fields"),
        ))),
        Err(e) => HeadState::Refused(Box::new(Refusal::new(
            400,
            "malformed_request",
            format!("the request head cannot be parsed: {e}"),
        ))),
    }
}

/// Refuses, in tollgate's words, what Pingora would refuse with an empty 400 or 405 once it
/// has the head: a target tollgate will not price ([`crate::target`]), a duplicate `Host`, a
/// conflicting `Content-Length`, `CONNECT`.
fn check_head(request: &httparse::Request<'_, '_>) -> Result<(), Box<Refusal>> {
    let malformed = |message: String| Box::new(Refusal::new(400, "malformed_request", message));
    let method = request.method.unwrap_or("");
    let mut hosts = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = hosts.next().map(|h| h.value);
    if hosts.next().is_some() {
        return Err(malformed(
            "the request has more than one Host header".into(),
        ));
    }
    let mut lengths = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value);
    if let Some(first) = lengths.next() {
        let valid = !first.is_empty() && first.iter().all(u8::is_ascii_digit);
        if !valid || lengths.any(|other| other != first) {
            return Err(malformed(
                "the request's Content-Length is invalid or given twice with different values"
                    .into(),
            ));
        }
    }
    if method == "CONNECT" {
        return Err(Box::new(Refusal::new(
            405,
            "method_not_allowed",
            "tollgate is not a forward proxy: CONNECT is not accepted",
        )));
    }
    let target = request.path.unwrap_or("").as_bytes();
    crate::target::parse(method, target, host).map_err(|e| malformed(e.to_string()))?;
    Ok(())
}

/// The method and the target of a head, lossily, for the access line.
fn request_line(head: &[u8]) -> (String, String) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let mut word = |limit: usize| {
        let bytes = parts.next().unwrap_or_default();
        let bytes = bytes.get(..bytes.len().min(limit)).unwrap_or_default();
        String::from_utf8_lossy(bytes).escape_debug().to_string()
    };
    let method = word(16);
    let target = word(200);
    (method, target)
}

/// The client's `x-request-id`, when the head parses far enough to have one.
fn given_request_id(head: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let _ = request.parse(head);
    request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("x-request-id"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(head: &[u8]) -> &'static str {
        match head_state(head) {
            HeadState::Complete(_) => "complete",
            HeadState::Partial => "partial",
            HeadState::Refused(r) => r.code,
        }
    }

    #[test]
    fn heads_are_recognised_and_refused_in_words() {
        assert_eq!(state(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "complete");
        assert_eq!(state(b"GET / HTTP/1.1\r\nHost: x\r\n"), "partial");
        assert_eq!(state(b"G\xffT / HTTP/1.1\r\n\r\n"), "malformed_request");
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(state(&many), "request_header_too_large");
    }

    #[test]
    fn checks_what_pingora_would_refuse_silently() {
        let code = |head: &[u8]| match head_state(head) {
            HeadState::Refused(r) => Some(r.code),
            _ => None,
        };
        assert_eq!(code(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"), None);
        assert_eq!(
            code(b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
            Some("malformed_request")
        );
        assert_eq!(
            code(b"GET foo:/paid/1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("malformed_request")
        );
        assert_eq!(
            code(b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("malformed_request")
        );
        assert_eq!(
            code(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Some("malformed_request")
        );
        assert_eq!(
            request_line(b"GET /x?y HTTP/1.1\r\n"),
            ("GET".to_string(), "/x?y".to_string())
        );
    }
}
