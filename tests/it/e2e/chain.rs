//! A real EVM dev chain and the official x402 facilitator, for tests that settle for real.
//!
//! [`DevChain`] runs, all on loopback and ephemeral ports:
//! - **anvil** 1.7.1 (Foundry's dev node, from npm `@foundry-rs/anvil`) with chain id 84532;
//! - at the real Base Sepolia USDC address, the runtime code of `tests/chain/EIP3009Token.sol`
//!   (ERC-20 + EIP-3009 with FiatToken v2.2's checks, EIP-712 domain "USDC" / "2"), installed with
//!   `anvil_setCode`; so tollgate's built-in `base-sepolia` network and the facilitator's own
//!   registry work unchanged. At Multicall3's canonical address, `tests/chain/Multicall3.sol`
//!   (the facilitator explains a failed simulation through it, as on Base Sepolia);
//! - `tests/chain/facilitator.mjs`: the official facilitator (`@x402/core` + `@x402/evm` 2.27,
//!   "exact" on `eip155:84532` and v1 `base-sepolia`) over HTTP, paying gas with anvil's
//!   account 0.
//!
//! The Node packages are pinned in `tests/chain/package-lock.json`; `npm ci` runs there once when
//! `node_modules` is missing (`.ci/run` installs them up front).
//!
//! **Clock.** anvil mines each transaction as it arrives (automine, no `--block-time`; a
//! transaction arriving while a block is being mined goes into the next block with others), and
//! stamps a block with the wall clock, never less than its parent's timestamp: blocks mined in
//! the same second share it (measured with anvil 1.7.1: 61 transactions in one second, 61 blocks,
//! all within that second). Unlike hardhat's automine, which forces one second per block, the
//! chain's clock does not run ahead of real time however many settles a test makes, so
//! authorizations valid in wall-clock time (`validAfter < now < validBefore`) stay valid on
//! chain. `--block-time` would only make each settle wait for the next block.
//!
//! **Processes.** Both are killed when the [`DevChain`] drops (a panicking test unwinds through
//! it). Neither outlives the test process even when it dies without unwinding: anvil runs under
//! a `sh` watchdog that kills it when its standard input (a pipe from this process) closes, and
//! the facilitator exits when its own standard input closes (`--exit-with-stdin`). anvil keeps
//! past states in memory only (`--prune-history 256`): by default it writes them to
//! `~/.foundry/anvil/tmp` and leaves them there when killed (65 GB after a day of test runs).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256, address};
use alloy::sol_types::{SolCall, SolEvent, eip712_domain};
use serde_json::{Value, json};

use super::harness::{self, BASE_SEPOLIA_USDC, PAY_TO, Tweak, Wallet, free_port, scratch_dir};

alloy::sol! {
    #[derive(Debug)]
    interface IEip3009Token {
        function balanceOf(address owner) external view returns (uint256);
        function mint(address to, uint256 value) external;
        function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);
        function DOMAIN_SEPARATOR() external view returns (bytes32);
        function name() external view returns (string);
        function version() external view returns (string);
        function decimals() external view returns (uint8);
        function transferWithAuthorization(
            address from,
            address to,
            uint256 value,
            uint256 validAfter,
            uint256 validBefore,
            bytes32 nonce,
            uint8 v,
            bytes32 r,
            bytes32 s
        ) external;
        event Transfer(address indexed from, address indexed to, uint256 value);
        function cancelAuthorization(address authorizer, bytes32 nonce, uint8 v, bytes32 r, bytes32 s) external;
        event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
    }

    /// EIP-3009's cancellation, signed by the authorizer.
    struct CancelAuthorization {
        address authorizer;
        bytes32 nonce;
    }
}

/// The chain id of Base Sepolia, which the dev chain takes.
pub const CHAIN_ID: u64 = 84532;
/// anvil's default account 0 (its well-known test key): the facilitator's gas account.
pub const FACILITATOR_KEY: &str =
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
pub const FACILITATOR_ADDRESS: Address = address!("f39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
/// anvil's default account 2: the relayer of `settle via rpc` tests (10,000 ETH of gas).
pub const RELAYER_KEY: &str = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a";
pub const RELAYER_ADDRESS: Address = address!("3C44CdDdB6a900fa2b585dd299e03d12FA4293BC");
/// anvil's default account 1 (unlocked in anvil): sends the test faucet's `mint` transactions,
/// never the facilitator's account, so the two never race for a nonce.
const FAUCET: Address = address!("70997970C51812dc3A010C7d01b50e0d17dc79C8");
/// Multicall3's address on every chain that has it (Base Sepolia does).
const MULTICALL3: Address = address!("cA11bde05977b3631167028862bE2a173976CA11");

const TOKEN_ARTIFACT: &str = include_str!("../../chain/EIP3009Token.json");
const MULTICALL_ARTIFACT: &str = include_str!("../../chain/Multicall3.json");

/// Runs `"$@"` (anvil) in the background, prints its pid, kills it when standard input closes,
/// and exits when it exits (so an anvil that could not bind its port is seen at once).
const WATCHDOG: &str = r#"exec 3<&0
"$@" 3<&- </dev/null >&2 &
pid=$!
echo "$pid"
( read -r _ <&3; kill "$pid" 2>/dev/null ) &
exec 3<&-
wait "$pid""#;

/// `tests/chain`, with its pinned Node packages installed (once; a file lock keeps parallel
/// tests and concurrent test runs from installing over each other).
pub fn chain_dir() -> PathBuf {
    static READY: OnceLock<PathBuf> = OnceLock::new();
    READY
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/chain");
            let installed = |dir: &PathBuf| {
                anvil_binary(dir).is_file()
                    && dir.join("node_modules/.package-lock.json").is_file()
                    && dir.join("node_modules/@x402/evm/package.json").is_file()
            };
            if !installed(&dir) {
                let lock = std::fs::File::open(dir.join("package-lock.json")).unwrap();
                lock.lock().unwrap();
                if !installed(&dir) {
                    let status = Command::new("npm")
                        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                        .current_dir(&dir)
                        .status()
                        .expect("npm is needed for the dev-chain tests (Node 20)");
                    assert!(status.success(), "npm ci in tests/chain failed");
                }
                lock.unlock().unwrap();
            }
            dir
        })
        .clone()
}

