//! The admin API listener: authentication, body limits, and the JSON answer of an [`Op`].
//!
//! Every request is authenticated first — an unknown path without the token is a 401, not a
//! 404 — so the API reveals nothing to a caller without the token.
//!
//! Besides the account [`Op`]s, two endpoints exist only on a running sidecar:
//! `GET /v1/policy` (the policy in force: service, version, file, since) and
//! `POST /v1/policy/reload` (re-read it now; `422` `policy_invalid` with the diagnostics when
//! the file does not compile, and the old policy keeps serving).

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use std::sync::Arc;

use serde_json::json;

use super::token::AdminToken;
use super::{Op, Reply, apply};
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

impl Admin {
    async fn answer(&self, session: &mut ServerSession) -> Reply {
        let header = session.req_header();
        let authorization = header
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if !self.token.admits(authorization) {
            return Reply::error(
                401,
                "unauthorized",
                "the admin API needs `Authorization: Bearer <token>` (admin.token in tollgate.yaml)",
            );
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
                        );
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(_) => {
                    return Reply::error(
                        400,
                        "invalid_request",
                        "the request body could not be read",
                    );
                }
            }
        }
        match (method.as_str(), path.trim_end_matches('/')) {
            ("GET", "/v1/policy") => return self.policy(None),
            ("POST", "/v1/policy/reload") => {
                let reloaded = self.live.reload((self.clock)());
                return self.policy(Some(reloaded));
            }
            (_, "/v1/policy" | "/v1/policy/reload") => {
                return Reply::error(
                    405,
                    "method_not_allowed",
                    format!("{method} is not allowed on {path}"),
                );
            }
            _ => {}
        }
        match Op::from_http(&method, &path, &query, &body) {
            Ok(op) => apply(&self.store, op, (self.clock)()).await,
            Err(reply) => reply,
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

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let reply = self.answer(session).await;
        let body = serde_json::to_vec_pretty(&reply.body).unwrap_or_default();
        let mut response = http::Response::builder()
            .status(reply.status)
            .header("content-type", "application/json")
            .header("cache-control", "no-store")
            .header("content-length", body.len());
        if reply.status == 401 {
            response = response.header("www-authenticate", "Bearer");
        }
        response.body(body).unwrap_or_default()
    }
}
