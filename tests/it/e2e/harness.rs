//! What the end-to-end tests run against, all on loopback and ephemeral ports:
//! - [`Upstream`]: a real HTTP/1.1 server (hyper) that echoes what it received as JSON, answers
//!   `/status/NNN` anywhere in the path with that status, sleeps on `/slow/MS`, and counts
//!   the requests it saw.
//! - [`Facilitator`]: an x402 facilitator (`/verify`, `/settle`, `/supported`) that checks the
//!   EIP-712 signature itself with alloy, refuses a used nonce, and records what it settled.
//! - [`Sidecar`]: the real `tollgate` binary, started with a config and policy in a scratch
//!   directory, ready when `/readyz` says so, killed on drop.
//! - [`Wallet`]: a buyer that signs real EIP-3009 authorizations with a throwaway key.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolStruct, eip712_domain};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

// The buyer's and the facilitator's own EIP-3009 type, deliberately not tollgate's: a mistake in
// tollgate's definition must make these tests fail, not agree with it.
alloy::sol! {
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }
}

/// The pay-to address of the test policies (the captured vectors' payee).
pub const PAY_TO: &str = "0x710D094d04ac8B4eE234D26c53ba15A1Dce203d1";
pub const BASE_SEPOLIA_USDC: &str = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";

/// An HTTP client (reqwest is built without its own TLS provider; install ring first).
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A port nothing listens on (bound, then released), never the same twice in this process:
/// the kernel may hand a just-released port out again, and one sidecar needs three.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN
            .lock()
            .unwrap()
            .get_or_insert_with(HashSet::new)
            .insert(port)
        {
            return port;
        }
    }
}

pub fn scratch_dir(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tollgate-e2e-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

type Handler = Arc<dyn Fn(Request<Bytes>) -> Response<Full<Bytes>> + Send + Sync>;

/// Serves `handler` on an ephemeral loopback port until the runtime ends.
async fn serve(handler: Handler) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let path = parts.uri.path().to_string();
                        if let Some(ms) = segment_after(&path, "slow") {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let response = handler(Request::from_parts(parts, body));
                        // What the handler did is done; how its answer leaves is up to it.
                        match response.extensions().get::<Misbehave>().copied() {
                            None => {}
                            Some(Misbehave::Stall(wait)) => tokio::time::sleep(wait).await,
                            Some(Misbehave::HangUp) => return Err(HungUp),
                        }
                        Ok::<_, HungUp>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// How a handler's answer leaves (a response extension [`serve`] reads).
#[derive(Debug, Clone, Copy)]
enum Misbehave {
    /// Sent only after this long.
    Stall(Duration),
    /// Never sent: the connection is closed instead.
    HangUp,
}

/// The service error that makes hyper close the connection without an answer.
#[derive(Debug)]
struct HungUp;

impl std::fmt::Display for HungUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("hung up on purpose")
    }
}

impl std::error::Error for HungUp {}

fn segment_after(path: &str, name: &str) -> Option<u64> {
    let mut parts = path.split('/');
    parts.find(|p| *p == name)?;
    parts.next()?.parse().ok()
}

fn json_response(status: u16, value: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).unwrap())))
        .unwrap()
}

/// The upstream service the sidecar protects.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<AtomicUsize>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let addr = serve(Arc::new(move |req: Request<Bytes>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let path = req.uri().path().to_string();
            if path.starts_with("/echo") || path.contains("/echo/") {
                return Response::builder()
                    .status(200)
                    .header("content-type", "application/octet-stream")
                    .header("x-upstream-body-len", req.body().len().to_string())
                    .body(Full::new(req.body().clone()))
                    .unwrap();
            }
            let status = segment_after(&path, "status").map_or(200, |s| s as u16);
            let headers: serde_json::Map<String, Value> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        json!(v.to_str().unwrap_or("<binary>")),
                    )
                })
                .collect();
            json_response(
                status,
                &json!({
                    "method": req.method().as_str(),
                    "uri": req.uri().to_string(),
                    "headers": headers,
                    "body_len": req.body().len(),
                }),
            )
        }))
        .await;
        Upstream { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

/// How the test facilitator behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FacilitatorMode {
    Honest,
    /// Answers every `/settle` with `success: false` (`insufficient_funds`).
    Refuse,
    /// Answers every `/settle` with a 500.
    Broken,
    /// Answers `success: false`, `settlement_pending` with a transaction hash: what the
    /// official facilitator says when its transaction was sent but the receipt did not come.
    Pending,
    /// Answers 200 with a body that is not a settlement result.
    Garbage,
    /// Settles (the transfer happens and is recorded), then closes the connection without
    /// an answer.
    SettleThenHangUp,
    /// Settles, then answers only after [`STALL`]: longer than tollgate waits for `/settle`
    /// (x402-foundation/x402#1062, "wallet debited, no data").
    SettleThenStall,
}

