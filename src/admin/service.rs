//! The admin API listener: authentication, body limits, and the JSON answer of an [`Op`].
//!
//! Every request is authenticated first — an unknown path without the token is a 401, not a
//! 404 — so the API reveals nothing to a caller without the token.

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use super::token::AdminToken;
use super::{Op, Reply, apply};
use crate::store::Store;

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 64 * 1024;

pub struct Admin {
    pub store: Store,
    pub token: AdminToken,
    pub clock: fn() -> u64,
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
        match Op::from_http(&method, &path, &query, &body) {
            Ok(op) => apply(&self.store, op, (self.clock)()).await,
            Err(reply) => reply,
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