fn anvil_binary(dir: &std::path::Path) -> PathBuf {
    dir.join("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
}

fn runtime_code(artifact: &str) -> String {
    let artifact: Value = serde_json::from_str(artifact).unwrap();
    artifact["deployedBytecode"].as_str().unwrap().to_string()
}

/// A child process killed and reaped on drop.
struct Proc {
    child: Child,
    /// The pipe whose closing tells the process (or its watchdog) to stop.
    stdin: Option<ChildStdin>,
    /// anvil's own pid, behind the watchdog.
    inner_pid: Option<u32>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(pid) = self.inner_pid {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `child`'s first stdout line, for at most `within`.
async fn first_line(child: &mut Child, within: Duration) -> Option<String> {
    let stdout = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    tokio::task::spawn_blocking(move || rx.recv_timeout(within).ok())
        .await
        .unwrap()
        .filter(|l| !l.is_empty())
}

/// anvil + the EIP-3009 USDC at the Base Sepolia address + the official x402 facilitator.
pub struct DevChain {
    // Dropped in this order: the facilitator first, then the chain it talks to.
    _facilitator: Proc,
    anvil: std::sync::Mutex<Option<Proc>>,
    /// `--block-time`, and the state file of a chain that can be restarted.
    block_time: Option<u64>,
    state: Option<PathBuf>,
    rpc_port: u16,
    facilitator_port: u16,
    pub dir: PathBuf,
    http: reqwest::Client,
    ids: AtomicU64,
}

impl DevChain {
    /// A fresh chain: no USDC anywhere yet.
    pub async fn start() -> DevChain {
        DevChain::start_with(&[]).await
    }

    /// A fresh chain where each `(address, atomic units)` holds that much USDC.
    pub async fn start_with(funded: &[(Address, u128)]) -> DevChain {
        DevChain::start_opts(funded, None).await
    }

    /// As [`DevChain::start_with`]; with `block_time`, anvil mines a block every that many
    /// seconds instead of one per transaction (slow confirmations).
    pub async fn start_opts(funded: &[(Address, u128)], block_time: Option<u64>) -> DevChain {
        DevChain::launch(funded, block_time, false).await
    }

    /// As [`DevChain::start_opts`], keeping its state in a file so that
    /// [`DevChain::restart_node`] can stop anvil and start it again where it was.
    pub async fn start_restartable(
        funded: &[(Address, u128)],
        block_time: Option<u64>,
    ) -> DevChain {
        DevChain::launch(funded, block_time, true).await
    }

    async fn launch(
        funded: &[(Address, u128)],
        block_time: Option<u64>,
        restartable: bool,
    ) -> DevChain {
        let dir = scratch_dir("chain");
        let chain = chain_dir();
        let http = harness::client();
        let state = restartable.then(|| dir.join("anvil-state.json"));
        let (anvil, rpc_port) =
            start_anvil(&chain, &dir, &http, block_time, None, state.as_deref()).await;
        let (facilitator, facilitator_port) = start_facilitator(&chain, &dir, rpc_port).await;
        let dev = DevChain {
            _facilitator: facilitator,
            anvil: std::sync::Mutex::new(Some(anvil)),
            block_time,
            state,
            rpc_port,
            facilitator_port,
            dir,
            http,
            ids: AtomicU64::new(1),
        };
        dev.rpc(
            "anvil_setCode",
            json!([BASE_SEPOLIA_USDC, runtime_code(TOKEN_ARTIFACT)]),
        )
        .await;
        dev.rpc(
            "anvil_setCode",
            json!([MULTICALL3, runtime_code(MULTICALL_ARTIFACT)]),
        )
        .await;
        for &(to, atomic) in funded {
            dev.mint(to, atomic).await;
        }
        dev
    }

    pub fn rpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rpc_port)
    }

    pub fn facilitator_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.facilitator_port)
    }

    /// The token's address: Base Sepolia's USDC.
    pub fn token(&self) -> Address {
        BASE_SEPOLIA_USDC.parse().unwrap()
    }

    /// The facilitator's log (one line per request, with its reason when it refuses).
    pub fn facilitator_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("facilitator.log")).unwrap_or_default()
    }

    /// One JSON-RPC call; panics on a JSON-RPC error.
    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        match self.try_rpc(method, params).await {
            Ok(result) => result,
            Err(error) => panic!("{method}: {error:#}"),
        }
    }

    /// One JSON-RPC call: its `result`, or its `error` object.
    pub async fn try_rpc(&self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let response: Value = self
            .http
            .post(self.rpc_url())
            .json(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match response.get("error") {
            Some(error) => Err(error.clone()),
            None => Ok(response["result"].clone()),
        }
    }

    /// `eth_call` of the token: the decoded return, or the JSON-RPC error (a revert).
    pub async fn try_call<C: SolCall>(&self, call: &C) -> Result<C::Return, Value> {
        let data = format!("0x{}", alloy::hex::encode(call.abi_encode()));
        let result = self
            .try_rpc(
                "eth_call",
                json!([{"to": BASE_SEPOLIA_USDC, "data": data}, "latest"]),
            )
            .await?;
        let bytes = alloy::hex::decode(result.as_str().unwrap()).unwrap();
        Ok(C::abi_decode_returns(&bytes).unwrap())
    }

    pub async fn call<C: SolCall>(&self, call: &C) -> C::Return {
        match self.try_call(call).await {
            Ok(value) => value,
            Err(error) => panic!("eth_call {}: {error:#}", C::SIGNATURE),
        }
    }

    /// Mints `atomic` units of USDC to `to` (a mined transaction, `Transfer` from 0x0).
    pub async fn mint(&self, to: Address, atomic: u128) {
        let data = IEip3009Token::mintCall {
            to,
            value: U256::from(atomic),
        }
        .abi_encode();
        let tx = self
            .rpc(
                "eth_sendTransaction",
                json!([{
                    "from": FAUCET,
                    "to": BASE_SEPOLIA_USDC,
                    "data": format!("0x{}", alloy::hex::encode(data)),
                }]),
            )
            .await;
        let receipt = self.receipt(&tx).await;
        assert_eq!(receipt["status"], "0x1", "mint: {receipt:#}");
    }

    /// A transaction's receipt, once mined: automine mines a transaction right after
    /// `eth_sendTransaction` answers, not before (a receipt asked at once may be null).
    pub async fn receipt(&self, tx: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let receipt = self.rpc("eth_getTransactionReceipt", json!([tx])).await;
            if !receipt.is_null() {
                return receipt;
            }
            assert!(Instant::now() < deadline, "{tx} was not mined");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn balance_of(&self, owner: Address) -> u128 {
        self.call(&IEip3009Token::balanceOfCall { owner })
            .await
            .to()
    }

    pub async fn authorization_state(&self, authorizer: Address, nonce: B256) -> bool {
        self.call(&IEip3009Token::authorizationStateCall { authorizer, nonce })
            .await
    }

    /// The token's `Transfer` events to `to`: (from, value, transaction, block), oldest first.
    pub async fn transfers_to(&self, to: Address) -> Vec<(Address, u128, B256, u64)> {
        self.logs(IEip3009Token::Transfer::SIGNATURE_HASH, None, Some(to))
            .await
            .iter()
            .map(|log| {
                let data = alloy::hex::decode(log["data"].as_str().unwrap()).unwrap();
                (
                    topic_address(&log["topics"][1]),
                    U256::from_be_slice(&data).to(),
                    b256(&log["transactionHash"]),
                    quantity(&log["blockNumber"]),
                )
            })
            .collect()
    }

    /// The token's `AuthorizationUsed` events of `authorizer`: (nonce, transaction, block).
    pub async fn authorizations_used(&self, authorizer: Address) -> Vec<(B256, B256, u64)> {
        self.logs(
            IEip3009Token::AuthorizationUsed::SIGNATURE_HASH,
            Some(authorizer),
            None,
        )
        .await
        .iter()
        .map(|log| {
            (
                b256(&log["topics"][2]),
                b256(&log["transactionHash"]),
                quantity(&log["blockNumber"]),
            )
        })
        .collect()
    }

    /// The latest block's timestamp (seconds).
    pub async fn block_timestamp(&self) -> u64 {
        let block = self
            .rpc("eth_getBlockByNumber", json!(["latest", false]))
            .await;
        quantity(&block["timestamp"])
    }

    /// `evm_snapshot`: the chain's state now, to go back to with [`DevChain::revert`].
    pub async fn snapshot(&self) -> Value {
        self.rpc("evm_snapshot", json!([])).await
    }

    /// `evm_revert`: every block after the snapshot leaves the chain (a reorganisation, as a
    /// node that follows the chain sees it); their transactions are gone, not pending.
    pub async fn revert(&self, snapshot: &Value) {
        assert_eq!(self.rpc("evm_revert", json!([snapshot])).await, true);
    }

    /// The relayer's transactions so far (its nonce at the latest block).
    pub async fn relayer_nonce(&self) -> u64 {
        quantity(
            &self
                .rpc(
                    "eth_getTransactionCount",
                    json!([RELAYER_ADDRESS, "latest"]),
                )
                .await,
        )
    }

    pub async fn block_number(&self) -> u64 {
        quantity(&self.rpc("eth_blockNumber", json!([])).await)
    }

    /// The token's logs with `topic0`, filtered on the first and second indexed addresses.
    async fn logs(
        &self,
        topic0: B256,
        first: Option<Address>,
        second: Option<Address>,
    ) -> Vec<Value> {
        let topic = |a: Option<Address>| a.map(|a| B256::left_padding_from(a.as_slice()));
        let logs = self
            .rpc(
                "eth_getLogs",
                json!([{
                    "fromBlock": "0x0",
                    "toBlock": "latest",
                    "address": BASE_SEPOLIA_USDC,
                    "topics": [topic0, topic(first), topic(second)],
                }]),
            )
            .await;
        logs.as_array().unwrap().clone()
    }
}

fn quantity(value: &Value) -> u64 {
    u64::from_str_radix(value.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

fn b256(value: &Value) -> B256 {
    value.as_str().unwrap().parse().unwrap()
}

fn topic_address(value: &Value) -> Address {
    Address::from_word(b256(value))
}

/// anvil on a free port, answering JSON-RPC (started again on another port if one was taken).
async fn start_anvil(
    chain: &std::path::Path,
    dir: &std::path::Path,
    http: &reqwest::Client,
    block_time: Option<u64>,
    port: Option<u16>,
    state: Option<&std::path::Path>,
) -> (Proc, u16) {
    let binary = anvil_binary(chain);
    for _ in 0..3 {
        let port = port.unwrap_or_else(free_port);
        let log = std::fs::File::create(dir.join("anvil.log")).unwrap();
        let mut child = Command::new("sh")
            .args(["-c", WATCHDOG, "sh"])
            .arg(&binary)
            .args([
                "--chain-id",
                &CHAIN_ID.to_string(),
                "--port",
                &port.to_string(),
            ])
            // Historical states in memory only (the last 256 blocks): without this anvil writes
            // every older block's state to ~/.foundry/anvil/tmp and never removes it when
            // killed — gigabytes per minute under the soak's load.
            .args(["--host", "127.0.0.1", "--silent", "--prune-history", "256"])
            .args(
                block_time
                    .map(|secs| vec!["--block-time".to_string(), secs.to_string()])
                    .unwrap_or_default(),
            )
            .args(
                state
                    .map(|path| vec!["--state".to_string(), path.display().to_string()])
                    .unwrap_or_default(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("sh runs");
        let stdin = child.stdin.take();
        let inner_pid = first_line(&mut child, Duration::from_secs(5))
            .await
            .and_then(|l| l.trim().parse().ok());
        let mut anvil = Proc {
            child,
            stdin,
            inner_pid,
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let answer = http
                .post(&url)
                .json(&json!({"jsonrpc": "2.0", "id": 0, "method": "eth_chainId", "params": []}))
                .send()
                .await;
            if let Ok(answer) = answer {
                let body: Value = answer.json().await.unwrap_or_default();
                assert_eq!(body["result"], format!("{CHAIN_ID:#x}"), "{body}");
                return (anvil, port);
            }
            if matches!(anvil.child.try_wait(), Ok(Some(_))) {
                break; // exited: most likely the port was taken meanwhile
            }
            assert!(
                Instant::now() < deadline,
                "anvil did not answer on {url}: {}",
                std::fs::read_to_string(dir.join("anvil.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!(
        "anvil did not start: {}",
        std::fs::read_to_string(dir.join("anvil.log")).unwrap_or_default()
    );
}

/// `facilitator.mjs` on an ephemeral port it picks itself, ready when it says `listening`.
async fn start_facilitator(
    chain: &std::path::Path,
    dir: &std::path::Path,
    rpc_port: u16,
) -> (Proc, u16) {
    let log = std::fs::File::create(dir.join("facilitator.log")).unwrap();
    let mut child = Command::new("node")
        .arg(chain.join("facilitator.mjs"))
        .arg(format!("http://127.0.0.1:{rpc_port}"))
        .args(["0", "--exit-with-stdin"])
        .env("FACILITATOR_PRIVATE_KEY", FACILITATOR_KEY)
        .current_dir(chain)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("node is needed for the dev-chain tests (Node 20)");
    let stdin = child.stdin.take();
    let line = first_line(&mut child, Duration::from_secs(30)).await;
    let facilitator = Proc {
        child,
        stdin,
        inner_pid: None,
    };
    let port = line
        .as_deref()
        .and_then(|l| l.trim().strip_prefix("listening "))
        .and_then(|p| p.parse().ok());
    match port {
        Some(port) => (facilitator, port),
        None => panic!(
            "facilitator.mjs did not start ({line:?}): {}",
            std::fs::read_to_string(dir.join("facilitator.log")).unwrap_or_default()
        ),
    }
}

// ---- Tests: the infrastructure is real ----

/// A v2 `accepts` entry for `amount` on Base Sepolia (USDC at its real address).
fn requirements_v2(amount: u128) -> Value {
    json!({
        "scheme": "exact",
        "network": "eip155:84532",
        "amount": amount.to_string(),
        "asset": BASE_SEPOLIA_USDC,
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USDC", "version": "2"},
    })
}

/// A facilitator request body paying `requirements` (v2), and the authorization's nonce.
fn request_v2(wallet: &Wallet, requirements: &Value, tweak: &Tweak) -> (Value, B256) {
    let payload = wallet.authorize(requirements, tweak);
    let nonce = b256(&payload["authorization"]["nonce"]);
    let body = json!({
        "x402Version": 2,
        "paymentPayload": {
            "x402Version": 2,
            "resource": {"url": "https://api.example.com/paid"},
            "accepted": requirements,
            "payload": payload,
        },
        "paymentRequirements": requirements,
    });
    (body, nonce)
}

async fn post(chain: &DevChain, path: &str, body: &Value) -> Value {
    let response = chain
        .http
        .post(format!("{}{path}", chain.facilitator_url()))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "{path}: {}",
        chain.facilitator_log()
    );
    response.json().await.unwrap()
}

fn pay_to() -> Address {
    PAY_TO.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_facilitator_settles_an_authorization_on_chain_once() {
    let buyer = Wallet::new(0x51);
    let chain = DevChain::start_with(&[(buyer.address(), 1_000_000)]).await;
    assert_eq!(chain.balance_of(pay_to()).await, 0);
    let requirements = requirements_v2(10_000);
    let (body, nonce) = request_v2(&buyer, &requirements, &Tweak::default());

    let verified = post(&chain, "/verify", &body).await;
    assert_eq!(verified["isValid"], true, "{verified:#}");

    let before = chain.block_number().await;
    let settled = post(&chain, "/settle", &body).await;
    assert_eq!(
        settled["success"],
        true,
        "{settled:#}\n{}",
        chain.facilitator_log()
    );
    assert_eq!(settled["network"], "eip155:84532");
    assert_eq!(settled["payer"], buyer.address().to_checksum(None));
    let tx = b256(&settled["transaction"]);

    // The chain moved exactly the amount, in the transaction the facilitator reported.
    assert_eq!(chain.balance_of(buyer.address()).await, 990_000);
    assert_eq!(chain.balance_of(pay_to()).await, 10_000);
    assert!(chain.authorization_state(buyer.address(), nonce).await);
    let used = chain.authorizations_used(buyer.address()).await;
    assert_eq!(used.len(), 1, "{used:?}");
    let (used_nonce, used_tx, block) = used[0];
    assert_eq!((used_nonce, used_tx), (nonce, tx));
    assert!(block > before && block <= chain.block_number().await);
    assert_eq!(
        chain.transfers_to(pay_to()).await,
        vec![(buyer.address(), 10_000, tx, block)]
    );

    // The same authorization again: refused, by the chain's nonce, and nothing moves.
    let again = post(&chain, "/settle", &body).await;
    assert_eq!(again["success"], false, "{again:#}");
    assert_eq!(
        again["errorReason"], "invalid_exact_evm_nonce_already_used",
        "{again:#}"
    );
    assert_eq!(again["transaction"], "");
    let verified = post(&chain, "/verify", &body).await;
    assert_eq!(
        (&verified["isValid"], &verified["invalidReason"]),
        (
            &json!(false),
            &json!("invalid_exact_evm_nonce_already_used")
        ),
        "{verified:#}"
    );
    assert_eq!(chain.balance_of(buyer.address()).await, 990_000);
    assert_eq!(chain.balance_of(pay_to()).await, 10_000);
    assert_eq!(chain.authorizations_used(buyer.address()).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payer_without_funds_is_refused_with_a_reason_and_nothing_is_mined() {
    let chain = DevChain::start().await;
    let broke = Wallet::new(0x52);
    let (body, nonce) = request_v2(&broke, &requirements_v2(10_000), &Tweak::default());
    let before = chain.block_number().await;

    let verified = post(&chain, "/verify", &body).await;
    assert_eq!(verified["isValid"], false, "{verified:#}");
    // Explained through Multicall3 (installed at its canonical address, as on Base Sepolia).
    assert_eq!(
        verified["invalidReason"], "invalid_exact_evm_insufficient_balance",
        "{verified:#}"
    );

    let settled = post(&chain, "/settle", &body).await;
    assert_eq!(settled["success"], false, "{settled:#}");
    assert_eq!(
        settled["errorReason"], "invalid_exact_evm_insufficient_balance",
        "{settled:#}"
    );
    assert_eq!(settled["transaction"], "");
    assert!(
        settled["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("ERC20: transfer amount exceeds balance")),
        "{settled:#}"
    );
    assert_eq!(chain.block_number().await, before, "nothing was mined");
    assert!(!chain.authorization_state(broke.address(), nonce).await);
    assert_eq!(chain.balance_of(pay_to()).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_facilitator_supports_exact_on_base_sepolia_v2_and_v1() {
    let chain = DevChain::start().await;
    let supported: Value = chain
        .http
        .get(format!("{}/supported", chain.facilitator_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kinds = supported["kinds"].as_array().unwrap();
    assert!(
        kinds.contains(&json!({"x402Version": 2, "scheme": "exact", "network": "eip155:84532"})),
        "{supported:#}"
    );
    assert!(
        kinds.contains(&json!({"x402Version": 1, "scheme": "exact", "network": "base-sepolia"})),
        "{supported:#}"
    );
    assert_eq!(
        supported["signers"]["eip155:*"],
        json!([FACILITATOR_ADDRESS.to_checksum(None)]),
        "{supported:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_payment_on_base_sepolia_by_name_settles() {
    let buyer = Wallet::new(0x53);
    let chain = DevChain::start_with(&[(buyer.address(), 50_000)]).await;
    let requirements = json!({
        "scheme": "exact",
        "network": "base-sepolia",
        "maxAmountRequired": "20000",
        "resource": "https://api.example.com/paid",
        "description": "A paid thing",
        "mimeType": "application/json",
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "asset": BASE_SEPOLIA_USDC,
        "extra": {"name": "USDC", "version": "2"},
    });
    let payload = buyer.authorize(&requirements, &Tweak::default());
    let body = json!({
        "x402Version": 1,
        "paymentPayload": {
            "x402Version": 1,
            "scheme": "exact",
            "network": "base-sepolia",
            "payload": payload,
        },
        "paymentRequirements": requirements,
    });
    let settled = post(&chain, "/settle", &body).await;
    assert_eq!(
        settled["success"],
        true,
        "{settled:#}\n{}",
        chain.facilitator_log()
    );
    assert_eq!(settled["network"], "base-sepolia");
    assert_eq!(chain.balance_of(buyer.address()).await, 30_000);
    assert_eq!(chain.balance_of(pay_to()).await, 20_000);
}

/// The token itself, asked directly (`eth_call`): FiatToken's domain and checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_checks_authorizations_as_fiat_token_does() {
    let buyer = Wallet::new(0x54);
    let chain = DevChain::start_with(&[(buyer.address(), 100_000)]).await;
    let domain = eip712_domain! {
        name: "USDC",
        version: "2",
        chain_id: CHAIN_ID,
        verifying_contract: chain.token(),
    };
    assert_eq!(
        chain.call(&IEip3009Token::DOMAIN_SEPARATORCall {}).await,
        domain.separator()
    );
    assert_eq!(chain.call(&IEip3009Token::nameCall {}).await, "USDC");
    assert_eq!(chain.call(&IEip3009Token::versionCall {}).await, "2");
    assert_eq!(chain.call(&IEip3009Token::decimalsCall {}).await, 6);

    let requirements = requirements_v2(10_000);
    let now = harness::now();
    let attempt = |tweak: Tweak| {
        let payload = buyer.authorize(&requirements, &tweak);
        let auth = &payload["authorization"];
        let signature = alloy::hex::decode(payload["signature"].as_str().unwrap()).unwrap();
        let number = |v: &Value| U256::from_str_radix(v.as_str().unwrap(), 10).unwrap();
        IEip3009Token::transferWithAuthorizationCall {
            from: auth["from"].as_str().unwrap().parse().unwrap(),
            to: auth["to"].as_str().unwrap().parse().unwrap(),
            value: number(&auth["value"]),
            validAfter: number(&auth["validAfter"]),
            validBefore: number(&auth["validBefore"]),
            nonce: b256(&auth["nonce"]),
            v: signature[64],
            r: B256::from_slice(&signature[..32]),
            s: B256::from_slice(&signature[32..64]),
        }
    };
    let revert = |error: Value| error["message"].as_str().unwrap_or_default().to_string();

    assert!(chain.try_call(&attempt(Tweak::default())).await.is_ok());
    let cases = [
        (
            Tweak {
                valid_after: Some(now + 120),
                ..Tweak::default()
            },
            "FiatTokenV2: authorization is not yet valid",
        ),
        (
            Tweak {
                valid_before: Some(now - 1),
                ..Tweak::default()
            },
            "FiatTokenV2: authorization is expired",
        ),
        (
            Tweak {
                high_s: true,
                ..Tweak::default()
            },
            "ECRecover: invalid signature 's' value",
        ),
        (
            Tweak {
                v_base: Some(0),
                ..Tweak::default()
            },
            "ECRecover: invalid signature 'v' value",
        ),
        (
            Tweak {
                impostor: true,
                ..Tweak::default()
            },
            "FiatTokenV2: invalid signature",
        ),
        (
            Tweak {
                domain_name: Some("USD Coin".into()),
                ..Tweak::default()
            },
            "FiatTokenV2: invalid signature",
        ),
        (
            Tweak {
                chain_id: Some(8453),
                ..Tweak::default()
            },
            "FiatTokenV2: invalid signature",
        ),
        (
            Tweak {
                value: Some(U256::from(100_001)),
                ..Tweak::default()
            },
            "ERC20: transfer amount exceeds balance",
        ),
    ];
    for (tweak, expected) in cases {
        let described = format!("{tweak:?}");
        let error = chain.try_call(&attempt(tweak)).await.unwrap_err();
        assert!(
            revert(error.clone()).contains(expected),
            "{described}: {error:#}"
        );
    }

    // A used nonce is refused; then nothing else about it matters.
    let nonce = B256::repeat_byte(7);
    let (body, _) = request_v2(
        &buyer,
        &requirements,
        &Tweak {
            nonce: Some(nonce),
            ..Tweak::default()
        },
    );
    assert_eq!(post(&chain, "/settle", &body).await["success"], true);
    let error = chain
        .try_call(&attempt(Tweak {
            nonce: Some(nonce),
            ..Tweak::default()
        }))
        .await
        .unwrap_err();
    assert!(
        revert(error.clone()).contains("FiatTokenV2: authorization is used or canceled"),
        "{error:#}"
    );
}

/// Hundreds of blocks in a second or two do not push the chain's clock ahead of the wall
/// clock (hardhat's automine would be minutes ahead: one second per block).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_clock_keeps_to_the_wall_clock_however_many_blocks() {
    let chain = DevChain::start().await;
    let first = chain.block_number().await;
    let mut last = Value::Null;
    for _ in 0..300 {
        last = chain
            .rpc(
                "eth_sendTransaction",
                json!([{"from": FAUCET, "to": PAY_TO, "value": "0x1"}]),
            )
            .await;
    }
    chain.receipt(&last).await;
    let blocks = chain.block_number().await - first;
    let (stamp, now) = (chain.block_timestamp().await, harness::now());
    // Automine mines asynchronously: transactions that arrive while a block is being mined
    // share the next one, so 300 transactions make a little under 300 blocks.
    assert!(blocks >= 200, "{blocks} blocks");
    assert!(
        stamp <= now,
        "chain at {stamp}, wall clock at {now} after {blocks} blocks"
    );
    assert!(stamp + 5 >= now, "chain at {stamp}, wall clock at {now}");
}

/// Concurrent settles from one gas account all land: the facilitator sends one transaction at
/// a time, so no two race for a nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_settles_all_land_once_each() {
    const N: usize = 40;
    let buyer = Wallet::new(0x55);
    let chain = DevChain::start_with(&[(buyer.address(), 1_000_000)]).await;
    let requirements = requirements_v2(1_000);
    let mut settles = tokio::task::JoinSet::new();
    for _ in 0..N {
        let (body, _) = request_v2(&buyer, &requirements, &Tweak::default());
        let (http, url) = (
            chain.http.clone(),
            format!("{}/settle", chain.facilitator_url()),
        );
        settles.spawn(async move {
            let response = http.post(url).json(&body).send().await.unwrap();
            response.json::<Value>().await.unwrap()
        });
    }
    let mut transactions = std::collections::HashSet::new();
    while let Some(settled) = settles.join_next().await {
        let settled = settled.unwrap();
        assert_eq!(
            settled["success"],
            true,
            "{settled:#}\n{}",
            chain.facilitator_log()
        );
        transactions.insert(b256(&settled["transaction"]));
    }
    assert_eq!(transactions.len(), N);
    assert_eq!(chain.balance_of(pay_to()).await, 1_000 * N as u128);
    assert_eq!(chain.authorizations_used(buyer.address()).await.len(), N);
}

/// Evidence read in batches (`examine_all`: one `aggregate3` of nonce states, one log query per
/// token, one receipt per transaction) says the same as evidence read one payment at a time,
/// for every kind of outcome at once: settled to this payment's recipient, used for another
/// amount, cancelled by the payer, unused; two payers whose nonces cross in the log filter;
/// and a transfer not yet deep enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_read_in_batches_agrees_with_evidence_read_one_by_one() {
    use alloy::signers::SignerSync;
    use alloy::sol_types::SolStruct;
    use tollgate::settle::evidence::{Chain, Subject, Verdict};

    let (alice, bob) = (Wallet::new(0x56), Wallet::new(0x57));
    let chain = DevChain::start_with(&[(alice.address(), 100_000), (bob.address(), 100_000)]).await;
    let requirements = requirements_v2(1_000);
    let subject = |wallet: &Wallet, nonce: B256, amount: u64| Subject {
        payer: wallet.address(),
        nonce,
        asset: chain.token(),
        pay_to: pay_to(),
        amount: U256::from(amount),
    };
    let mut subjects = Vec::new();
    let mut settled_in = Vec::new();
    for wallet in [&alice, &bob, &alice] {
        let (body, nonce) = request_v2(wallet, &requirements, &Tweak::default());
        let settled = post(&chain, "/settle", &body).await;
        assert_eq!(settled["success"], true, "{settled:#}");
        settled_in.push(b256(&settled["transaction"]));
        subjects.push(subject(wallet, nonce, 1_000));
    }
    // Bob's settled nonce, as if the ledger held 999 for it: used, but not by this payment.
    subjects.push(Subject {
        amount: U256::from(999),
        ..subjects[1]
    });
    // Alice cancels an authorization she had signed.
    let cancelled = B256::repeat_byte(0xc1);
    let domain = eip712_domain! {
        name: "USDC",
        version: "2",
        chain_id: CHAIN_ID,
        verifying_contract: chain.token(),
    };
    let digest = CancelAuthorization {
        authorizer: alice.address(),
        nonce: cancelled,
    }
    .eip712_signing_hash(&domain);
    let signature = alice.signer.sign_hash_sync(&digest).unwrap();
    let data = IEip3009Token::cancelAuthorizationCall {
        authorizer: alice.address(),
        nonce: cancelled,
        v: 27 + u8::from(signature.v()),
        r: signature.r().into(),
        s: signature.s().into(),
    }
    .abi_encode();
    let tx = chain
        .rpc(
            "eth_sendTransaction",
            json!([{
                "from": FAUCET,
                "to": BASE_SEPOLIA_USDC,
                "data": format!("0x{}", alloy::hex::encode(data)),
            }]),
        )
        .await;
    assert_eq!(chain.receipt(&tx).await["status"], "0x1");
    subjects.push(subject(&alice, cancelled, 1_000));
    // Never used; and Bob's nonce under Alice's name (the filter's payers × nonces).
    subjects.push(subject(&alice, B256::repeat_byte(0x0e), 1_000));
    subjects.push(Subject {
        payer: alice.address(),
        ..subjects[1]
    });

    let node = Chain::new(&chain.rpc_url()).unwrap();
    let batched = node.examine_all(&subjects, 1).await.unwrap();
    let mut one_by_one = Vec::new();
    for s in &subjects {
        one_by_one.push(node.examine(s, 1).await.unwrap());
    }
    let kind = |v: &Verdict| match v {
        Verdict::Settled { tx, .. } => format!("settled {tx}"),
        Verdict::UsedOtherwise { why } => format!("otherwise: {why}"),
        Verdict::Unused { .. } => "unused".into(),
        Verdict::Unclear { why } => format!("unclear: {why}"),
    };
    let batched: Vec<String> = batched.iter().map(kind).collect();
    assert_eq!(batched, one_by_one.iter().map(kind).collect::<Vec<_>>());
    for (i, tx) in settled_in.iter().enumerate() {
        assert_eq!(batched[i], format!("settled {tx}"));
    }
    assert!(
        batched[3].starts_with("otherwise: the nonce was used in"),
        "{}",
        batched[3]
    );
    assert_eq!(
        batched[4],
        "otherwise: the payer cancelled the authorization on chain"
    );
    assert_eq!(batched[5], "unused");
    assert_eq!(batched[6], "unused");

    // Not deep enough yet: every settled one is unclear, in both readings.
    let deep = node.examine_all(&subjects[..3], 1_000).await.unwrap();
    for (batched, single) in deep.iter().zip(&subjects[..3]) {
        assert!(
            kind(batched).starts_with("unclear: settled in block"),
            "{batched:?}"
        );
        assert_eq!(
            kind(batched),
            kind(&node.examine(single, 1_000).await.unwrap())
        );
    }
}

/// A TCP relay in front of a node: the node as tollgate sees it can be taken down (connections
/// refused, open ones cut) and brought back, or made slow, while the chain itself goes on.
pub struct Relay {
    pub port: u16,
    target: u16,
    delay_ms: std::sync::Arc<AtomicU64>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Relay {
    pub async fn start(target: u16) -> Relay {
        let relay = Relay {
            port: free_port(),
            target,
            delay_ms: std::sync::Arc::new(AtomicU64::new(0)),
            task: std::sync::Mutex::new(None),
        };
        relay.up();
        relay
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Listens again (the same port).
    pub fn up(&self) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(([127, 0, 0, 1], self.port).into()).unwrap();
        let listener = socket.listen(64).unwrap();
        let target = self.target;
        let delay = self.delay_ms.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let delay = delay.clone();
                connections.spawn(async move {
                    let ms = delay.load(Ordering::Relaxed);
                    if ms > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// Stops listening and cuts every open connection: the node is down.
    pub fn down(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Every new connection waits this long before it reaches the node.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.down();
    }
}

impl DevChain {
    pub fn rpc_port(&self) -> u16 {
        self.rpc_port
    }

    /// Stops anvil (SIGTERM: it writes its state and exits; its pool of unmined transactions
    /// is not kept), then starts it again on the same port from that state. Meanwhile the
    /// node refuses connections. Only for [`DevChain::start_restartable`] chains.
    pub async fn restart_node(&self) {
        let state = self.state.clone().expect("a restartable chain");
        let old = self.anvil.lock().unwrap().take();
        tokio::task::spawn_blocking(move || drop(old))
            .await
            .unwrap();
        let (anvil, _) = start_anvil(
            &chain_dir(),
            &self.dir,
            &self.http,
            self.block_time,
            Some(self.rpc_port),
            Some(&state),
        )
        .await;
        *self.anvil.lock().unwrap() = Some(anvil);
    }
}
