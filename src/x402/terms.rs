//! What buyers are offered: per paid route, the x402 `accepts` entries, built once per policy.
//!
//! Entries are deterministic — the same bytes on every 402 — because v2 clients echo the chosen
//! entry in `accepted` and servers compare it for equality (x402-notes §1.2). Each offer also
//! carries its EIP-712 domain separator, precomputed, so verification hashes only the message.

use std::sync::Arc;

use alloy::primitives::{Address, B256, U256};
use alloy::sol_types::Eip712Domain;
use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use super::wire::{
    Extra, PaymentRequiredV1, PaymentRequiredV2, RequirementsV1, RequirementsV2, Resource,
    encode_header,
};
use crate::policy::routes::RouteId;
use crate::policy::{Policy, Route};

/// The x402 terms of every route of one policy.
#[derive(Debug, Clone)]
pub struct Terms {
    /// Indexed by [`RouteId`]; `None` for routes without an x402 price. Shared (`Arc`) so a 402
    /// or an admitted payment holds its route's terms without copying them.
    routes: Vec<Option<Arc<RouteTerms>>>,
    /// `GET /.well-known/x402`, rendered once.
    discovery: Bytes,
}

/// The x402 terms of one paid route.
#[derive(Debug, Clone)]
pub struct RouteTerms {
    pub offers: Vec<Offer>,
    /// The v2 `accepts` array, one entry per offer, in offer order.
    pub accepts: Vec<RequirementsV2>,
    /// The same entries as JSON values, compared with a v2 payment's `accepted`.
    accepts_json: Vec<Value>,
    pub description: String,
    pub mime: String,
}

/// One way to pay for a route: an amount of one asset on one network, to `pay_to`.
#[derive(Debug, Clone)]
pub struct Offer {
    /// v1 network name: `base-sepolia`.
    pub network: String,
    /// v2 network id: `eip155:84532`.
    pub caip2: String,
    pub chain_id: u64,
    pub asset: Address,
    pub asset_symbol: String,
    pub decimals: u8,
    pub pay_to: Address,
    pub amount: u128,
    pub timeout_secs: u64,
    pub extra: Extra,
    /// EIP-712 domain separator of (`extra.name`, `extra.version`, chain id, asset).
    pub domain_separator: B256,
}

impl Terms {
    pub fn new(policy: &Policy) -> Terms {
        let routes: Vec<Option<Arc<RouteTerms>>> = policy
            .routes
            .iter()
            .map(|route| RouteTerms::new(policy, route).map(Arc::new))
            .collect();
        let discovery = Bytes::from(discovery(policy, &routes));
        Terms { routes, discovery }
    }

    pub fn route(&self, id: RouteId) -> Option<&Arc<RouteTerms>> {
        self.routes.get(id).and_then(Option::as_ref)
    }

    /// The `/.well-known/x402` document.
    pub fn discovery(&self) -> Bytes {
        self.discovery.clone()
    }
}

impl RouteTerms {
    fn new(policy: &Policy, route: &Route) -> Option<RouteTerms> {
        let price = route.price()?;
        let pay_to = policy.pay_to?;
        if price.offers.is_empty() {
            return None;
        }
        let offers: Vec<Offer> = price
            .offers
            .iter()
            .filter_map(|offer| {
                let network = policy.networks.get(offer.network)?;
                let domain = Eip712Domain::new(
                    Some(offer.asset.eip712_name.clone().into()),
                    Some(offer.asset.eip712_version.clone().into()),
                    Some(U256::from(network.chain_id)),
                    Some(offer.asset.address),
                    None,
                );
                Some(Offer {
                    network: network.name.clone(),
                    caip2: network.caip2(),
                    chain_id: network.chain_id,
                    asset: offer.asset.address,
                    asset_symbol: offer.asset.symbol.clone(),
                    decimals: offer.asset.decimals,
                    pay_to,
                    amount: offer.amount,
                    timeout_secs: route.timeout_secs,
                    extra: Extra {
                        name: offer.asset.eip712_name.clone(),
                        version: offer.asset.eip712_version.clone(),
                    },
                    domain_separator: domain.separator(),
                })
            })
            .collect();
        let accepts: Vec<RequirementsV2> = offers.iter().map(Offer::v2).collect();
        let accepts_json = accepts
            .iter()
            .map(|a| serde_json::to_value(a).unwrap_or(Value::Null))
            .collect();
        Some(RouteTerms {
            offers,
            accepts,
            accepts_json,
            description: route.description.clone(),
            mime: route.mime.clone(),
        })
    }

