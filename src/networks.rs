//! The built-in registry of x402 networks and their USDC deployments.
//!
//! Facts from the x402 reference implementations (x402-notes §2.2). Mainnet and testnet USDC
//! use different EIP-712 domain names ("USD Coin" vs "USDC"); getting that wrong makes every
//! signature invalid, which is why these live in one table and nowhere else. Operators declare
//! other chains and assets with `network` blocks in a policy.
//!
//! Every network is a testnet or not ([`Network::testnet`]): test tokens are free, so a route
//! offered on a testnet and a mainnet at once lets buyers pay a mainnet price with test money
//! (`policy::compile` warns). Built-in networks say so in the table; a declared network is a
//! testnet when its chain id is a well-known test or local chain ([`TESTNET_CHAIN_IDS`]), and
//! counts as a mainnet otherwise (the side where real money is at stake).

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
    /// A test or local chain, whose tokens have no value.
    pub testnet: bool,
}

/// Chain ids of well-known test and local chains: a declared network on one of them is a
/// testnet. Local dev nodes (Hardhat/Anvil 31337, Geth/Ganache 1337), Ethereum's testnets
/// (Sepolia, Holesky, Hoodi, Goerli) and the Sepolia-style testnets of common L2s and the
/// testnets of chains the x402 reference implementations support.
pub const TESTNET_CHAIN_IDS: [u64; 20] = [
    1_337,      // Geth dev mode, Ganache
    31_337,     // Hardhat, Anvil
    5,          // Ethereum Goerli (retired)
    17_000,     // Ethereum Holesky
    560_048,    // Ethereum Hoodi
    11_155_111, // Ethereum Sepolia
    84_532,     // Base Sepolia
    11_155_420, // OP Sepolia
    421_614,    // Arbitrum Sepolia
    80_002,     // Polygon Amoy
    80_001,     // Polygon Mumbai (retired)
    43_113,     // Avalanche Fuji
    97,         // BNB Smart Chain testnet
    59_141,     // Linea Sepolia
    534_351,    // Scroll Sepolia
    300,        // zkSync Era Sepolia
    44_787,     // Celo Alfajores
    1_328,      // Sei testnet (atlantic-2)
    4_690,      // IoTeX testnet
    1_301,      // Unichain Sepolia
];

/// Whether a chain id is a well-known test or local chain.
pub fn is_testnet_chain(chain_id: u64) -> bool {
    TESTNET_CHAIN_IDS.contains(&chain_id)
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
            testnet: false,
        },
        Network {
            name: "base-sepolia".to_string(),
            chain_id: 84532,
            assets: vec![usdc(
                address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
                "USDC",
            )],
            testnet: true,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_testnets_are_flagged() {
        let flags: Vec<(String, bool)> =
            builtin().into_iter().map(|n| (n.name, n.testnet)).collect();
        assert_eq!(
            flags,
            [
                ("base".to_string(), false),
                ("base-sepolia".to_string(), true)
            ]
        );
        for n in builtin() {
            assert_eq!(is_testnet_chain(n.chain_id), n.testnet, "{}", n.name);
        }
    }

    #[test]
    fn local_and_well_known_test_chains_are_testnets() {
        for id in [31_337, 1_337, 11_155_111, 84_532] {
            assert!(is_testnet_chain(id), "{id}");
        }
        for id in [1, 8_453, 10, 42_161, 137, 12_345] {
            assert!(!is_testnet_chain(id), "{id}");
        }
    }
}