/// How long [`FacilitatorMode::SettleThenStall`] holds its answer: past tollgate's
/// `SETTLE_TIMEOUT` (20 s).
pub const STALL: Duration = Duration::from_secs(25);

#[derive(Debug, Clone)]
pub struct Settled {
    pub x402_version: u64,
    pub payer: Address,
    pub nonce: B256,
    pub value: U256,
}

/// An x402 facilitator that really checks what it settles.
pub struct Facilitator {
    pub addr: SocketAddr,
    pub settled: Arc<Mutex<Vec<Settled>>>,
    pub mode: Arc<Mutex<FacilitatorMode>>,
    /// `/settle` calls received, whatever their answer.
    pub calls: Arc<AtomicUsize>,
}

impl Facilitator {
    pub async fn start() -> Facilitator {
        let settled = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(Mutex::new(FacilitatorMode::Honest));
        let used: Arc<Mutex<HashSet<(Address, B256)>>> = Arc::default();
        let (log, current) = (settled.clone(), mode.clone());
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let addr = serve(Arc::new(move |req: Request<Bytes>| {
            // The last segment names the endpoint, so a base URL such as `{url}/slow/2000`
            // (every call waits 2 s, see `serve`) works like the plain one.
            let path = format!("/{}", req.uri().path().rsplit('/').next().unwrap_or(""));
            if path == "/supported" {
                return json_response(
                    200,
                    &json!({"kinds": [
                        {"x402Version": 1, "scheme": "exact", "network": "base-sepolia"},
                        {"x402Version": 2, "scheme": "exact", "network": "eip155:84532"},
                        {"x402Version": 1, "scheme": "exact", "network": "base"},
                        {"x402Version": 2, "scheme": "exact", "network": "eip155:8453"}
                    ]}),
                );
            }
            let Ok(body) = serde_json::from_slice::<Value>(req.body()) else {
                return json_response(400, &json!({"error": "not json"}));
            };
            let checked = check_settlement(&body);
            match path.as_str() {
                "/verify" => match checked {
                    Ok(s) if !used.lock().unwrap().contains(&(s.payer, s.nonce)) => {
                        json_response(200, &json!({"isValid": true, "payer": s.payer.to_checksum(None)}))
                    }
                    Ok(_) => json_response(200, &json!({"isValid": false, "invalidReason": "nonce_already_used"})),
                    Err(reason) => json_response(200, &json!({"isValid": false, "invalidReason": reason})),
                },
                "/settle" => {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let network = network_of(&body);
                    match *current.lock().unwrap() {
                        FacilitatorMode::Broken => return json_response(500, &json!({"error": "boom"})),
                        FacilitatorMode::Garbage => {
                            return Response::builder()
                                .status(200)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(b"{\"success\": tru")))
                                .unwrap();
                        }
                        FacilitatorMode::Pending => {
                            return json_response(200, &json!({"success": false, "errorReason": "settlement_pending", "transaction": format!("0x{}", "ab".repeat(32)), "network": network}));
                        }
                        FacilitatorMode::Refuse => {
                            return json_response(200, &json!({"success": false, "errorReason": "insufficient_funds", "transaction": "", "network": network}));
                        }
                        FacilitatorMode::Honest
                        | FacilitatorMode::SettleThenHangUp
                        | FacilitatorMode::SettleThenStall => {}
                    }
                    let misbehave = match *current.lock().unwrap() {
                        FacilitatorMode::SettleThenHangUp => Some(Misbehave::HangUp),
                        FacilitatorMode::SettleThenStall => Some(Misbehave::Stall(STALL)),
                        _ => None,
                    };
                    match checked {
                        Ok(s) => {
                            if !used.lock().unwrap().insert((s.payer, s.nonce)) {
                                return json_response(200, &json!({"success": false, "errorReason": "nonce_already_used", "transaction": "", "network": network}));
                            }
                            let tx = keccak256(s.nonce);
                            let payer = s.payer.to_checksum(None);
                            log.lock().unwrap().push(s);
                            let mut response = json_response(200, &json!({"success": true, "transaction": tx.to_string(), "network": network, "payer": payer}));
                            if let Some(misbehave) = misbehave {
                                response.extensions_mut().insert(misbehave);
                            }
                            response
                        }
                        Err(reason) => json_response(200, &json!({"success": false, "errorReason": reason, "transaction": "", "network": network})),
                    }
                }
                _ => json_response(404, &json!({"error": "not found"})),
            }
        }))
        .await;
        Facilitator {
            addr,
            settled,
            mode,
            calls,
        }
    }

    /// How many `/settle` calls arrived.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn settled(&self) -> Vec<Settled> {
        self.settled.lock().unwrap().clone()
    }

    pub fn set_mode(&self, mode: FacilitatorMode) {
        *self.mode.lock().unwrap() = mode;
    }
}

