//! The request target (`target::parse`): any bytes, any method, with or without a `Host`.
//!
//! Checked for an accepted target: its text (`as_str`) is printable ASCII, `*` only for
//! `OPTIONS *`, else origin form without `//` in the path; `path()` is `as_str()` up to the
//! first `?`; read again (as the next hop does, with or without the host) it is the same
//! target; Pingora builds a request head on it whose URI path is that path and whose raw path
//! is that text; and for an origin-form target, collapsing `//` changed no route segment.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::policy::routes::split_path;
use tollgate::target::{self, Target};
use tollgate_fuzz::RequestLine;

fuzz_target!(|data: &[u8]| {
    let Some(request) = RequestLine::read(data) else {
        return;
    };
    let Ok(parsed) = target::parse(request.method, request.raw, request.host) else {
        return;
    };
    let text = parsed.as_str();
    assert!(text.bytes().all(|b| b.is_ascii_graphic()), "{text:?}");
    let path = parsed.path();
    match &parsed {
        Target::Asterisk => {
            assert_eq!(text, "*");
            assert_eq!(request.method, "OPTIONS");
            assert_eq!(request.raw, b"*");
        }
        Target::Origin(_) => {
            assert!(text.starts_with('/'), "{text:?}");
            assert!(!path.contains("//"), "{text:?}");
            assert!(!text.contains('#'), "{text:?}");
        }
    }
    match text.split_once('?') {
        Some((before, _)) => assert_eq!(path, before),
        None => assert_eq!(path, text),
    }
    // Read again, by the next hop, it is the same target.
    for host in [request.host, None] {
        assert_eq!(
            target::parse(request.method, text.as_bytes(), host),
            Ok(parsed.clone()),
            "{text:?}"
        );
    }
    if let Target::Origin(_) = parsed {
        let head =
            pingora::http::RequestHeader::build(request.head_method(), text.as_bytes(), None)
                .unwrap_or_else(|e| panic!("Pingora refuses {text:?}: {e}"));
        assert_eq!(head.uri.path(), path);
        assert_eq!(head.raw_path(), text.as_bytes());
        if request.raw.first() == Some(&b'/') {
            let raw = std::str::from_utf8(request.raw).unwrap_or_default();
            assert_eq!(split_path(raw), split_path(text), "{raw:?} → {text:?}");
        }
    }
});
