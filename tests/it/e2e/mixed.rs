//! Mixed load across every rail at once, for the crash cycles (`crash_cycles.rs`) and the soak
//! (`soak.rs`): one policy on the dev chain with a free route, a prepaid route, x402 `after
//! response` and `deferred` routes and a route selling credits, all settled on chain by
//! tollgate's own relayer (`settle via rpc`), and clients that call them and remember what
//! they were served.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::chain::DevChain;
use super::chain_relayer::{funding, launch, relayer_key};
use super::harness::{self, PAY_TO, Sidecar, Tweak, Upstream, Wallet};

/// Credits a sale grants.
pub const SOLD: u128 = 100;

/// The policy: every rail, settled on `node` by the relayer whose key goes to
/// `<dir>/relayer.key`. Deferred bundles close at 5 payments or after 1 s, so kills land on
/// bundles in flight.
pub fn policy(node: &str, dir: &Path) -> String {
    let key = relayer_key(dir);
    format!(
        r#"service "mixed" {{
  pay_to {PAY_TO}
  accept x402 on base-sepolia
  accept prepaid header "x-api-key"
  settle via rpc "{node}" relayer "{key}" after response
  default deny

  route GET "/free/**" {{ free }}
  route GET "/metered/**" {{ price 1 credit }}
  route GET "/after/**" {{ price 0.01 USDC }}
  route GET "/deferred/**" {{
    price 0.01 USDC
    settle deferred every 1s or 5 payments
  }}
  route POST "/buy-credits" {{
    price 0.05 USDC
    sells {SOLD} credits
  }}
}}
"#,
        key = key.display()
    )
}

/// What one call exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rail {
    Free,
    Prepaid,
    After,
    Deferred,
    /// A credit sale to the prepaid account's key.
    Sale,
    /// A credit sale without a key: a new account and key.
    SaleNewAccount,
}

impl Rail {
    /// The status a served call gets.
    pub fn served(self) -> u16 {
        match self {
            Rail::SaleNewAccount => 201,
            _ => 200,
        }
    }
}

/// A dev chain, an upstream, a sidecar in front of it and a funded buyer: one prepaid account
/// with a key, and the x402 terms of each paid route.
pub struct Mix {
    pub chain: DevChain,
    pub upstream: Upstream,
    pub dir: PathBuf,
    pub sidecar: Sidecar,
    pub client: Arc<Client>,
}

/// What a client needs to call every rail; the sidecar's address changes with each start.
pub struct Client {
    pub http: reqwest::Client,
    pub buyer: Wallet,
    pub account: u64,
    pub key: String,
    after: Value,
    deferred: Value,
    sale: Value,
    next: AtomicU64,
    /// Every credit sale sent (served or not), by its nonce: with or without the key.
    pub sales_sent: Mutex<std::collections::HashMap<String, Rail>>,
}

impl Mix {
    /// Starts it all; the account holds `credits`.
    pub async fn start(name: &str, credits: u128) -> Mix {
        let buyer = Wallet::new(0x5c);
        let chain = DevChain::start_with(&funding(&[&buyer], 1_000_000_000_000)).await;
        let upstream = Upstream::start().await;
        let dir = harness::scratch_dir(name);
        std::fs::write(dir.join("policy.toll"), policy(&chain.rpc_url(), &dir)).unwrap();
        let sidecar = launch(&dir, &upstream, "").await;
        let http = harness::client();
        let admin = |method: reqwest::Method, path: String, body: Value| {
            let request = http
                .request(method, sidecar.admin_url(&path))
                .bearer_auth(sidecar.admin_token())
                .json(&body);
            async move {
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap();
                assert_eq!(status, 201, "{path}: {body:#}");
                body
            }
        };
        let created = admin(
            reqwest::Method::POST,
            "/v1/accounts".into(),
            serde_json::json!({"name": "mixed"}),
        )
        .await;
        let account = created["account"]["id"].as_u64().unwrap();
        let issued = admin(
            reqwest::Method::POST,
            format!("/v1/accounts/{account}/keys"),
            serde_json::json!({}),
        )
        .await;
        admin(
            reqwest::Method::POST,
            format!("/v1/accounts/{account}/topups"),
            serde_json::json!({"credits": credits.to_string(), "reference": "seed"}),
        )
        .await;
        let terms = |method: reqwest::Method, path: &str| {
            let request = http.request(method, sidecar.url(path));
            async move {
                let response = request.send().await.unwrap();
                assert_eq!(response.status(), 402);
                let v2 = harness::decode(response.headers()["payment-required"].to_str().unwrap());
                v2["accepts"][0].clone()
            }
        };
        let after = terms(reqwest::Method::GET, "/after/terms").await;
        let deferred = terms(reqwest::Method::GET, "/deferred/terms").await;
        let sale = terms(reqwest::Method::POST, "/buy-credits").await;
        let client = Arc::new(Client {
            http: http.clone(),
            buyer,
            account,
            key: issued["key"].as_str().unwrap().to_string(),
            after,
            deferred,
            sale,
            next: AtomicU64::new(0),
            sales_sent: Mutex::default(),
        });
        Mix {
            chain,
            upstream,
            dir,
            sidecar,
            client,
        }
    }

