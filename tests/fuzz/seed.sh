#!/usr/bin/env bash
# Builds each fuzz target's corpus directory (tests/fuzz/corpus/<target>, git-ignored) from the
# repository's own inputs, plus libFuzzer dictionaries (tests/fuzz/corpus/<target>.dict).
# Idempotent: seeds are named by content and existing corpus entries are kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=tests/fuzz/corpus

# seed TARGET NAME < content
seed() {
  mkdir -p "$out/$1"
  cat >"$out/$1/seed-$2"
}

# x402_header: the captured official-client headers (tests/fixtures/x402), as sent (first
# byte even: the bytes are the header) and as JSON (first byte odd: the target base64-encodes
# them), against each of the target's terms (the first byte's other bits).
for f in tests/fixtures/x402/*.b64 tests/fixtures/x402/*.json; do
  name=$(basename "$f")
  case "$f" in *.b64) modes="0 2" ;; *) modes="1 3" ;; esac
  for mode in $modes; do
    { printf "\\x0$mode"; tr -d '\n' <"$f"; } | seed x402_header "$mode-$name"
  done
done
# The same JSON compact, and a v1 payload without optional fields.
for f in tests/fixtures/x402/*.PAYMENT*.decoded.json tests/fixtures/x402/*.X-PAYMENT.decoded.json; do
  { printf '\x01'; python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1])),separators=(",",":")),end="")' "$f"; } \
    | seed x402_header "compact-$(basename "$f")"
done

# policy: the shipped policies, the examples and their test files, the golden bad policies.
for f in policies/*.toll examples/policies/*.toll tests/fixtures/policy/err/*.toll; do
  seed policy "$(basename "$(dirname "$f")")-$(basename "$f")" <"$f"
done

# config: the example tollgate.yaml, the Kubernetes ConfigMap's copy of it, a few shapes.
seed config example.yaml <examples/tollgate.yaml
python3 - "$out/config" <<'PY'
import pathlib, sys
out = pathlib.Path(sys.argv[1])
text = pathlib.Path("examples/kubernetes/configmap.yaml").read_text()
# The block under `tollgate.yaml: |`, dedented.
lines, grab, indent = [], False, None
for line in text.splitlines():
    if line.strip().startswith("tollgate.yaml:"):
        grab = True
        continue
    if grab:
        if line.strip() and indent is None:
            indent = len(line) - len(line.lstrip())
        if line.strip() and len(line) - len(line.lstrip()) < (indent or 0):
            break
        lines.append(line[indent or 0:])
if lines:
    (out / "seed-configmap.yaml").write_text("\n".join(lines) + "\n")
PY
seed config empty.yaml </dev/null
printf 'listen: 127.0.0.1:8402\nupstream: https://api.example.com\npolicies: policies/weather.toll\n' | seed config short.yaml
printf 'base: &b {listen: "[::1]:9000"}\nops: {<<: *b}\nadmin: {<<: *b, token: env:ADMIN}\nconnections: {max: 10, idle_timeout: 5s, head_timeout: 1500ms, body_min_rate: 0}\n' | seed config merge.yaml
printf 'settlement:\n  rpc: http://127.0.0.1:8545\n  confirmations: 3\n  replace_after: 2m\n  max_fee_per_gas: 100 gwei\nlog: {format: json, level: "info,tollgate=debug"}\n' | seed config settlement.yaml

# admin_request: `METHOD target`, newline, body.
n=0
while IFS= read -r line; do
  n=$((n + 1))
  printf '%b' "$line" | seed admin_request "$n"
done <<'REQ'
POST /v1/accounts\n{"name":"acme"}
GET /v1/accounts?after=3&limit=50
GET /v1/accounts/7
POST /v1/accounts/7/keys\n{"label":"ci","expires_in_secs":3600}
GET /v1/accounts/7/keys
DELETE /v1/keys/tgk_0123456789abcdef
POST /v1/accounts/7/topups\n{"credits":"1000","reference":"invoice-42"}
GET /v1/accounts/7/usage?after=1&limit=10
GET /v1/audit
GET /v1/ledger?from=2026-11-30&to=1796126400&buyer=0xcA7e383cc471e99f79Bc7cA90A111Fb92E93ac8b&route=GET%20%2Fv1%2Fforecast%2F%7Bcity%7D&state=unresolved&bundle=4&after=99&limit=7
GET /v1/ledger/12
GET /v1/ledger/verify
GET /v1/bundles?after=2&limit=3
GET /v1/bundles/5
GET /v1/ledger/export?format=json&from=10&to=20&state=confirmed
POST /v1/ledger/export?format=csv&currency=USD\ncurrency,rate,source,as_of\nEUR,0.9234,ECB,2026-11-30\nUSD,1,par,2026-11-30\n
PUT /v1/accounts
GET /v1/accounts/x
REQ

# target and decide_target: request lines (`METHOD target`, optionally newline and Host), the
# policies' own test requests, and targets that are refused or rewritten.
n=0
while IFS= read -r line; do
  n=$((n + 1))
  for t in target decide_target; do printf '%b' "$line" | seed $t "$n"; done
done <<'REQ'
GET /paid/1?a=b
GET //free/paid/1
GET /a//b///c/?x=//y
GET http://h/paid/1?q=1\nh
GET HTTPS://API.example.com:8402\napi.example.com:8402
GET http://api.example.com:8402?q\napi.example.com:8402
GET http://u@h/paid\nh
OPTIONS *
GET *
GET foo:/paid/1
GET %2Fpaid/1
GET /paid%2F1
GET /paid/%2e%2e/free
GET /paid;x/1
GET /paid\\1
GET /Paid/1
GET /ADMIN/x
GET /admin/x
get /paid/1
HEAD /h
HEAD /h/x
GET /files/a/b/c?d
POST /v1/a/x/b/c
GET /caf%C3%A9
GET /%00
GET /a#b
DELETE /internal/cache
GET /v1/forecast/paris?days=3
GET /v1/history/paris/2026/11
POST /v1/reports
GET /premium/x
GET /.well-known/x402
REQ
for f in policies/*.toll examples/policies/*.toll; do
  { grep -ho 'request [A-Z*]* "[^"]*"' "$f" || true; } | sed -E 's/^request ([^ ]*) "(.*)"$/\1 \2/'
done | sort -u | while IFS= read -r line; do
  n=$((n + 1))
  for t in target decide_target; do printf '%s' "$line" | seed $t "t$n"; done
done

# Dictionaries: the policy language's keywords (grammar/policy.pest), the x402 JSON fields,
# the configuration's keys.
grep -o '"[a-z_0-9:]\{2,\}"' grammar/policy.pest | sort -u >"$out/policy.dict"
printf '%s\n' '"{"' '"}"' '"\x22"' '"USDC"' '"0x"' '"**"' '"{city}"' '"base-sepolia"' '"base"' '"credits"' '"credit"' >>"$out/policy.dict"
for k in x402Version scheme network accepted payload signature authorization from to value validAfter validBefore nonce resource amount asset payTo maxTimeoutSeconds extra name version exact eip155:84532 eip155:8453 base-sepolia; do
  printf '"%s"\n' "$k"
done >"$out/x402_header.dict"
for k in listen upstream public_url policies store ops admin token log format level connections max idle_timeout head_timeout body_timeout body_min_rate settlement rpc confirmations replace_after max_fee_per_gas auto env: gwei '<<' '&a' '*a' '!!' 'http://' 'https://'; do
  printf '"%s"\n' "$k"
done >"$out/config.dict"
for k in /v1/ accounts keys topups usage audit ledger verify export bundles after= limit= from= to= buyer= route= state= bundle= format= currency= GET POST DELETE '"name"' '"label"' '"credits"' '"reference"' '"expires_in_secs"'; do
  printf '"%s"\n' "${k//\"/\\x22}"
done >"$out/admin_request.dict"
printf '%s\n' '"/"' '"//"' '"%2F"' '"%2e"' '"%5C"' '"?"' '"#"' '";"' '"\x5c"' '"http://"' '"https://"' '"*"' '"OPTIONS"' '"HEAD"' '"paid"' '"files"' '"admin"' '"Admin"' >"$out/target.dict"
cp "$out/target.dict" "$out/decide_target.dict"

for t in x402_header policy config admin_request target decide_target; do
  echo "seeded $t: $(ls "$out/$t" | wc -l) inputs"
done
