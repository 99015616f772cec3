//! The admin API listener: authentication, body limits, and the JSON answer of an [`Op`].
//!
//! Every request is authenticated first — an unknown path without the token is a 401, not a
//! 404 — so the API reveals nothing to a caller without the token.
//!
//! Besides the account [`Op`]s, two endpoints exist only on a running sidecar:
//! `GET /v1/policy` (the policy in force: service, version, file, since) and
//! `POST /v1/policy/reload` (re-read it now; `422` `policy_invalid` with the diagnostics when
//! the file does not compile, and the old policy keeps serving).
//!
//! The reconciliation export ([`Export`], `/v1/ledger/export`) is the one answer that is not a
//! JSON value: it is streamed (chunked) as a blocking task reads the ledger, 64 KiB at a time,
//! so an export of any size holds one chunk in memory. A store failure in the middle of it
//! ends the connection without the last chunk: the client sees a truncated transfer, never a
//! short export that looks complete.

use async_trait::async_trait;
use bytes::Bytes;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;

use std::io::{self, Write};
use std::sync::Arc;

use serde_json::json;

use super::token::AdminToken;
use super::{Export, Op, Reply, apply};
use crate::reload::{Live, Reloaded};
use crate::store::Store;

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 64 * 1024;

pub struct Admin {
    pub store: Store,
    pub token: AdminToken,
    pub clock: fn() -> u64,
    pub live: Arc<Live>,
}

/// What the admin API answers: a JSON reply, or an export to stream.
enum Answer {
    Json(Reply),
    Export(Box<(Export, Option<crate::ledger::rates::Rate>)>),
}

impl From<Reply> for Answer {
    fn from(reply: Reply) -> Answer {
        Answer::Json(reply)
    }
}

impl Admin {
    async fn answer(&self, session: &mut ServerSession) -> Answer {
        let header = session.req_header();
        let authorization = header
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if !self.token.admits(authorization) {
            return Answer::Json(Reply::error(
                401,
                "unauthorized",
                "the admin API needs `Authorization: Bearer <token>` (admin.token in tollgate.yaml)",
            ));
        }
        let method = header.method.as_str().to_string();
        let path = header.uri.path().to_string();
        let query = header.uri.query().unwrap_or("").to_string();
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_BODY {
                        return Reply::error(
                            413,
                            "body_too_large",
                            format!("admin requests are at most {MAX_BODY} bytes"),
                        )
                        .into();
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(_) => {
                    return Reply::error(
                        400,
                        "invalid_request",
                        "the request body could not be read",
                    )
                    .into();
                }
            }
        }
        match (method.as_str(), path.trim_end_matches('/')) {
            ("GET", "/v1/policy") => return self.policy(None).into(),
            ("POST", "/v1/policy/reload") => {
                let reloaded = self.live.reload((self.clock)());
                return self.policy(Some(reloaded)).into();
            }
            (_, Export::PATH) => {
                return match Export::from_http(&method, &query, &body) {
                    Ok(export) => match export.rate_table("the request body") {
                        Ok(rate) => Answer::Export(Box::new((export, rate))),
                        Err(reply) => reply.into(),
                    },
                    Err(reply) => reply.into(),
                };
            }
            (_, "/v1/policy" | "/v1/policy/reload") => {
                return Reply::error(
                    405,
                    "method_not_allowed",
                    format!("{method} is not allowed on {path}"),
                )
                .into();
            }
            _ => {}
        }
        match Op::from_http(&method, &path, &query, &body) {
            Ok(op) => apply(&self.store, op, (self.clock)()).await.into(),
            Err(reply) => reply.into(),
        }
    }
}

