//! Known answers: the golden EIP-3009 signature of x402-notes §5 and payment headers captured
//! from the official x402 clients (`tests/fixtures/x402/`, copied from `../shared/vectors`),
//! verified by tollgate's verifier with an injected clock.

use alloy::primitives::{Address, b256};
use alloy::sol_types::eip712_domain;
use serde_json::Value;
use tollgate::policy::{self, Source};
use tollgate::x402::verify::{self, Version};
use tollgate::x402::wire::Authorization;
use tollgate::x402::{Rejection, Terms};

fn terms_for(policy_text: &str) -> Terms {
    let checked = policy::check(Source::new("vector.toll", policy_text.to_string()));
    let Some(policy) = &checked.policy else {
        panic!("{}", checked.render(policy::Style::Plain));
    };
    Terms::new(policy)
}

fn service(pay_to: &str, networks: &str, extra: &str) -> String {
    format!(
        "{extra}\nservice \"v\" {{\n  pay_to {pay_to}\n  accept x402 on {networks}\n  settle via facilitator \"http://127.0.0.1:1\" after response\n  default deny\n  route GET \"/x\" {{\n    price 0.01 USDC\n  }}\n}}\n"
    )
}

fn golden() -> (Authorization, &'static str) {
    (
        Authorization {
            from: "0x857b06519E91e3A54538791bDbb0E22373e36b66".into(),
            to: "0x209693Bc6afc0C5328bA36FaF03C514EF312287C".into(),
            value: "10000".into(),
            valid_after: "1740672089".into(),
            valid_before: "1740672154".into(),
            nonce: "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480".into(),
        },
        "0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c",
    )
}

const GOLDEN_PAY_TO: &str = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C";

#[test]
fn the_golden_vector_verifies_inside_its_window() {
    let terms = terms_for(&service(GOLDEN_PAY_TO, "base-sepolia", ""));
    let offer = &terms.route(0).unwrap().offers[0];
    assert_eq!(
        offer.domain_separator,
        b256!("0x71f17a3b2ff373b803d70a5a07c046c1a2bc8e89c09ef722fcb047abe94c9818")
    );
    let (auth, signature) = golden();
    let signed = verify::parse(&auth, signature).unwrap();
    assert_eq!(
        verify::digest(&signed, offer.domain_separator),
        b256!("0xf256992871671abcb27ff92885a7afa46218724e5fc0bac35d050115aa1d22e6")
    );
    let payer = verify::check(&signed, offer, 1_740_672_100).unwrap();
    assert_eq!(
        payer,
        "0x857b06519E91e3A54538791bDbb0E22373e36b66"
            .parse::<Address>()
            .unwrap()
    );

    // The window's edges: validAfter is inclusive, validBefore needs 6 s to spare.
    assert!(verify::check(&signed, offer, 1_740_672_089).is_ok());
    assert!(matches!(
        verify::check(&signed, offer, 1_740_672_088),
        Err(Rejection::NotYetValid { .. })
    ));
    assert!(verify::check(&signed, offer, 1_740_672_148).is_ok());
    assert!(matches!(
        verify::check(&signed, offer, 1_740_672_149),
        Err(Rejection::Expired { .. })
    ));
    // Today it has long expired.
    assert!(matches!(
        verify::check(&signed, offer, 1_795_000_000),
        Err(Rejection::Expired { .. })
    ));
}

