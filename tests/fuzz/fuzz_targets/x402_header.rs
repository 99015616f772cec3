//! The x402 payment header, v1 (`X-PAYMENT`) and v2 (`PAYMENT-SIGNATURE`): decoding
//! (`x402::wire::decode_payment`) and local verification (`x402::verify::verify`) of any bytes
//! against the terms of the captured official clients' 402s, at a fixed `now`.
//!
//! The first byte picks the route's terms and whether the rest is the header as sent or JSON
//! that the target base64-encodes first (so mutations work on the JSON, not on its base64).
//! Checked for every input: no panic; a rejection has a code and a status of 400, 402 or 403;
//! an accepted payment is for exactly one offer of the route, at its price, to its `pay_to`,
//! inside its time window, in the version the payload declared, signed by its `from`.

#![no_main]

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use libfuzzer_sys::fuzz_target;
use tollgate::x402::verify::{self, Version};
use tollgate::x402::wire;
use tollgate_fuzz::{NOW, TERMS};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let encoded;
    let header = if mode & 1 == 0 {
        rest
    } else {
        encoded = STANDARD.encode(rest);
        encoded.as_bytes()
    };
    let terms = &TERMS[usize::from(mode >> 1) % TERMS.len()];
    let Some(route) = terms.route(0) else {
        panic!("the fuzz policies price route 0");
    };
    let decoded = wire::decode_payment(header);
    match verify::verify(header, route, NOW) {
        Err(rejection) => {
            assert!(!rejection.code().is_empty());
            assert!(
                matches!(rejection.status(), 400 | 402 | 403),
                "{rejection:?}: {}",
                rejection.status()
            );
            let _ = rejection.to_string();
        }
        Ok(payment) => {
            let Ok((payload, raw)) = decoded else {
                panic!("verified a header that does not decode");
            };
            assert_eq!(raw, payment.raw);
            let offer = &route.offers[payment.offer];
            assert_eq!(payment.amount, offer.amount);
            let version = match payment.version {
                Version::V1 => 1,
                Version::V2 => 2,
            };
            assert_eq!(payload.x402_version, version);
            let auth = &payload.payload.authorization;
            let signed = verify::parse(auth, &payload.payload.signature)
                .unwrap_or_else(|e| panic!("verified, then refused to parse: {e}"));
            assert_eq!(signed.to, offer.pay_to);
            assert_eq!(signed.from, payment.payer);
            assert_eq!(signed.nonce, payment.nonce);
            assert!(payment.valid_after <= NOW);
            assert!(payment.valid_before >= NOW + verify::VALID_BEFORE_MARGIN_SECS);
            assert!(payment.valid_before <= NOW + offer.timeout_secs + verify::CLOCK_SKEW_SECS);
            assert_eq!(signed.signature.len(), 65);
        }
    }
});
