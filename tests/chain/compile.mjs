// Compiles the test contracts with solc-js (pinned in package-lock.json) into the committed
// artifacts `<Contract>.json` ({contractName, compiler, abi, bytecode, deployedBytecode}).
// The tests never compile: they install `deployedBytecode` with anvil_setCode.
//
//   node compile.mjs          writes the artifacts
//   node compile.mjs --check  fails if a committed artifact differs from what the source gives
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import solc from "solc";

const here = dirname(fileURLToPath(import.meta.url));
const contracts = ["EIP3009Token", "Multicall3"];
const check = process.argv.includes("--check");

const input = {
  language: "Solidity",
  sources: Object.fromEntries(
    contracts.map(name => [`${name}.sol`, { content: readFileSync(join(here, `${name}.sol`), "utf8") }]),
  ),
  settings: {
    optimizer: { enabled: true, runs: 200 },
    // Cancun: what Base runs; anvil's default hardfork is newer.
    evmVersion: "cancun",
    // No metadata hash: the artifact depends on the source text only through the code.
    metadata: { bytecodeHash: "none" },
    outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
  },
};

const output = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (output.errors ?? []).filter(e => e.severity === "error");
for (const message of output.errors ?? []) console.error(message.formattedMessage);
if (errors.length > 0) process.exit(1);

let stale = false;
for (const name of contracts) {
  const compiled = output.contracts[`${name}.sol`][name];
  const artifact = {
    contractName: name,
    compiler: `solc-js ${solc.version()}`,
    settings: { optimizer: input.settings.optimizer, evmVersion: input.settings.evmVersion },
    abi: compiled.abi,
    bytecode: `0x${compiled.evm.bytecode.object}`,
    deployedBytecode: `0x${compiled.evm.deployedBytecode.object}`,
  };
  const text = `${JSON.stringify(artifact, null, 2)}\n`;
  const path = join(here, `${name}.json`);
  if (check) {
    let committed = "";
    try {
      committed = readFileSync(path, "utf8");
    } catch {
      // missing: stale
    }
    if (committed !== text) {
      console.error(`${name}.json is stale: run \`node compile.mjs\``);
      stale = true;
    }
  } else {
    writeFileSync(path, text);
    console.log(`${name}.json: ${(artifact.deployedBytecode.length - 2) / 2} bytes of runtime code`);
  }
}
process.exit(stale ? 1 : 0);
