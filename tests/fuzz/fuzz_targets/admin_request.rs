//! The admin API's request decoding: `admin::Export::from_http` for the ledger export,
//! `admin::Op::from_http` for every other operation, fed as the admin service feeds them (the
//! request target split into path and query by `http::Uri`, the body as read).
//!
//! Input: `METHOD target` on the first line, the body after the first `\n`.
//! Checked for every input: no panic; a refusal is a 4xx with an `error` code; a request that
//! decodes survives the trip the CLI makes to a running sidecar: `to_http` (method, target,
//! body), decoded again, gives the same operation.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::admin::{Export, Op, Reply};

/// Path and query as the admin service takes them from the request head; `None` for a target
/// the HTTP parser refuses (the request never reaches the admin code).
fn split(target: &str) -> Option<(String, String)> {
    let uri: http::Uri = target.parse().ok()?;
    Some((
        uri.path().to_string(),
        uri.query().unwrap_or("").to_string(),
    ))
}

fn refused(reply: &Reply) {
    assert!((400..500).contains(&reply.status), "{reply:?}");
    assert!(reply.body["error"].is_string(), "{reply:?}");
}

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else {
        return;
    };
    let (method, target) = head.split_once(' ').unwrap_or((head, "/"));
    let Some((path, query)) = split(target) else {
        return;
    };
    if path.trim_end_matches('/') == Export::PATH {
        match Export::from_http(method, &query, body) {
            Err(reply) => refused(&reply),
            Ok(export) => {
                let _ = export.rate_table("the request body");
                let (method, target, body) = export.to_http();
                let Some((path, query)) = split(&target) else {
                    panic!("Export::to_http wrote a target HTTP refuses: {target:?}");
                };
                assert_eq!(path, Export::PATH);
                let body = body.unwrap_or_default();
                assert_eq!(
                    Export::from_http(method, &query, body.as_bytes()),
                    Ok(export),
                    "{method} {target}"
                );
            }
        }
        return;
    }
    match Op::from_http(method, &path, &query, body) {
        Err(reply) => refused(&reply),
        Ok(op) => {
            let (method, target, body) = op.to_http();
            let Some((path, query)) = split(&target) else {
                panic!("Op::to_http wrote a target HTTP refuses: {target:?}");
            };
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            assert_eq!(
                Op::from_http(method, &path, &query, body.as_bytes()),
                Ok(op),
                "{method} {target} {body}"
            );
        }
    }
});
