#!/usr/bin/env bash
# Loopback load test: req/s, p50 and p99 for
#   direct upstream | nginx reverse proxy | bare Pingora proxy (examples/bare_pingora.rs, the
#   framework's floor) | tollgate free route | tollgate paid route (x402 v2,
#   pre-signed unique payments, verified, nonce recorded durably, settled with a stub facilitator)
#   | tollgate prepaid route (an API key debited one credit per call, durably)
# at saturation (wrk, N connections), then the latency of direct, free, paid and prepaid at a
# moderate paced load (4 connections, one request every 2 ms each: ~2,000 req/s offered),
# all against the same trivial upstream, in one run (everything shares the machine's cores, so
# compare ratios within a run, never absolute figures across runs).
#
# Needs: wrk and nginx (Debian: apt-get install -y wrk nginx-light), a release build.
# Usage: tests/load/run.sh [duration seconds, default 10] [connections, default 50]
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${1:-10}
CONNS=${2:-50}
MODERATE=4   # connections for the moderate-load rows, each sending one request every PACE ms
PACE=2       # so about 4 × 500 = 2,000 req/s offered: a tenth of what the free route serves
WORK=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  nginx -c "$WORK/nginx.conf" -s stop 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 2; }
command -v nginx >/dev/null || { echo "nginx is missing: apt-get install -y nginx-light" >&2; exit 2; }
cargo build --release --quiet --bin tollgate --example load_upstream --example presign --example bare_pingora
BIN=target/release

UP=127.0.0.1:18080; NGINX=127.0.0.1:18081; BARE=127.0.0.1:18082; GATE=127.0.0.1:18402; OPS=127.0.0.1:19402
"$BIN/examples/load_upstream" "$UP" >/dev/null 2>&1 & sleep 0.3

