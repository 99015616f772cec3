//! End-to-end: the real `tollgate` binary between a real HTTP client, a real upstream and a
//! facilitator that checks signatures, all on loopback. See [`harness`].

mod chain;
mod chain_relayer;
mod chain_relayer_faults;
mod chain_settlement;
mod crash_cycles;
mod deferred;
mod faults;
mod faults_signals;
mod harness;
mod interop;
mod ledger;
mod lifecycle;
mod mixed;
mod ops;
mod payments;
mod prepaid;
mod proxying;
mod secrets;
mod security;
mod settlement;
mod soak;
mod store_faults;

use std::path::PathBuf;

use harness::{Facilitator, Launch, Sidecar, Upstream, Wallet, scratch_dir};
use serde_json::Value;

/// The policy most tests run: every kind of route, two networks, a facilitator.
pub fn policy(facilitator: &str) -> String {
    format!(
        r#"service "e2e" {{
  pay_to {pay_to}
  accept x402 on base-sepolia, base
  accept prepaid header "x-api-key"
  settle via facilitator "{facilitator}" after response
  default deny

  route GET "/free/**" {{ free }}
  route * "/echo/**" {{ free }}
  route * "/paid/**" {{
    price 0.01 USDC
    description "A paid thing"
    mime "application/json"
  }}
  route GET "/first/**" {{
    price 0.02 USDC
    settle before response
    description "Settled before the upstream sees it"
  }}
  route GET "/hybrid" {{ price 0.01 USDC or 2 credits }}
  route GET "/credits" {{ price 5 credits }}
  route GET "/vip/**" {{
    price 0.01 USDC
    allow payers 0x000000000000000000000000000000000000bEEF
  }}
  route GET "/impatient/**" {{
    price 0.01 USDC
    timeout 1s
  }}
  route * "/refundable/**" {{
    price 3 credits
    refund on 5xx
  }}
  route GET "/metered/**" {{ price 1 credit }}
  route GET "/limited/**" {{
    price 0.01 USDC or 1 credit
    limit buyer 2 requests per hour
    limit buyer 0.015 USDC per day
  }}
  route POST "/buy-credits" {{
    price 0.05 USDC
    sells 100 credits
    description "100 credits for the prepaid routes"
  }}
  route * "/internal/**" {{ deny }}
}}
"#,
        pay_to = harness::PAY_TO
    )
}

/// Upstream, facilitator and sidecar for one test.
pub struct World {
    pub upstream: Upstream,
    pub facilitator: Facilitator,
    pub sidecar: Sidecar,
    pub dir: PathBuf,
    pub http: reqwest::Client,
    pub wallet: Wallet,
}

impl World {
    pub async fn start(name: &str) -> World {
        let upstream = Upstream::start().await;
        let facilitator = Facilitator::start().await;
        World::start_with(name, upstream, facilitator, None).await
    }

    pub async fn start_with(
        name: &str,
        upstream: Upstream,
        facilitator: Facilitator,
        upstream_url: Option<String>,
    ) -> World {
        let url = upstream_url.unwrap_or_else(|| upstream.url());
        World::launch(name, upstream, facilitator, &url, Launch::default()).await
    }

    /// The e2e [`policy`] served by a sidecar started as `launch` says, in front of
    /// `upstream_url`.
    pub async fn launch(
        name: &str,
        upstream: Upstream,
        facilitator: Facilitator,
        upstream_url: &str,
        launch: Launch<'_>,
    ) -> World {
        World::launch_policy(name, upstream, facilitator, upstream_url, launch, policy).await
    }

    /// [`World::launch`] with a policy of the test's own, made from the facilitator's URL.
    pub async fn launch_policy(
        name: &str,
        upstream: Upstream,
        facilitator: Facilitator,
        upstream_url: &str,
        launch: Launch<'_>,
        policy: impl Fn(&str) -> String,
    ) -> World {
        let dir = scratch_dir(name);
        std::fs::write(dir.join("policy.toll"), policy(&facilitator.url())).unwrap();
        let sidecar = Sidecar::launch(&dir, upstream_url, launch).await;
        World {
            upstream,
            facilitator,
            sidecar,
            dir,
            http: harness::client(),
            wallet: Wallet::new(0x42),
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.sidecar.url(path))
    }