fn network_of(body: &Value) -> String {
    body["paymentRequirements"]["network"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// The facilitator's own verification, independent of tollgate's code.
fn check_settlement(body: &Value) -> Result<Settled, &'static str> {
    let version = body["x402Version"].as_u64().ok_or("invalid_x402_version")?;
    let req = &body["paymentRequirements"];
    let auth = &body["paymentPayload"]["payload"]["authorization"];
    let chain_id: u64 = match req["network"].as_str().ok_or("invalid_network")? {
        "base-sepolia" => 84532,
        "base" => 8453,
        other => other
            .strip_prefix("eip155:")
            .and_then(|n| n.parse().ok())
            .ok_or("invalid_network")?,
    };
    let amount = req["amount"]
        .as_str()
        .or(req["maxAmountRequired"].as_str())
        .ok_or("invalid_payment_requirements")?;
    let addr = |v: &Value| {
        v.as_str()
            .and_then(|s| s.parse::<Address>().ok())
            .ok_or("invalid_payload")
    };
    let num = |v: &Value| {
        v.as_str()
            .and_then(|s| U256::from_str_radix(s, 10).ok())
            .ok_or("invalid_payload")
    };
    let message = TransferWithAuthorization {
        from: addr(&auth["from"])?,
        to: addr(&auth["to"])?,
        value: num(&auth["value"])?,
        validAfter: num(&auth["validAfter"])?,
        validBefore: num(&auth["validBefore"])?,
        nonce: auth["nonce"]
            .as_str()
            .and_then(|s| s.parse::<B256>().ok())
            .ok_or("invalid_payload")?,
    };
    // The token's own rule, on the facilitator's clock (which is not tollgate's).
    if message.validAfter >= U256::from(now()) {
        return Err("invalid_exact_evm_payload_authorization_valid_after");
    }
    if message.validBefore <= U256::from(now()) {
        return Err("invalid_exact_evm_payload_authorization_valid_before");
    }
    if message.to != addr(&req["payTo"])? {
        return Err("invalid_exact_evm_payload_recipient_mismatch");
    }
    if message.value
        != U256::from_str_radix(amount, 10).map_err(|_| "invalid_payment_requirements")?
    {
        return Err("invalid_exact_evm_payload_authorization_value");
    }
    let domain = eip712_domain! {
        name: req["extra"]["name"].as_str().unwrap_or("").to_string(),
        version: req["extra"]["version"].as_str().unwrap_or("").to_string(),
        chain_id: chain_id,
        verifying_contract: addr(&req["asset"])?,
    };
    let signature: alloy::primitives::Signature = body["paymentPayload"]["payload"]["signature"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or("invalid_exact_evm_payload_signature")?;
    let signer = signature
        .recover_address_from_prehash(&message.eip712_signing_hash(&domain))
        .map_err(|_| "invalid_exact_evm_payload_signature")?;
    if signer != message.from {
        return Err("invalid_exact_evm_payload_signature");
    }
    Ok(Settled {
        x402_version: version,
        payer: signer,
        nonce: message.nonce,
        value: message.value,
    })
}

/// A running `tollgate run`.
pub struct Sidecar {
    pub child: Child,
    pub port: u16,
    pub ops_port: u16,
    pub admin_port: u16,
    pub dir: PathBuf,
    /// Where this start's lines begin in `sidecar.log`.
    log_from: usize,
}

/// What tollgate says when a listener's port is held by another process (and what Pingora
/// logs when that happens between tollgate's check and its bind).
const PORT_TAKEN: [&str; 2] = ["another process listens there", "is in use, will try again"];

fn port_taken(log: &str) -> bool {
    PORT_TAKEN.iter().any(|m| log.contains(m))
}

/// How a test starts the sidecar, beyond its defaults.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// `log.level` (`debug` logs one line per request).
    pub level: &'a str,
    /// `log.format`: `text` or `json`.
    pub format: &'a str,
    /// More `tollgate.yaml`: top-level sections such as `connections:\n  max: 5\n`.
    pub yaml: &'a str,
    /// Environment variables for the process (`RUST_LOG` is otherwise removed).
    pub env: &'a [(&'a str, &'a str)],
    /// Run under this file-descriptor limit (`ulimit -n`, soft and hard).
    pub nofile: Option<u32>,
}

impl Default for Launch<'_> {
    fn default() -> Self {
        Launch {
            level: "info",
            format: "text",
            yaml: "",
            env: &[],
            nofile: None,
        }
    }
}