    /// Starts the sidecar again on the same store (after [`Sidecar::kill`]).
    pub async fn restart(&mut self) {
        self.sidecar = launch(&self.dir, &self.upstream, "").await;
    }
}

/// A call the sidecar served: what it was, and what it paid with.
#[derive(Debug, Clone)]
pub struct Served {
    pub rail: Rail,
    pub path: String,
    /// The `x-request-id` sent (a prepaid debit names it).
    pub request_id: String,
    /// The `PAYMENT-SIGNATURE` sent, and its authorization's nonce (lowercase hex).
    pub payment: Option<(String, String)>,
    /// A sale: the account credited and the top-up's reference.
    pub sale: Option<(u64, String)>,
}

/// How one call ended.
#[derive(Debug)]
pub enum Answer {
    Served(Served),
    /// Any other status: never expected while the sidecar runs.
    Unexpected {
        rail: Rail,
        status: u16,
        body: String,
    },
    /// No answer (the sidecar was killed, or the connection failed).
    Lost(String),
}

impl Client {
    /// One call of `rail` to the sidecar listening at `base` (`http://127.0.0.1:PORT`).
    pub async fn call(&self, base: &str, rail: Rail) -> Answer {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let request_id = format!("mix-{}-{n}", std::process::id());
        let (method, path) = match rail {
            Rail::Free => (reqwest::Method::GET, format!("/free/{n}")),
            Rail::Prepaid => (reqwest::Method::GET, format!("/metered/{n}")),
            Rail::After => (reqwest::Method::GET, format!("/after/{n}")),
            Rail::Deferred => (reqwest::Method::GET, format!("/deferred/{n}")),
            Rail::Sale | Rail::SaleNewAccount => {
                (reqwest::Method::POST, "/buy-credits".to_string())
            }
        };
        let terms = match rail {
            Rail::After => Some(&self.after),
            Rail::Deferred => Some(&self.deferred),
            Rail::Sale | Rail::SaleNewAccount => Some(&self.sale),
            Rail::Free | Rail::Prepaid => None,
        };
        let payment = terms.map(|terms| {
            let header = self.buyer.pay_v2(terms, &Tweak::default());
            let nonce = harness::decode(&header)["payload"]["authorization"]["nonce"]
                .as_str()
                .unwrap()
                .to_lowercase();
            (header, nonce)
        });
        if let (Rail::Sale | Rail::SaleNewAccount, Some((_, nonce))) = (rail, &payment) {
            self.sales_sent.lock().unwrap().insert(nonce.clone(), rail);
        }
        let mut request = self
            .http
            .request(method, format!("{base}{path}"))
            .header("x-request-id", &request_id)
            .timeout(Duration::from_secs(60));
        if matches!(rail, Rail::Prepaid | Rail::Sale) {
            request = request.header("x-api-key", &self.key);
        }
        if let Some((header, _)) = &payment {
            request = request.header("payment-signature", header);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Answer::Lost(e.to_string()),
        };
        let status = response.status().as_u16();
        let body = match response.bytes().await {
            Ok(body) => body,
            // The head came, the body did not: the buyer cannot count on it.
            Err(e) => return Answer::Lost(format!("{status}, then {e}")),
        };
        if status != rail.served() {
            return Answer::Unexpected {
                rail,
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            };
        }
        let sale = matches!(rail, Rail::Sale | Rail::SaleNewAccount).then(|| {
            let sold: Value = serde_json::from_slice(&body).unwrap();
            (
                sold["account"].as_u64().unwrap(),
                sold["reference"].as_str().unwrap().to_string(),
            )
        });
        Answer::Served(Served {
            rail,
            path,
            request_id,
            payment,
            sale,
        })
    }

