//! Differential: what is priced is what is forwarded. For any request line, the decision
//! `policy::decide` makes on the parsed target (as the proxy's `request_filter` does) equals
//! the decision made on the request the upstream receives: the client's head with its raw
//! path replaced by that target (as `proxy::forward::prepare` does), read again by
//! `target::parse` and, separately, by Pingora's URI parser (the upstream's view of the path).
//! For an origin-form target, the client's own bytes decide the same too (collapsing `//`
//! changes nothing that is priced).
//!
//! Decisions are compared by route, outcome and reason, against three policies (every kind of
//! pattern, the shipped weather policy, the devnet example), with and without credentials.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;
use tollgate::policy::{Buyer, Decision, Outcome, PaymentHeader, Policy, Request, Why, decide};
use tollgate::target::{self, Target};
use tollgate_fuzz::{POLICIES, RequestLine};

/// What two decisions must agree on: the route, the outcome, the reason.
type Key = (Option<usize>, Outcome, Why);

fn key(decision: &Decision<'_>) -> Key {
    (
        decision.route.map(|r| r.id),
        decision.outcome.clone(),
        decision.why,
    )
}

/// Decisions for one target text under every policy, with no credentials and with both.
fn decisions(method: &str, target: &str) -> Vec<Key> {
    let mut out = Vec::new();
    for policy in POLICIES.iter() {
        for (api_key, payment) in [(false, None), (true, Some(PaymentHeader::V2))] {
            let request = Request {
                method,
                target,
                api_key,
                payment,
            };
            out.push(key(&decide(policy as &Policy, &request, &Buyer::default())));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some(request) = RequestLine::read(data) else {
        return;
    };
    let Ok(parsed) = target::parse(request.method, request.raw, request.host) else {
        return;
    };
    let priced = decisions(request.method, parsed.as_str());

    // The head the upstream gets: the client's, with the decided target as its raw path.
    let method = request.head_method();
    let mut upstream = RequestHeader::build(method, request.raw, None)
        .or_else(|_| RequestHeader::build(method, b"/", None))
        .unwrap_or_else(|e| panic!("Pingora builds no head for {method}: {e}"));
    if upstream.raw_path() != parsed.as_str().as_bytes() {
        upstream
            .set_raw_path(parsed.as_str().as_bytes())
            .unwrap_or_else(|e| panic!("Pingora refuses the decided target {parsed:?}: {e}"));
    }
    let sent = upstream.raw_path().to_vec();
    assert_eq!(sent, parsed.as_str().as_bytes());

    // The next hop parses what it was sent: the same target, the same decisions.
    let reparsed = target::parse(request.method, &sent, request.host)
        .unwrap_or_else(|e| panic!("the forwarded target {parsed:?} is refused: {e:?}"));
    assert_eq!(reparsed, parsed);
    assert_eq!(decisions(request.method, reparsed.as_str()), priced);

    if let Target::Origin(_) = parsed {
        // The upstream's URI parser reads the same path and query.
        let uri = &upstream.uri;
        let seen = match uri.query() {
            Some(query) => format!("{}?{query}", uri.path()),
            None => uri.path().to_string(),
        };
        assert_eq!(seen, parsed.as_str());
        assert_eq!(decisions(request.method, &seen), priced, "{seen:?}");
        // The client's own origin-form bytes are priced the same.
        if request.raw.first() == Some(&b'/') {
            let raw = std::str::from_utf8(request.raw).unwrap_or_default();
            assert_eq!(
                decisions(request.method, raw),
                priced,
                "{raw:?} and {parsed:?} are priced differently"
            );
        }
    }
});
