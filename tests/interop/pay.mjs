// Pays for one URL with an official x402 client and prints what happened as one JSON line.
// Usage: node pay.mjs <url> <v2|legacy-v1> <0x private key>
// Driven by tests/it/e2e/interop.rs; dependencies pinned in package-lock.json.
const [url, client, key] = process.argv.slice(2);

async function payV2() {
  const { x402Client, wrapFetchWithPayment } = await import("@x402/fetch");
  const { ExactEvmScheme } = await import("@x402/evm/exact/client");
  const { privateKeyToAccount } = await import("viem/accounts");
  const x402 = new x402Client();
  x402.register("eip155:*", new ExactEvmScheme(privateKeyToAccount(key)));
  return wrapFetchWithPayment(fetch, x402)(url, { method: "GET" });
}

async function payLegacyV1() {
  const { wrapFetchWithPayment, createSigner } = await import("x402-fetch");
  const signer = await createSigner("base-sepolia", key);
  return wrapFetchWithPayment(fetch, signer)(url, { method: "GET" });
}

function decode(header) {
  return header ? JSON.parse(Buffer.from(header, "base64").toString("utf8")) : null;
}

try {
  const response = client === "v2" ? await payV2() : await payLegacyV1();
  const body = await response.text();
  console.log(JSON.stringify({
    status: response.status,
    receipt: decode(response.headers.get("payment-response")),
    legacyReceipt: decode(response.headers.get("x-payment-response")),
    body,
  }));
} catch (error) {
  console.log(JSON.stringify({ error: String(error && error.stack || error) }));
  process.exitCode = 1;
}
