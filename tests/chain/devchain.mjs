// A dev chain for tools outside the Rust tests (the load comparison, tests/load/bench.py): anvil
// with chain id 84532 (Base Sepolia), the EIP-3009 test USDC at Base Sepolia's USDC address and
// Multicall3 at its canonical address — what `DevChain` sets up in tests/it/e2e/chain.rs — and
// the given wallets funded.
//
//   node devchain.mjs <port> [<address>=<atomic units> ...]
//
// Prints `rpc http://127.0.0.1:<port>` on stdout when ready; anvil stops when this process ends
// (SIGTERM, SIGINT) or its standard input closes.
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { encodeFunctionData, getAddress } from "viem";

const USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e";
const MULTICALL3 = "0xcA11bde05977b3631167028862bE2a173976CA11";
// anvil's account 1 (unlocked): mints, as in the Rust tests.
const FAUCET = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";

const [port, ...funding] = process.argv.slice(2);
if (!port) {
  console.error("usage: node devchain.mjs <port> [<address>=<atomic units> ...]");
  process.exit(2);
}
const here = new URL(".", import.meta.url).pathname;
const anvil = spawn(
  `${here}node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil`,
  ["--chain-id", "84532", "--port", port, "--host", "127.0.0.1", "--silent"],
  { stdio: ["ignore", "ignore", "inherit"] },
);
process.on("exit", () => anvil.kill());
process.on("uncaughtException", error => {
  console.error(`devchain: ${error.message}`);
  process.exit(1);
});
const stop = () => process.exit(0);
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
process.stdin.on("end", stop);
process.stdin.resume();
anvil.on("exit", code => {
  console.error(`anvil exited (${code})`);
  process.exit(1);
});

const url = `http://127.0.0.1:${port}`;
let id = 0;
const rpc = async (method, params) => {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ jsonrpc: "2.0", id: ++id, method, params }),
  });
  const body = await response.json();
  if (body.error) throw new Error(`${method}: ${JSON.stringify(body.error)}`);
  return body.result;
};
for (let attempt = 0; ; attempt++) {
  try {
    await rpc("eth_chainId", []);
    break;
  } catch (error) {
    if (attempt > 200) throw error;
    await new Promise(r => setTimeout(r, 50));
  }
}
const code = name => JSON.parse(readFileSync(`${here}${name}.json`, "utf8")).deployedBytecode;
await rpc("anvil_setCode", [USDC, code("EIP3009Token")]);
await rpc("anvil_setCode", [MULTICALL3, code("Multicall3")]);
const mintAbi = [
  {
    type: "function",
    name: "mint",
    stateMutability: "nonpayable",
    inputs: [
      { name: "to", type: "address" },
      { name: "value", type: "uint256" },
    ],
    outputs: [],
  },
];
for (const pair of funding) {
  const [to, atomic] = pair.split("=");
  const data = encodeFunctionData({ abi: mintAbi, functionName: "mint", args: [getAddress(to.toLowerCase()), BigInt(atomic)] });
  const tx = await rpc("eth_sendTransaction", [{ from: FAUCET, to: USDC, data }]);
  for (;;) {
    const receipt = await rpc("eth_getTransactionReceipt", [tx]);
    if (receipt) {
      if (receipt.status !== "0x1") throw new Error(`minting to ${to} failed`);
      break;
    }
    await new Promise(r => setTimeout(r, 5));
  }
}
console.log(`rpc ${url}`);
