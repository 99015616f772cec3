// The official x402 facilitator (`@x402/core` + `@x402/evm`, "exact" scheme on EVM) served over
// HTTP for the end-to-end tests, settling for real on a local chain (tests/it/e2e/chain.rs).
//
//   FACILITATOR_PRIVATE_KEY=0x… node facilitator.mjs <rpc-url> [port] [--exit-with-stdin]
//
// (or RPC_URL / PORT in the environment). Port 0, the default, takes an ephemeral port. Prints
// one line `listening <port>` on stdout when ready; logs one line per request on stderr.
// With --exit-with-stdin it exits when its standard input closes, so it never outlives the test
// process that started it, however that process ends.
//
// HTTP API (the x402 facilitator API; requests are `{x402Version, paymentPayload,
// paymentRequirements}`):
//   GET  /supported  200 {kinds, extensions, signers}
//   POST /verify     200 VerifyResponse ({isValid, invalidReason?, invalidMessage?, payer?})
//   POST /settle     200 SettleResponse ({success, errorReason?, errorMessage?, payer?,
//                    transaction, network})
// A body that is not JSON or lacks paymentPayload/paymentRequirements gets 400 {error}; an
// exception from the library (e.g. no scheme registered for that version and network) gets
// 500 {error}, as the reference facilitator answers.
//
// Networks: `eip155:<chain id>` (x402 v2) and, when the chain id has a v1 name, that name
// (84532 → `base-sepolia`). The chain id is the node's own (eth_chainId).
import { createServer } from "node:http";
import { x402Facilitator } from "@x402/core/facilitator";
import { toFacilitatorEvmSigner } from "@x402/evm";
import { ExactEvmScheme } from "@x402/evm/exact/facilitator";
import { ExactEvmSchemeV1 } from "@x402/evm/exact/v1/facilitator";
import { EVM_NETWORK_CHAIN_ID_MAP } from "@x402/evm/v1";
import { createWalletClient, defineChain, http, publicActions } from "viem";
import { privateKeyToAccount } from "viem/accounts";

const positional = process.argv.slice(2).filter(a => !a.startsWith("--"));
const rpcUrl = positional[0] ?? process.env.RPC_URL;
const port = Number(positional[1] ?? process.env.PORT ?? 0);
const key = process.env.FACILITATOR_PRIVATE_KEY;
if (!rpcUrl || !key || !Number.isInteger(port)) {
  console.error("usage: FACILITATOR_PRIVATE_KEY=0x… node facilitator.mjs <rpc-url> [port] [--exit-with-stdin]");
  process.exit(2);
}
if (process.argv.includes("--exit-with-stdin")) {
  process.stdin.on("end", () => process.exit(0));
  process.stdin.on("error", () => process.exit(0));
  process.stdin.resume();
}

const chainIdResponse = await fetch(rpcUrl, {
  method: "POST",
  headers: { "content-type": "application/json" },
  body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "eth_chainId", params: [] }),
});
const chainId = Number((await chainIdResponse.json()).result);
const v2Network = `eip155:${chainId}`;
const v1Networks = Object.entries(EVM_NETWORK_CHAIN_ID_MAP)
  .filter(([, id]) => id === chainId)
  .map(([name]) => name);

const account = privateKeyToAccount(key);
const client = createWalletClient({
  account,
  chain: defineChain({
    id: chainId,
    name: `dev chain ${chainId}`,
    nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
    rpcUrls: { default: { http: [rpcUrl] } },
  }),
  transport: http(rpcUrl),
  // viem polls for receipts every 4 s by default; a dev chain mines on receipt of a transaction.
  pollingInterval: 20,
  cacheTime: 0,
}).extend(publicActions);

// One gas account: transactions are prepared, signed and sent one at a time, so concurrent
// settles never race for a nonce (each send reads the pending nonce after the previous send).
// Verification, simulation and receipt waits stay concurrent. (Without this, as the reference
// facilitator wires its signer, concurrent settles fail with "nonce too low", answered as
// `invalid_exact_evm_transaction_failed`: see concurrent_settles_all_land_once_each.)
let lastWrite = Promise.resolve();
const oneAtATime = fn => args => {
  const run = lastWrite.then(() => fn(args));
  lastWrite = run.catch(() => {});
  return run;
};

// The signer the facilitator library needs, made of a viem wallet client with public actions
// (the shape of the reference facilitator's).
const signer = toFacilitatorEvmSigner(
  {
    address: account.address,
    getCode: args => client.getCode(args),
    readContract: args => client.readContract({ ...args, args: args.args ?? [] }),
    verifyTypedData: args => client.verifyTypedData(args),
    writeContract: oneAtATime(args => client.writeContract({ ...args, args: args.args ?? [] })),
    sendTransaction: oneAtATime(args => client.sendTransaction(args)),
    waitForTransactionReceipt: args => client.waitForTransactionReceipt(args),
  },
  { confirmationTimeoutMs: 30_000 },
);

const facilitator = new x402Facilitator();
facilitator.register([v2Network], new ExactEvmScheme(signer));
if (v1Networks.length > 0) facilitator.registerV1(v1Networks, new ExactEvmSchemeV1(signer));

const json = (res, status, value) => {
  const body = JSON.stringify(value, (_, v) => (typeof v === "bigint" ? v.toString() : v));
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
};

const readBody = req =>
  new Promise((resolve, reject) => {
    const chunks = [];
    req.on("data", c => chunks.push(c));
    req.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    req.on("error", reject);
  });

const server = createServer(async (req, res) => {
  const path = new URL(req.url, "http://facilitator").pathname;
  try {
    if (req.method === "GET" && path === "/supported") {
      return json(res, 200, facilitator.getSupported());
    }
    if (req.method !== "POST" || (path !== "/verify" && path !== "/settle")) {
      return json(res, 404, { error: `no route ${req.method} ${path}` });
    }
    let body;
    try {
      body = JSON.parse(await readBody(req));
    } catch {
      return json(res, 400, { error: "the body is not JSON" });
    }
    const { paymentPayload, paymentRequirements } = body ?? {};
    if (!paymentPayload || !paymentRequirements) {
      return json(res, 400, { error: "Missing paymentPayload or paymentRequirements" });
    }
    if (path === "/verify") {
      const result = await facilitator.verify(paymentPayload, paymentRequirements);
      console.error(`verify ${result.isValid ? "valid" : `invalid ${result.invalidReason}`} ${result.payer ?? ""}`);
      return json(res, 200, result);
    }
    const result = await facilitator.settle(paymentPayload, paymentRequirements);
    console.error(
      `settle ${result.success ? `ok ${result.transaction}` : `failed ${result.errorReason}`} ${result.payer ?? ""}`,
    );
    return json(res, 200, result);
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    console.error(`${path} error: ${message}`);
    return json(res, 500, { error: message });
  }
});

server.listen(port, "127.0.0.1", () => {
  console.error(
    `facilitator ${account.address} on ${[v2Network, ...v1Networks].join(", ")} via ${rpcUrl}`,
  );
  console.log(`listening ${server.address().port}`);
});