    /// Asks for `path` without paying; returns the 402's v2 `accepts` and v1 body.
    pub async fn challenge(&self, path: &str) -> (Value, Value) {
        let response = self.get(path).send().await.unwrap();
        assert_eq!(response.status(), 402, "{path}");
        let v2 = harness::decode(response.headers()["payment-required"].to_str().unwrap());
        let v1: Value = response.json().await.unwrap();
        (v2, v1)
    }

    /// A `PAYMENT-SIGNATURE` value for `path`'s first offer, signed as `tweak` says.
    pub async fn signed_v2(&self, path: &str, tweak: &harness::Tweak) -> String {
        let (v2, _) = self.challenge(path).await;
        self.wallet.pay_v2(&v2["accepts"][0], tweak)
    }

    /// GETs `path` with a `PAYMENT-SIGNATURE` header.
    pub async fn send_v2(&self, path: &str, header: &str) -> reqwest::Response {
        self.get(path)
            .header("payment-signature", header)
            .send()
            .await
            .unwrap()
    }

    /// Pays for `path` with a v2 payment built by `tweak`, returns the response.
    pub async fn pay_v2(&self, path: &str, tweak: &harness::Tweak) -> reqwest::Response {
        let header = self.signed_v2(path, tweak).await;
        self.send_v2(path, &header).await
    }

    pub async fn pay_v1(&self, path: &str, tweak: &harness::Tweak) -> reqwest::Response {
        let (_, v1) = self.challenge(path).await;
        let header = self.wallet.pay_v1(&v1["accepts"][0], tweak);
        self.get(path)
            .header("x-payment", header)
            .send()
            .await
            .unwrap()
    }
}

impl World {
    /// Calls the admin API with the sidecar's token.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method, self.sidecar.admin_url(path))
            .bearer_auth(self.sidecar.admin_token());
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// Opens an account holding `credits` and issues a key for it: (account id, key).
    pub async fn funded_key(&self, credits: u64) -> (u64, String) {
        let (status, created) = self
            .admin(
                "POST",
                "/v1/accounts",
                Some(serde_json::json!({"name": "acme"})),
            )
            .await;
        assert_eq!(status, 201, "{created:#}");
        let account = created["account"]["id"].as_u64().unwrap();
        let (status, issued) = self
            .admin(
                "POST",
                &format!("/v1/accounts/{account}/keys"),
                Some(serde_json::json!({})),
            )
            .await;
        assert_eq!(status, 201, "{issued:#}");
        if credits > 0 {
            let (status, body) = self
                .admin(
                    "POST",
                    &format!("/v1/accounts/{account}/topups"),
                    Some(serde_json::json!({"credits": credits, "reference": format!("seed-{account}")})),
                )
                .await;
            assert_eq!(status, 201, "{body:#}");
        }
        (account, issued["key"].as_str().unwrap().to_string())
    }

    /// The account's balance in credits.
    pub async fn balance(&self, account: u64) -> u128 {
        let (status, body) = self
            .admin("GET", &format!("/v1/accounts/{account}"), None)
            .await;
        assert_eq!(status, 200, "{body:#}");
        body["balance"].as_str().unwrap().parse().unwrap()
    }

    /// GETs `path` with an API key.
    pub async fn with_key(&self, path: &str, key: &str) -> reqwest::Response {
        self.get(path)
            .header("x-api-key", key)
            .send()
            .await
            .unwrap()
    }
}

/// Reads a JSON error body and checks its code.
pub async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    let got = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (got, body["error"].as_str()),
        (status, Some(code)),
        "{body:#}"
    );
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body:#}"
    );
    body
}