    /// The index of the offer whose v2 entry equals `accepted` (JSON value equality: key order
    /// and whitespace do not matter, every field and value does).
    pub fn accepted_offer(&self, accepted: &Value) -> Option<usize> {
        self.accepts_json.iter().position(|entry| entry == accepted)
    }

    /// The index of the offer on a v1 network name.
    pub fn offer_on(&self, network: &str) -> Option<usize> {
        self.offers.iter().position(|o| o.network == network)
    }

    /// A 402 challenge: the base64 `PAYMENT-REQUIRED` header (v2) and the JSON body (v1).
    pub fn challenge(
        &self,
        resource_url: &str,
        code: &str,
        message: &str,
        hint: Option<&str>,
    ) -> (String, Vec<u8>) {
        let header = encode_header(&PaymentRequiredV2 {
            x402_version: 2,
            error: code,
            resource: Resource {
                url: resource_url,
                description: &self.description,
                mime_type: &self.mime,
            },
            accepts: &self.accepts,
        });
        let body = PaymentRequiredV1 {
            x402_version: 1,
            error: code,
            message,
            hint,
            accepts: self
                .offers
                .iter()
                .zip(&self.accepts)
                .map(|(offer, v2)| RequirementsV1 {
                    scheme: v2.scheme,
                    network: &offer.network,
                    max_amount_required: &v2.amount,
                    resource: resource_url,
                    description: &self.description,
                    mime_type: &self.mime,
                    pay_to: &v2.pay_to,
                    max_timeout_seconds: v2.max_timeout_seconds,
                    asset: &v2.asset,
                    extra: &v2.extra,
                })
                .collect(),
        };
        (header, serde_json::to_vec(&body).unwrap_or_default())
    }
}

impl Offer {
    fn v2(&self) -> RequirementsV2 {
        RequirementsV2 {
            scheme: "exact",
            network: self.caip2.clone(),
            amount: self.amount.to_string(),
            asset: self.asset.to_checksum(None),
            pay_to: self.pay_to.to_checksum(None),
            max_timeout_seconds: self.timeout_secs,
            extra: self.extra.clone(),
        }
    }

    /// The v1 `accepts` entry of this offer for one resource (sent to the facilitator).
    pub fn v1_json(&self, resource_url: &str, terms: &RouteTerms) -> Value {
        let v2 = self.v2();
        serde_json::to_value(RequirementsV1 {
            scheme: "exact",
            network: &self.network,
            max_amount_required: &v2.amount,
            resource: resource_url,
            description: &terms.description,
            mime_type: &terms.mime,
            pay_to: &v2.pay_to,
            max_timeout_seconds: v2.max_timeout_seconds,
            asset: &v2.asset,
            extra: &v2.extra,
        })
        .unwrap_or(Value::Null)
    }