#[test]
fn the_golden_vector_fails_under_the_wrong_domain_name_or_chain() {
    let terms = terms_for(&service(GOLDEN_PAY_TO, "base-sepolia", ""));
    let offer = &terms.route(0).unwrap().offers[0];
    let (auth, signature) = golden();
    let signed = verify::parse(&auth, signature).unwrap();
    let usdc: Address = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
        .parse()
        .unwrap();
    for (name, chain_id) in [("USD Coin", 84532u64), ("USDC", 8453)] {
        let mut wrong = offer.clone();
        wrong.domain_separator = eip712_domain! {
            name: name.to_string(),
            version: "2".to_string(),
            chain_id: chain_id,
            verifying_contract: usdc,
        }
        .separator();
        assert_eq!(
            verify::check(&signed, &wrong, 1_740_672_100),
            Err(Rejection::InvalidSignature),
            "{name} on {chain_id}"
        );
    }
}

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/x402/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A policy that offers exactly what the capture server offered.
fn capture_terms(description: &str) -> Terms {
    terms_for(&format!(
        "service \"capture\" {{\n  pay_to 0x710D094d04ac8B4eE234D26c53ba15A1Dce203d1\n  accept x402 on base-sepolia\n  settle via facilitator \"http://127.0.0.1:1\" after response\n  default deny\n  route GET \"/weather\" {{\n    price 0.01 USDC\n    description \"{description}\"\n    mime \"application/json\"\n  }}\n}}\n"
    ))
}

#[test]
fn captured_official_client_payments_verify() {
    let payer: Address = "0xcA7e383cc471e99f79Bc7cA90A111Fb92E93ac8b"
        .parse()
        .unwrap();
    for (header, body, description, now, version) in [
        (
            "x402-fetch-2.27.0-v2.PAYMENT-SIGNATURE.b64",
            "x402-fetch-2.27.0-v2.402-body.json",
            "local x402 v2 test resource",
            1_795_215_800,
            Version::V2,
        ),
        (
            "x402-fetch-2.27.0-v1.X-PAYMENT.b64",
            "x402-fetch-2.27.0-v1.402-body.json",
            "local x402 v1 test resource",
            1_795_215_800,
            Version::V1,
        ),
        (
            "x402-fetch-1.2.0-v1.X-PAYMENT.b64",
            "x402-fetch-1.2.0-v1.402-body.json",
            "local x402 v1 test resource",
            1_795_215_800,
            Version::V1,
        ),
    ] {
        let terms = capture_terms(description);
        let route = terms.route(0).unwrap();
        // tollgate offers what the capture server offered, entry for entry.
        let offered: Value = serde_json::from_str(&fixture(body)).unwrap();
        let ours = serde_json::to_value(&route.accepts[0]).unwrap();
        let theirs = &offered["accepts"][0];
        for field in [
            "scheme",
            "amount",
            "asset",
            "payTo",
            "maxTimeoutSeconds",
            "extra",
        ] {
            if let Some(value) = theirs.get(field) {
                assert_eq!(&ours[field], value, "{body}: {field}");
            }
        }
        let header = fixture(header);
        let payment = verify::verify(header.trim().as_bytes(), route, now)
            .unwrap_or_else(|e| panic!("{header}: {e}"));
        assert_eq!(
            (payment.payer, payment.version, payment.amount),
            (payer, version, 10_000)
        );
        // Outside the window the same header is refused.
        assert!(matches!(
            verify::verify(header.trim().as_bytes(), route, 1_900_000_000),
            Err(Rejection::Expired { .. })
        ));
    }
}

#[test]
fn a_v2_payment_must_echo_an_offered_entry_exactly() {
    let terms = capture_terms("something else");
    let route = terms.route(0).unwrap();
    let header = fixture("x402-fetch-2.27.0-v2.PAYMENT-SIGNATURE.b64");
    // The description is not part of `accepts` in v2, so the entry still matches...
    assert!(verify::verify(header.trim().as_bytes(), route, 1_795_215_800).is_ok());
    // ...but a different price is a different entry.
    let dearer = terms_for(
        &service(
            "0x710D094d04ac8B4eE234D26c53ba15A1Dce203d1",
            "base-sepolia",
            "",
        )
        .replace("0.01 USDC", "0.02 USDC"),
    );
    let route = dearer.route(0).unwrap();
    assert_eq!(
        verify::verify(header.trim().as_bytes(), route, 1_795_215_800).unwrap_err(),
        Rejection::AcceptedMismatch
    );
}
