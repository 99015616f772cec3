//! The built-in registry of x402 networks and their USDC deployments.
//!
//! Facts from the x402 reference implementations (x402-notes §2.2). Mainnet and testnet USDC
//! use different EIP-712 domain names ("USD Coin" vs "USDC"); getting that wrong makes every
//! signature invalid, which is why these live in one table and nowhere else. Operators declare
//! other chains and assets with `network` blocks in a policy.

use alloy::primitives::{Address, address};

/// An EIP-3009 token on one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asset {
    /// The unit prices are written in: `USDC`.
    pub symbol: String,
    pub address: Address,
    /// EIP-712 domain `name` (sent to clients as `extra.name`).
    pub eip712_name: String,
    /// EIP-712 domain `version` (sent to clients as `extra.version`).
    pub eip712_version: String,
    pub decimals: u8,
}

/// An EVM chain that x402 buyers can pay on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The policy name, also the x402 v1 `network` string: `base-sepolia`.
    pub name: String,
    pub chain_id: u64,
    pub assets: Vec<Asset>,
}

impl Network {
    /// The x402 v2 (CAIP-2) network id: `eip155:84532`.
    pub fn caip2(&self) -> String {
        format!("eip155:{}", self.chain_id)
    }

    pub fn asset(&self, symbol: &str) -> Option<&Asset> {
        self.assets.iter().find(|a| a.symbol == symbol)
    }
}

fn usdc(address: Address, eip712_name: &str) -> Asset {
    Asset {
        symbol: "USDC".to_string(),
        address,
        eip712_name: eip712_name.to_string(),
        eip712_version: "2".to_string(),
        decimals: 6,
    }
}

/// The networks every policy can name without declaring them.
pub fn builtin() -> Vec<Network> {
    vec![
        Network {
            name: "base".to_string(),
            chain_id: 8453,
            assets: vec![usdc(
                address!("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"),
                "USD Coin",
            )],
        },
        Network {
            name: "base-sepolia".to_string(),
            chain_id: 84532,
            assets: vec![usdc(
                address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
                "USDC",
            )],
        },
    ]
}