    /// The v2 `accepts` entry of this offer as JSON (sent to the facilitator).
    pub fn v2_json(&self) -> Value {
        serde_json::to_value(self.v2()).unwrap_or(Value::Null)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Discovery<'a> {
    x402_version: u8,
    service: &'a str,
    policy_version: &'a str,
    /// The header prepaid API keys travel in, when the service takes them.
    prepaid_header: Option<&'a str>,
    routes: Vec<DiscoveredRoute<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DiscoveredRoute<'a> {
    /// `GET`, or `*` for any method.
    method: &'a str,
    path: String,
    description: &'a str,
    mime_type: &'a str,
    /// The exact v2 entries a 402 on this route offers.
    accepts: &'a [RequirementsV2],
    /// Credits a prepaid key pays, when the route takes prepaid.
    credits: Option<String>,
    /// Credits a payment on this route buys (`sells N credits`).
    #[serde(skip_serializing_if = "Option::is_none")]
    sells_credits: Option<String>,
    /// The protocols a request may upgrade to (`upgrade websocket`); absent when upgrades are
    /// not allowed. Kept out of `accepts`, whose entries clients compare for equality.
    #[serde(skip_serializing_if = "Option::is_none")]
    upgrade: Option<DiscoveredUpgrade<'a>>,
}

/// How an upgraded connection is paid for.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DiscoveredUpgrade<'a> {
    /// Lower-case protocol names, e.g. `["websocket"]`.
    protocols: &'a [String],
    /// Always `"connection"`: one payment (or debit) pays for the whole upgraded connection.
    priced_per: &'static str,
}

fn discovery(policy: &Policy, terms: &[Option<Arc<RouteTerms>>]) -> Vec<u8> {
    let routes = policy
        .routes
        .iter()
        .zip(terms)
        .filter_map(|(route, terms)| {
            let price = route.price()?;
            Some(DiscoveredRoute {
                method: route.method.as_deref().unwrap_or("*"),
                path: route.pattern.to_string(),
                description: &route.description,
                mime_type: &route.mime,
                accepts: terms.as_ref().map_or(&[], |t| t.accepts.as_slice()),
                credits: price.credits.map(|c| c.to_string()),
                sells_credits: route.sells.map(|c| c.to_string()),
                upgrade: (!route.upgrade.is_empty()).then_some(DiscoveredUpgrade {
                    protocols: &route.upgrade,
                    priced_per: "connection",
                }),
            })
        })
        .collect();
    serde_json::to_vec_pretty(&Discovery {
        x402_version: 2,
        service: &policy.service,
        policy_version: &policy.version,
        prepaid_header: policy.prepaid.as_ref().map(|p| p.header.as_str()),
        routes,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{self, Source};

    fn terms(routes: &str) -> Terms {
        let text = format!(
            "service \"ws\" {{\n  pay_to 0x209693Bc6afc0C5328bA36FaF03C514EF312287C\n  accept x402 on base-sepolia\n  settle via facilitator \"https://x402.org/facilitator\"\n  default deny\n{routes}}}\n"
        );
        let checked = policy::check(Source::new("ws.toll", text));
        let rendered = checked.render(policy::Style::Plain);
        let policy = checked.policy.unwrap_or_else(|| panic!("{rendered}"));
        Terms::new(&policy)
    }

    fn discovered(terms: &Terms) -> Value {
        serde_json::from_slice(&terms.discovery()).unwrap()
    }

    #[test]
    fn discovery_lists_upgrades_priced_per_connection() {
        let t = terms(
            "  route GET \"/stream\" {\n    price 0.01 USDC\n    upgrade WebSocket, h2c\n  }\n",
        );
        let doc = discovered(&t);
        let route = &doc["routes"][0];
        assert_eq!(
            route["upgrade"],
            serde_json::json!({"protocols": ["websocket", "h2c"], "pricedPer": "connection"})
        );
        // The accepts entries stay exactly what a 402 offers: clients compare them.
        let plain = terms("  route GET \"/stream\" {\n    price 0.01 USDC\n  }\n");
        assert_eq!(route["accepts"], discovered(&plain)["routes"][0]["accepts"]);
        assert_eq!(
            t.route(0).unwrap().accepts_json,
            plain.route(0).unwrap().accepts_json
        );
    }

    #[test]
    fn discovery_omits_upgrade_when_not_allowed() {
        let doc = discovered(&terms("  route GET \"/x\" {\n    price 0.01 USDC\n  }\n"));
        assert!(doc["routes"][0].get("upgrade").is_none(), "{doc}");
    }
}