impl Sidecar {
    /// Starts the sidecar in `dir` (which holds `policy.toll`), proxying to `upstream`.
    pub async fn start(dir: &Path, upstream: &str) -> Sidecar {
        Sidecar::launch(dir, upstream, Launch::default()).await
    }

    /// [`Sidecar::start`] as `launch` says. The ports are free when picked, but another test
    /// may bind one before the sidecar does: then it starts again on new ones.
    pub async fn launch(dir: &Path, upstream: &str, launch: Launch<'_>) -> Sidecar {
        let mut attempt = 0;
        loop {
            let mut sidecar = Sidecar::spawn(dir, upstream, launch);
            match sidecar.wait_ready().await {
                Ok(()) => return sidecar,
                Err(why) if attempt < 3 && port_taken(&why) => {
                    sidecar.kill();
                    attempt += 1;
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    fn spawn(dir: &Path, upstream: &str, launch: Launch<'_>) -> Sidecar {
        let port = free_port();
        let ops_port = free_port();
        let admin_port = free_port();
        let Launch {
            level,
            format,
            yaml,
            env,
            nofile,
        } = launch;
        let config = format!(
            "listen: 127.0.0.1:{port}\nupstream: {upstream}\npublic_url: https://api.example.com\npolicies: [policy.toll]\nstore: data\nops:\n  listen: 127.0.0.1:{ops_port}\nadmin:\n  listen: 127.0.0.1:{admin_port}\nlog:\n  level: {level}\n  format: {format}\n{yaml}",
        );
        std::fs::write(dir.join("tollgate.yaml"), config).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("sidecar.log"))
            .unwrap();
        let log_from = usize::try_from(log.metadata().unwrap().len()).unwrap();
        let binary = env!("CARGO_BIN_EXE_tollgate");
        let mut command = match nofile {
            None => Command::new(binary),
            Some(n) => {
                let mut bash = Command::new("bash");
                bash.args([
                    "-c",
                    &format!("ulimit -n {n} && exec \"$0\" \"$@\""),
                    binary,
                ]);
                bash
            }
        };
        let child = command
            .args(["run", "--config", "tollgate.yaml"])
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .env_remove("TOLLGATE_CONFIG")
            .env_remove("TOLLGATE_LOG_LEVEL")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Sidecar {
            child,
            port,
            ops_port,
            admin_port,
            dir: dir.to_path_buf(),
            log_from,
        }
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = client();
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!(
                    "tollgate exited with {status} before it was ready:\n{}",
                    self.log()
                ));
            }
            // Pingora retries a port someone else holds; so do we, on other ports.
            // This start's lines only: the log is appended to across restarts in one folder.
            if self.log().get(self.log_from..).is_some_and(port_taken) {
                return Err(self.log());
            }
            // Ready, and every listener bound (services start on their own threads, so
            // the ops listener may answer before the proxy or admin one listens).
            if let Ok(r) = client.get(self.ops_url("/readyz")).send().await
                && r.status() == 200
                && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
                && tokio::net::TcpStream::connect(("127.0.0.1", self.admin_port))
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(format!(
            "tollgate was not ready within 20 s:\n{}",
            self.log()
        ))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// The admin token the sidecar generated in its store directory.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("data/admin.token")).unwrap()
    }

    pub fn ops_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ops_port)
    }

    /// `/metrics`, as text.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.ops_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sidecar.log")).unwrap_or_default()
    }

    /// SIGKILL: no destructor, no flush.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal by name (`TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tollgate did not exit within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A buyer with a throwaway key.
pub struct Wallet {
    pub signer: PrivateKeySigner,
}

/// How to bend an authorization for negative tests.
#[derive(Debug, Clone, Default)]
pub struct Tweak {
    pub to: Option<Address>,
    pub value: Option<U256>,
    pub valid_after: Option<u64>,
    pub valid_before: Option<u64>,
    pub nonce: Option<B256>,
    /// Sign under this EIP-712 domain name instead of the offered one.
    pub domain_name: Option<String>,
    /// Sign under this chain id instead of the offered one.
    pub chain_id: Option<u64>,
    /// Replace s by n - s (and flip v): same signer, non-canonical.
    pub high_s: bool,
    /// Sign with this other key but claim to be the wallet.
    pub impostor: bool,
    /// Send the recovery byte as `base + y_parity` instead of `27 + y_parity` (0, 35, 254…):
    /// the same signer to a lenient recovery, refused by USDC's `ecrecover`.
    pub v_base: Option<u8>,
}