    /// Sends a served payment again: it must be refused as used (`payment_replayed`), or,
    /// with `expired_ok`, as expired (`authorization_expired` is checked before the nonce).
    pub async fn replay(
        &self,
        base: &str,
        served: &Served,
        expired_ok: bool,
    ) -> Result<(), String> {
        let Some((header, nonce)) = &served.payment else {
            return Ok(());
        };
        let method = match served.rail {
            Rail::Sale | Rail::SaleNewAccount => reqwest::Method::POST,
            _ => reqwest::Method::GET,
        };
        let mut request = self
            .http
            .request(method, format!("{base}{}", served.path))
            .header("payment-signature", header)
            .timeout(Duration::from_secs(60));
        if served.rail == Rail::Sale {
            request = request.header("x-api-key", &self.key);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = body["error"].as_str();
        if status == 402
            && (code == Some("payment_replayed")
                || (expired_ok && code == Some("authorization_expired")))
        {
            Ok(())
        } else {
            Err(format!(
                "{:?} {} nonce {nonce}: a replay got {status} {body}",
                served.rail, served.path
            ))
        }
    }
}

/// What clients saw, shared between them.
#[derive(Debug, Default)]
pub struct Seen {
    pub served: Vec<Served>,
    pub unexpected: Vec<String>,
    /// Calls that got no answer.
    pub lost: Vec<String>,
    /// Calls sent per rail (served or not), for the upstream's count.
    pub sent: std::collections::BTreeMap<Rail, u64>,
    /// Latencies of served calls (soak).
    pub latencies: Vec<Duration>,
}

impl Seen {
    pub fn note(&mut self, rail: Rail, answer: Answer, took: Duration) -> bool {
        *self.sent.entry(rail).or_default() += 1;
        match answer {
            Answer::Served(served) => {
                self.served.push(served);
                self.latencies.push(took);
                true
            }
            Answer::Unexpected { rail, status, body } => {
                self.unexpected.push(format!("{rail:?}: {status} {body}"));
                false
            }
            Answer::Lost(why) => {
                self.lost.push(format!("{rail:?}: {why}"));
                false
            }
        }
    }
}

/// A client calling `rail` back to back until a call is not served or `until` passes.
pub async fn hammer(
    client: Arc<Client>,
    base: String,
    rail: Rail,
    seen: Arc<Mutex<Seen>>,
    until: Option<Instant>,
) {
    loop {
        if until.is_some_and(|t| Instant::now() >= t) {
            return;
        }
        let started = Instant::now();
        let answer = client.call(&base, rail).await;
        if !seen.lock().unwrap().note(rail, answer, started.elapsed()) {
            return;
        }
    }
}

/// Starts [`CLIENTS`], each calling its rail back to back ([`hammer`]).
pub fn hammer_all(
    client: &Arc<Client>,
    base: &str,
    seen: &Arc<Mutex<Seen>>,
    until: Option<Instant>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut clients = Vec::new();
    for (rail, n) in CLIENTS {
        for _ in 0..n {
            clients.push(tokio::spawn(hammer(
                client.clone(),
                base.to_string(),
                rail,
                seen.clone(),
                until,
            )));
        }
    }
    clients
}

/// The clients of one mixed load: how many of each rail.
pub const CLIENTS: [(Rail, usize); 6] = [
    (Rail::Free, 1),
    (Rail::Prepaid, 2),
    (Rail::After, 2),
    (Rail::Deferred, 2),
    (Rail::Sale, 1),
    (Rail::SaleNewAccount, 1),
];
