#!/usr/bin/env python3
"""Checks the operations artifacts against the real binary (run by .ci/run after the tests).

1. Every Kubernetes manifest in examples/kubernetes validates (kubernetes-validate, strict).
2. The policy and config embedded in the ConfigMap pass `tollgate check`.
3. A running sidecar's /metrics parses as Prometheus text exposition (prometheus_client's
   parser) and exports every family the README lists.
4. Every metric the Grafana dashboard queries is one the sidecar exports.

Needs: pip install kubernetes-validate prometheus-client; target/debug/tollgate built.
"""
import glob
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "debug", "tollgate")
K8S = os.path.join(ROOT, "examples", "kubernetes")
FAMILIES = {
    "tollgate_requests", "tollgate_challenges", "tollgate_payments_verified",
    "tollgate_payments_rejected", "tollgate_revenue_atomic", "tollgate_credits_debited",
    "tollgate_credits_refunded", "tollgate_credits_sold", "tollgate_settlements",
    "tollgate_settlement_queue_depth", "tollgate_settlement_duration_seconds",
    "tollgate_verification_duration_seconds", "tollgate_upstream_duration_seconds",
    "tollgate_limit_refusals", "tollgate_policy_reloads", "tollgate_policy_info",
    "tollgate_store_size_bytes",
}


def fail(message):
    print(f"ops check failed: {message}", file=sys.stderr)
    sys.exit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def validate_manifests():
    files = sorted(glob.glob(os.path.join(K8S, "*.yaml")))
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *files])
    if result.returncode != 0:
        fail("a Kubernetes manifest does not validate")
    print(f"manifests: {len(files)} files valid")


def check_embedded(tmp):
    with open(os.path.join(K8S, "configmap.yaml")) as f:
        maps = {d["metadata"]["name"]: d for d in yaml.safe_load_all(f)}
    policy = os.path.join(tmp, "weather.toll")
    with open(policy, "w") as f:
        f.write(maps["weather-tollgate-policy"]["data"]["weather.toll"])
    config = os.path.join(tmp, "tollgate.yaml")
    with open(config, "w") as f:
        text = maps["weather-tollgate-config"]["data"]["tollgate.yaml"]
        f.write(text.replace("/etc/tollgate/policies", policy))
    env = dict(os.environ, TOLLGATE_ADMIN_TOKEN="x")
    result = subprocess.run([BIN, "check", "--config", config], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"the ConfigMap's policy or config does not check:\n{result.stdout}{result.stderr}")
    print("configmap: policy and tollgate.yaml check")


def scrape(tmp):
    ops, proxy = free_port(), free_port()
    config = os.path.join(tmp, "run.yaml")
    with open(config, "w") as f:
        f.write(
            f"listen: 127.0.0.1:{proxy}\n"
            f"policies: [{os.path.join(ROOT, 'policies', 'weather.toll')}]\n"
            f"store: {os.path.join(tmp, 'data')}\n"
            f"ops: {{ listen: 127.0.0.1:{ops} }}\n"
            f"admin: {{ listen: 127.0.0.1:{free_port()} }}\n"
        )
    proc = subprocess.Popen([BIN, "run", "--config", config], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ops}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                fail("the sidecar did not become ready")
            time.sleep(0.1)
        # A challenge and a malformed payment, so the per-request families have samples.
        for headers in ({}, {"payment-signature": "garbage"}):
            request = urllib.request.Request(f"http://127.0.0.1:{proxy}/v1/forecast/paris", headers=headers)
            try:
                urllib.request.urlopen(request, timeout=5)
            except urllib.error.HTTPError as e:
                if e.code not in (400, 402):
                    fail(f"unexpected {e.code} from the proxy")
        with urllib.request.urlopen(f"http://127.0.0.1:{ops}/metrics", timeout=5) as r:
            content_type = r.headers["content-type"]
            text = r.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if not content_type.startswith("text/plain; version=0.0.4"):
        fail(f"/metrics has content type {content_type}")
    names = {family.name for family in text_string_to_metric_families(text)}
    missing = FAMILIES - names
    if missing:
        fail(f"/metrics lacks {sorted(missing)}")
    print(f"metrics: {len(names)} families parse as Prometheus text format")
    return text


def check_dashboard(exposition):
    with open(os.path.join(K8S, "grafana-dashboard.json")) as f:
        dashboard = json.load(f)
    exported = set(re.findall(r"^(tollgate_[a-z_]+)", exposition, re.M))
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used.update(re.findall(r"tollgate_[a-z_]+", target["expr"]))
    unknown = sorted(used - exported)
    if unknown:
        fail(f"the dashboard queries metrics tollgate does not export: {unknown}")
    print(f"dashboard: {len(dashboard['panels'])} panels, {len(used)} metrics, all exported")


def main():
    if not os.path.exists(BIN):
        fail(f"{BIN} is missing: run cargo test (or cargo build) first")
    validate_manifests()
    with tempfile.TemporaryDirectory() as tmp:
        check_embedded(tmp)
        check_dashboard(scrape(tmp))


if __name__ == "__main__":
    main()