cat > "$WORK/nginx.conf" <<NGINX
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream app { server $UP; keepalive 64; }
  server {
    listen $NGINX;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
nginx -c "$WORK/nginx.conf"
"$BIN/examples/bare_pingora" "$BARE" "$UP" >/dev/null 2>&1 &

mkdir -p "$WORK/policies"
cat > "$WORK/policies/load.toll" <<POLICY
service "load" {
  pay_to 0x710D094d04ac8B4eE234D26c53ba15A1Dce203d1
  accept x402 on base-sepolia
  accept prepaid header "x-api-key"
  settle via facilitator "http://$UP" after response
  timeout 600s
  default deny
  route GET "/free" { free }
  route GET "/paid" { price 0.001 USDC }
  route GET "/deferred" {
    price 0.001 USDC
    settle deferred every 5s or 1000 payments
  }
  route GET "/prepaid" { price 1 credit }
}
POLICY
cat > "$WORK/tollgate.yaml" <<YAML
listen: $GATE
upstream: http://$UP
policies: [$WORK/policies/load.toll]
store: $WORK/data
ops: { listen: $OPS }
admin: { listen: 127.0.0.1:19403 }
log: { level: warn }
YAML
# A prepaid key, made with the CLI on the store before the sidecar holds it.
gate() { "$BIN/tollgate" "$@" --config "$WORK/tollgate.yaml"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
ACCOUNT=$(gate accounts create --name load | field '["account"]["id"]')
KEY=$(gate keys issue --account "$ACCOUNT" | field '["key"]')
gate credits top-up --account "$ACCOUNT" --credits 100000000 --reference load >/dev/null

"$BIN/tollgate" run --config "$WORK/tollgate.yaml" >/dev/null 2>"$WORK/tollgate.log" &
for _ in $(seq 100); do curl -sf "http://$OPS/readyz" >/dev/null && break; sleep 0.1; done

# Enough unique payments for the paid runs at up to 20k req/s.
PAYMENTS=$(( (DURATION + 2) * 32000 ))
"$BIN/examples/presign" "http://$GATE/paid" "$PAYMENTS" "$WORK/payments.txt"

cat > "$WORK/paid.lua" <<'LUA'
local headers = {}
local i = 0
local path = "/paid"
init = function(args)
  for line in io.lines(args[1]) do headers[#headers + 1] = line end
  if args[2] then path = args[2] end
end
request = function()
  i = i + 1
  return wrk.format("GET", path, { ["PAYMENT-SIGNATURE"] = headers[i] })
end
LUA
# Moderate load: wrk's delay() paces each connection, so the offered rate stays fixed and the
# latency is the route's own, not queueing behind a saturated CPU.
echo "delay = function() return $PACE end" > "$WORK/pace.lua"
cat "$WORK/paid.lua" "$WORK/pace.lua" > "$WORK/paid-paced.lua"

run() { # name url conns [--key KEY | --payments FILE] [--paced]
  local name=$1 url=$2 conns=$3; shift 3
  local args=(-t1 -c"$conns" -d"${DURATION}s" --latency) script="" payments=""
  while [ $# -gt 0 ]; do
    case $1 in
      --key) args+=(-H "x-api-key: $2"); shift 2 ;;
      --payments) payments=$2; shift 2 ;;
      --paced) script=pace; shift ;;
    esac
  done
  if [ -n "$payments" ]; then script=paid${script:+-paced}; fi
  if [ -n "$script" ]; then args+=(-s "$WORK/$script.lua"); fi
  local out
  out=$(wrk "${args[@]}" "$url" ${payments:+-- "$payments" "/${url#http://*/}"})
  local rps p50 p99 errors
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx/ {print $5}' <<<"$out")
  printf "| %-28s | %5s | %10s | %9s | %9s | %s\n" "$name" "$conns" "$rps" "$p50" "$p99" "${errors:-0} non-2xx"
}

echo "| target                       | conns |      req/s |       p50 |       p99 |"
echo "|------------------------------|-------|------------|-----------|-----------|"
run "direct upstream"             "http://$UP/free"    "$CONNS"
run "nginx reverse proxy"         "http://$NGINX/free" "$CONNS"
run "bare Pingora proxy"          "http://$BARE/free"  "$CONNS"
run "tollgate free route"         "http://$GATE/free"  "$CONNS"
split -n l/4 "$WORK/payments.txt" "$WORK/pay."
run "tollgate paid route (x402)"  "http://$GATE/paid"  "$CONNS" --payments "$WORK/pay.aa"
run "tollgate paid, deferred"     "http://$GATE/deferred" "$CONNS" --payments "$WORK/pay.ac"
run "tollgate prepaid route"      "http://$GATE/prepaid" "$CONNS" --key "$KEY"
run "direct upstream, paced"      "http://$UP/free"    "$MODERATE" --paced
run "tollgate free route, paced"  "http://$GATE/free"  "$MODERATE" --paced
run "tollgate paid route, paced"  "http://$GATE/paid"  "$MODERATE" --payments "$WORK/pay.ab" --paced
run "tollgate deferred, paced"    "http://$GATE/deferred" "$MODERATE" --payments "$WORK/pay.ad" --paced
run "tollgate prepaid, paced"     "http://$GATE/prepaid" "$MODERATE" --key "$KEY" --paced
echo
# Deferred payments settle after the run: wait for the queue to drain, then count them.
for _ in $(seq 120); do
  OPEN=$(curl -sf "http://$OPS/metrics" | awk '/^tollgate_payments_open\{/ {s += $2} END {print s + 0}')
  [ "$OPEN" = 0 ] && break; sleep 1
done
curl -sf "http://$OPS/metrics" | grep -E '^tollgate_(ledger_facts_total\{state="(confirmed|failed|unresolved)"\}|settlement_bundles_total|payments_open\{state="queued"\})'
echo "tollgate RSS after the run: $(ps -o rss= -p "$(pgrep -f "tollgate run --config $WORK")" | awk '{printf "%.1f MiB", $1/1024}')"
