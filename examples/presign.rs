//! Pre-signs unique x402 v2 payments for the load script (`tests/load/run.sh`): one
//! `PAYMENT-SIGNATURE` header value per line, each with a fresh nonce, for the `accepts` entry
//! read from a sidecar's 402.
//!
//! `cargo run --release --example presign -- <sidecar url of a paid route> <count> <out file>`
#![allow(
    clippy::indexing_slicing,
    reason = "indexing a serde_json::Value by key yields Null, never panics"
)]

use std::io::Write;

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolStruct, eip712_domain};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tollgate::x402::verify::TransferWithAuthorization;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, count, out] = args.as_slice() else {
        return Err("usage: presign <paid route url> <count> <out file>".into());
    };
    let count: usize = count.parse()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::get(url).await?;
    let challenge = response
        .headers()
        .get("payment-required")
        .ok_or("no PAYMENT-REQUIRED header: is the route paid?")?
        .to_str()?;
    let required: Value = serde_json::from_slice(&STANDARD.decode(challenge)?)?;
    let entry = required["accepts"]
        .get(0)
        .ok_or("no accepts entry")?
        .clone();
    let chain_id: u64 = entry["network"]
        .as_str()
        .and_then(|n| n.strip_prefix("eip155:"))
        .ok_or("network")?
        .parse()?;
    let domain = eip712_domain! {
        name: entry["extra"]["name"].as_str().ok_or("extra.name")?.to_string(),
        version: entry["extra"]["version"].as_str().ok_or("extra.version")?.to_string(),
        chain_id: chain_id,
        verifying_contract: entry["asset"].as_str().ok_or("asset")?.parse::<Address>()?,
    };
    let signer = PrivateKeySigner::from_bytes(&B256::repeat_byte(0x42))?;
    let pay_to: Address = entry["payTo"].as_str().ok_or("payTo")?.parse()?;
    let value = U256::from_str_radix(entry["amount"].as_str().ok_or("amount")?, 10)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let valid_before = now
        + entry["maxTimeoutSeconds"]
            .as_u64()
            .ok_or("maxTimeoutSeconds")?;
    let run = keccak256(now.to_be_bytes());
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    for i in 0..count {
        let nonce = keccak256([run.as_slice(), &(i as u64).to_be_bytes()].concat());
        let message = TransferWithAuthorization {
            from: signer.address(),
            to: pay_to,
            value,
            validAfter: U256::ZERO,
            validBefore: U256::from(valid_before),
            nonce,
        };
        let signature = signer.sign_hash_sync(&message.eip712_signing_hash(&domain))?;
        let payload = json!({
            "x402Version": 2,
            "accepted": entry,
            "payload": {
                "signature": format!("0x{}", alloy::hex::encode(signature.as_bytes())),
                "authorization": {
                    "from": signer.address().to_checksum(None),
                    "to": pay_to.to_checksum(None),
                    "value": value.to_string(),
                    "validAfter": "0",
                    "validBefore": valid_before.to_string(),
                    "nonce": nonce.to_string(),
                }
            }
        });
        writeln!(file, "{}", STANDARD.encode(serde_json::to_vec(&payload)?))?;
    }
    file.flush()?;
    Ok(())
}