impl Admin {
    /// The policy in force, and what a reload just did.
    fn policy(&self, reloaded: Option<Result<Reloaded, String>>) -> Reply {
        let loaded = self.live.current();
        let policy = &loaded.policy;
        let mut body = serde_json::Map::new();
        body.insert("service".into(), json!(policy.service));
        body.insert("version".into(), json!(policy.version));
        body.insert("file".into(), json!(policy.origin));
        body.insert("since".into(), json!(loaded.since));
        body.insert("routes".into(), json!(policy.routes.len()));
        match reloaded {
            None => {}
            Some(Ok(Reloaded::Unchanged { .. })) => {
                body.insert("reload".into(), json!("unchanged"));
            }
            Some(Ok(Reloaded::Swapped { from, .. })) => {
                body.insert("reload".into(), json!("swapped"));
                body.insert("previous_version".into(), json!(from));
            }
            Some(Err(diagnostics)) => {
                return Reply::error(
                    422,
                    "policy_invalid",
                    format!(
                        "the policy was not reloaded; the one in force (version {}) keeps serving:\n{diagnostics}",
                        policy.version
                    ),
                );
            }
        }
        Reply {
            status: 200,
            body: body.into(),
        }
    }
}

/// How big a chunk of an export is before it is sent.
const CHUNK: usize = 64 * 1024;

/// A writer that hands an export to the connection in chunks, through a bounded channel: the
/// export waits while the client reads slowly, and stops when the client goes away.
struct Chunks {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buffer: Vec<u8>,
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK),
        ));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Admin {
    /// Streams an export; `false` when it did not complete (the connection is then dropped).
    async fn stream(
        &self,
        http: &mut ServerSession,
        export: Export,
        rate: Option<crate::ledger::rates::Rate>,
    ) -> bool {
        let mut header = match ResponseHeader::build(200, None) {
            Ok(h) => h,
            Err(_) => return false,
        };
        let extension = export.format.as_str();
        let headers = [
            ("content-type", export.format.content_type().to_string()),
            ("cache-control", "no-store".into()),
            ("transfer-encoding", "chunked".into()),
            (
                "content-disposition",
                format!("attachment; filename=\"tollgate-ledger.{extension}\""),
            ),
        ];
        for (name, value) in headers {
            if header.insert_header(name, value).is_err() {
                return false;
            }
        }
        if http.write_response_header(Box::new(header)).await.is_err() {
            return false;
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let store = self.store.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut out = Chunks {
                tx,
                buffer: Vec::with_capacity(CHUNK),
            };
            crate::ledger::export::export(
                &store,
                &export.query,
                export.format,
                rate.as_ref(),
                &mut out,
            )
        });
        while let Some(chunk) = rx.recv().await {
            if http.write_response_body(chunk, false).await.is_err() {
                // Dropping the receiver stops the export at its next chunk.
                return false;
            }
        }
        match task.await {
            Ok(Ok(_)) => http.finish_body().await.is_ok(),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the ledger export stopped");
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "the ledger export task failed");
                false
            }
        }
    }
}

fn json_response(reply: &Reply) -> Option<ResponseHeader> {
    let mut header = ResponseHeader::build(reply.status, Some(5)).ok()?;
    header
        .insert_header("content-type", "application/json")
        .ok()?;
    header.insert_header("cache-control", "no-store").ok()?;
    if reply.status == 401 {
        header.insert_header("www-authenticate", "Bearer").ok()?;
    }
    Some(header)
}

#[async_trait]
impl HttpServerApp for Admin {
    async fn process_new_http(
        self: &Arc<Self>,
        mut http: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match http.read_request().await {
            Ok(true) => {}
            Ok(false) | Err(_) => return None,
        }
        http.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        match self.answer(&mut http).await {
            Answer::Json(reply) => {
                let body = serde_json::to_vec_pretty(&reply.body).unwrap_or_default();
                let mut header = json_response(&reply)?;
                header.insert_header("content-length", body.len()).ok()?;
                http.write_response_header(Box::new(header)).await.ok()?;
                http.write_response_body(body.into(), true).await.ok()?;
            }
            Answer::Export(export) => {
                let (export, rate) = *export;
                if !self.stream(&mut http, export, rate).await {
                    return None;
                }
            }
        }
        let settings = HttpPersistentSettings::for_session(&http);
        match http.finish().await {
            Ok(stream) => stream.map(|s| ReusedHttpStream::from_reusable_stream(s, settings)),
            Err(_) => None,
        }
    }
}