impl Wallet {
    pub fn new(seed: u8) -> Wallet {
        Wallet {
            signer: PrivateKeySigner::from_bytes(&B256::repeat_byte(seed)).unwrap(),
        }
    }

    pub fn address(&self) -> Address {
        self.signer.address()
    }

    /// The `payload` object: a signed authorization for one `accepts` entry (v1 or v2 shape).
    pub fn authorize(&self, entry: &Value, tweak: &Tweak) -> Value {
        static NONCES: AtomicUsize = AtomicUsize::new(0);
        let now = now();
        let chain_id = match entry["network"].as_str().unwrap() {
            "base-sepolia" => 84532,
            "base" => 8453,
            other => other
                .strip_prefix("eip155:")
                .and_then(|n| n.parse().ok())
                .unwrap_or(1),
        };
        let amount = entry["amount"]
            .as_str()
            .or(entry["maxAmountRequired"].as_str())
            .unwrap();
        let nonce = tweak.nonce.unwrap_or_else(|| {
            keccak256(format!(
                "{}-{}-{:?}",
                std::process::id(),
                NONCES.fetch_add(1, Ordering::Relaxed),
                Instant::now()
            ))
        });
        let message = TransferWithAuthorization {
            from: self.address(),
            to: tweak
                .to
                .unwrap_or_else(|| entry["payTo"].as_str().unwrap().parse().unwrap()),
            value: tweak
                .value
                .unwrap_or_else(|| U256::from_str_radix(amount, 10).unwrap()),
            validAfter: U256::from(tweak.valid_after.unwrap_or(now - 600)),
            validBefore: U256::from(
                tweak
                    .valid_before
                    .unwrap_or(now + entry["maxTimeoutSeconds"].as_u64().unwrap()),
            ),
            nonce,
        };
        let domain = eip712_domain! {
            name: tweak.domain_name.clone().unwrap_or_else(|| entry["extra"]["name"].as_str().unwrap().to_string()),
            version: entry["extra"]["version"].as_str().unwrap().to_string(),
            chain_id: tweak.chain_id.unwrap_or(chain_id),
            verifying_contract: entry["asset"].as_str().unwrap().parse::<Address>().unwrap(),
        };
        let hash = message.eip712_signing_hash(&domain);
        let signer = if tweak.impostor {
            &Wallet::new(0x99).signer
        } else {
            &self.signer
        };
        let mut signature = signer.sign_hash_sync(&hash).unwrap().as_bytes();
        if tweak.high_s {
            let n = U256::from_str_radix(
                "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141",
                16,
            )
            .unwrap();
            let s = U256::from_be_slice(&signature[32..64]);
            signature[32..64].copy_from_slice(&(n - s).to_be_bytes::<32>());
            signature[64] = if signature[64] == 27 { 28 } else { 27 };
        }
        if let Some(base) = tweak.v_base {
            signature[64] = base.wrapping_add(signature[64] - 27);
        }
        json!({
            "signature": format!("0x{}", alloy::hex::encode(signature)),
            "authorization": {
                "from": self.address().to_checksum(None),
                "to": message.to.to_checksum(None),
                "value": message.value.to_string(),
                "validAfter": message.validAfter.to_string(),
                "validBefore": message.validBefore.to_string(),
                "nonce": nonce.to_string(),
            }
        })
    }

    /// A `PAYMENT-SIGNATURE` header value paying a v2 `accepts` entry.
    pub fn pay_v2(&self, accepted: &Value, tweak: &Tweak) -> String {
        encode(&json!({
            "x402Version": 2,
            "resource": {"url": "https://api.example.com/paid"},
            "accepted": accepted,
            "payload": self.authorize(accepted, tweak),
        }))
    }

    /// An `X-PAYMENT` header value paying a v1 `accepts` entry.
    pub fn pay_v1(&self, requirements: &Value, tweak: &Tweak) -> String {
        encode(&json!({
            "x402Version": 1,
            "scheme": "exact",
            "network": requirements["network"],
            "payload": self.authorize(requirements, tweak),
        }))
    }
}

/// Sends raw bytes on a fresh connection and returns everything the server answered.
pub async fn raw_request(port: u16, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

pub fn encode(value: &Value) -> String {
    STANDARD.encode(serde_json::to_vec(value).unwrap())
}

pub fn decode(header: &str) -> Value {
    serde_json::from_slice(&STANDARD.decode(header).unwrap()).unwrap()
}
