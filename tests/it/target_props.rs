//! Property tests of the request target (`tollgate::target`): what is priced is what the
//! upstream receives, for every input.
//!
//! - the canonical target is printable ASCII, origin form (or `*`), without `//`, and reading
//!   it again gives it back: a second reader (Pingora on the upstream side, another proxy)
//!   sees exactly the text that was priced;
//! - differential with Pingora: the path Pingora's own request parser gives the canonical
//!   target is the path the decision matched;
//! - collapsing `//` never changes what is priced: the route segments of the raw target and of
//!   the canonical one are equal.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use tollgate::policy::routes::split_path;
use tollgate::target::{self, Target};

const PIECES: &[&str] = &[
    "/", "//", "a", "paid", "P", "1", "%2F", "%2f", "%5C", "%41", "%", "%zz", "%00", ":", "foo:",
    "http://", "HTTPS://", "h", "h:80", "@", "?", "q=1", "&", "#", ";", "\\", ".", "..", "*", "é",
    " ", "~", "+", "`", "<", ">", "\"", "{", "|",
];

/// How a target starts: mostly as a path or a URL of the host, so most cases get past the
/// form check and exercise the path rules.
const STARTS: &[&str] = &[
    "/",
    "/",
    "/",
    "//",
    "http://h",
    "http://h/",
    "HTTP://h?",
    "",
    "*",
];

fn targets() -> impl Strategy<Value = String> {
    (select(STARTS), vec(select(PIECES), 0..14))
        .prop_map(|(start, pieces)| format!("{start}{}", pieces.concat()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn the_target_forwarded_is_the_target_priced(raw in targets(), options in any::<bool>()) {
        let method = if options { "OPTIONS" } else { "GET" };
        let Ok(parsed) = target::parse(method, raw.as_bytes(), Some(b"h")) else {
            return Ok(());
        };
        let text = parsed.as_str();
        prop_assert!(text.bytes().all(|b| b.is_ascii_graphic()), "{text:?}");
        match &parsed {
            Target::Asterisk => prop_assert_eq!(text, "*"),
            Target::Origin(_) => {
                prop_assert!(text.starts_with('/'), "{text:?}");
                prop_assert!(!parsed.path().contains("//"), "{text:?}");
            }
        }
        // Read again (as the next hop does), it is the same target.
        prop_assert_eq!(target::parse(method, text.as_bytes(), Some(b"h")), Ok(parsed.clone()));
        // Pingora's own parser gives the forwarded target the path that was priced.
        if let Target::Origin(_) = parsed {
            let header = pingora::http::RequestHeader::build(method, text.as_bytes(), None)
                .map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
            prop_assert_eq!(header.uri.path(), parsed.path());
            prop_assert_eq!(header.raw_path(), text.as_bytes());
        }
    }

    #[test]
    fn collapsing_slashes_never_changes_the_price(raw in targets()) {
        let Ok(parsed) = target::parse("GET", raw.as_bytes(), Some(b"h")) else {
            return Ok(());
        };
        if raw.starts_with('/') {
            prop_assert_eq!(split_path(&raw), split_path(parsed.as_str()));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    /// The generator is worth its cases: a good share of them are accepted.
    #[test]
    fn most_generated_targets_reach_the_path_rules(raws in vec(targets(), 200)) {
        let accepted = raws
            .iter()
            .filter(|raw| target::parse("GET", raw.as_bytes(), Some(b"h")).is_ok())
            .count();
        prop_assert!(accepted >= 40, "{accepted} of 200");
    }
}

/// Found by the `target` fuzz target (tests/fuzz): printable bytes that `http::Uri` refuses
/// where they stand were accepted, and Pingora then refused the head with an empty 400. Every
/// target tollgate accepts is one Pingora builds a head on; the others are refused in words.
#[test]
fn every_accepted_target_is_one_pingora_takes() {
    for raw in [
        "/`",
        "/a<b",
        "/a>b",
        "/?\"",
        "/p?<",
        "/p?>",
        "http://h/`",
        "/\"",
        "/?`",
        "/{|}^",
    ] {
        match target::parse("GET", raw.as_bytes(), Some(b"h")) {
            Ok(parsed) => {
                let head =
                    pingora::http::RequestHeader::build("GET", parsed.as_str().as_bytes(), None);
                assert!(head.is_ok(), "{raw:?} accepted, but Pingora refuses it");
            }
            Err(e) => {
                assert_eq!(
                    e,
                    tollgate::policy::routes::Malformed::TargetBytes,
                    "{raw:?}"
                );
                let head = pingora::http::RequestHeader::build("GET", raw.as_bytes(), None);
                assert!(head.is_err(), "{raw:?} refused, but Pingora takes it");
            }
        }
    }
}
