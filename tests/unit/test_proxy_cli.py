"""``kubelab proxy`` end to end, as a subprocess: files source -> controller -> dataplane, plus curl.

Runs ``python -m kubelab proxy`` on a temp folder of manifests with the
EchoDataplane (tests/unit/test_proxy_cli_mode.py, loaded via --mode-class),
edits the folder and waits for the next sync's output, and asks /metrics and
/healthz with the real ``curl``.  No root needed: nothing touches the kernel.

Addresses: 127.0.0.1 (metrics/healthz servers on free ports); 172.30.0.0/16
(cluster IPs) and 10.244.0.0/16 (endpoints) appear only as data.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parent.parent
WAIT = 60.0  # generous: CI shares 2 cores with other suites; nothing is timed

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
  labels:
    app: web
spec:
  type: ClusterIP
  clusterIP: 172.30.0.10
  clusterIPs:
  - 172.30.0.10
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  internalTrafficPolicy: Cluster
  selector:
    app: web
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
  sessionAffinity: None
status:
  loadBalancer: {}
"""

SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: default
  labels:
    kubernetes.io/service-name: web
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
endpoints:
- addresses:
  - 10.244.1.5
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node-1
- addresses:
  - 10.244.2.7
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node-2
ports:
- name: http
  port: 8080
  protocol: TCP
"""

DB = """\
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: default
spec:
  clusterIP: 172.30.0.20
  clusterIPs: [172.30.0.20]
  ports:
  - name: pg
    port: 5432
    protocol: TCP
    targetPort: 5432
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: default
  labels:
    kubernetes.io/service-name: db
addressType: IPv4
endpoints:
- addresses: [10.244.3.3]
  conditions: {ready: true}
ports:
- name: pg
  port: 5432
  protocol: TCP
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kubelab(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kubelab", "proxy", *args], capture_output=True, text=True, env=_env(), timeout=timeout
    )


class Proxy:
    """A running ``kubelab proxy``; stdout and stderr lines are collected by threads."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kubelab", "proxy", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False), daemon=True).start()

    def _pump(self, stream, sink, to_queue):
        for line in stream:
            sink.append(line.rstrip("\n"))
            if to_queue:
                self.out.put(line.rstrip("\n"))

    def wait_for_render(self, predicate, what: str) -> list[str]:
        """Collect stdout into renders (split at the watch header) until one satisfies predicate."""
        deadline = time.monotonic() + WAIT
        render: list[str] = []
        while time.monotonic() < deadline:
            try:
                line = self.out.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                if render and predicate(render):
                    return render
                continue
            if line.startswith("# kubelab proxy --dry-run: sync"):
                if render and predicate(render):
                    return render
                render = []
                continue
            render.append(line)
        if render and predicate(render):
            return render
        raise AssertionError(f"no sync with {what} within {WAIT}s; stdout={self.stdout[-20:]} stderr={self.stderr[-20:]}")

    def wait_for_log(self, text: str) -> str:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for line in list(self.stderr):
                if text in line:
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"no log line with {text!r}; stderr={self.stderr[-30:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode


def curl(url: str) -> tuple[int, str]:
    r = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "--max-time", "30", url],
        capture_output=True, text=True, timeout=WAIT,
    )
    assert r.returncode == 0, r.stderr
    body, _, code = r.stdout.rpartition("\n")
    return int(code), body


@pytest.fixture
def manifests(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "web.yaml").write_text(SERVICE + "---\n" + SLICE)
    return d


MODE = ["--mode-class", "test_proxy_cli_mode:EchoDataplane"]


def test_watch_edit_metrics_healthz(manifests):
    mport, hport = free_port(), free_port()
    proxy = Proxy(
        "--source", str(manifests), "--dry-run", "--watch", *MODE, "--hostname-override", "node-1",
        "--min-sync-period", "100ms", "--metrics-bind-address", f"127.0.0.1:{mport}",
        "--healthz-bind-address", f"127.0.0.1:{hport}",
    )
    try:
        first = proxy.wait_for_render(lambda r: any("default/web:http" in line for line in r), "the web service")
        assert first == ["SVC default/web:http 172.30.0.10:80/TCP -> 10.244.1.5:8080 10.244.2.7:8080"]
        proxy.wait_for_log("synced 1 services, 2 endpoints in ")

        # A new file in the folder becomes a sync (no timing asserted; generous wait).
        (manifests / "db.yaml").write_text(DB)
        second = proxy.wait_for_render(lambda r: any("default/db:pg" in line for line in r), "the db service")
        assert "SVC default/db:pg 172.30.0.20:5432/TCP -> 10.244.3.3:5432" in second
        assert any("default/web:http" in line for line in second)

        # An edit (one endpoint gone) and a deletion.  The slice carries the
        # endpoints controller's trigger-time annotation, which is what feeds
        # kubeproxy_network_programming_duration_seconds.
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # after the tracker started
        edited = SLICE.replace("  - 10.244.2.7\n", "  - 10.244.2.8\n").replace(
            "  labels:\n", f"  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{now}\"\n  labels:\n", 1)
        (manifests / "web.yaml").write_text(SERVICE + "---\n" + edited)
        proxy.wait_for_render(lambda r: any("10.244.2.8:8080" in line for line in r), "the edited endpoint")
        (manifests / "db.yaml").unlink()
        proxy.wait_for_render(lambda r: r and not any("default/db" in line for line in r), "db deleted")

        code, body = curl(f"http://127.0.0.1:{mport}/metrics")
        assert code == 200
        samples = dict(
            line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#") and " " in line
        )
        assert float(samples["kubeproxy_sync_proxy_rules_duration_seconds_count"]) >= 4
        assert float(samples["kubeproxy_sync_proxy_rules_service_changes_total"]) >= 3
        assert float(samples["kubeproxy_sync_proxy_rules_endpoint_changes_total"]) >= 3
        assert float(samples["kubeproxy_sync_proxy_rules_last_timestamp_seconds"]) > 1.6e9
        assert "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"}" in samples
        assert float(samples["kubeproxy_network_programming_duration_seconds_count"]) >= 1
        assert float(samples["kubeproxy_sync_proxy_rules_service_changes_pending"]) == 0
        assert float(samples["kubeproxy_sync_proxy_rules_endpoint_changes_pending"]) == 0

        code, body = curl(f"http://127.0.0.1:{hport}/healthz")
        health = json.loads(body)
        assert code == 200 and set(health) == {"lastUpdated", "currentTime", "nodeEligible"}
        # Go's time.Time.String() of time.Now(), monotonic reading included, as kube-proxy prints it
        go_now = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \+0000 UTC m=\+\d+\.\d{9}"
        assert health["nodeEligible"] is True and re.fullmatch(go_now, health["currentTime"]), body
        assert health["lastUpdated"] == health["currentTime"]  # kube-proxy: "now" while healthy
        assert curl(f"http://127.0.0.1:{hport}/livez")[0] == 200
        assert curl(f"http://127.0.0.1:{mport}/healthz") == (200, "ok")
        assert curl(f"http://127.0.0.1:{mport}/proxyMode") == (200, "iptables")
    finally:
        code = proxy.stop()
    assert code == 0, proxy.stderr[-20:]


def test_broken_files_keep_last_good(manifests):
    proxy = Proxy("--source", str(manifests), "--dry-run", "--watch", *MODE, "--min-sync-period", "100ms",
                  "--metrics-bind-address", "", "--healthz-bind-address", "")
    web_rule = "SVC default/web:http 172.30.0.10:80/TCP -> 10.244.1.5:8080 10.244.2.7:8080"
    try:
        proxy.wait_for_render(lambda r: any("default/web:http" in line for line in r), "the web service")
        # An invalid object next to good ones: named by file, line, object and field; others still served.
        (manifests / "db.yaml").write_text(DB.replace("port: 5432\n    protocol: TCP\n    targetPort",
                                                      "port: 70000\n    protocol: TCP\n    targetPort", 1))
        line = proxy.wait_for_log("Service default/db")
        assert "db.yaml:1: " in line and "spec.ports[0].port" in line and "70000" in line and "(line 11)" in line
        # A served object edited into an invalid one (new port, bad affinity): its last good version stays.
        (manifests / "web.yaml").write_text(
            SERVICE.replace("port: 80\n", "port: 81\n").replace("sessionAffinity: None", "sessionAffinity: Sticky")
            + "---\n" + SLICE)
        line = proxy.wait_for_log("Service default/web")
        assert "web.yaml:1: " in line and "spec.sessionAffinity" in line and "Sticky" in line
        (manifests / "extra.yaml").write_text(DB.replace("db", "db2").replace("172.30.0.20", "172.30.0.21"))
        render = proxy.wait_for_render(lambda r: any("default/db2:pg" in x for x in r), "db2 after the invalid edits")
        assert web_rule in render and not any(":81/TCP" in x for x in render)
        assert not any("default/db:pg" in x for x in render)
        # Break the web file's YAML: its objects stay as they were (last good), nothing is deleted.
        (manifests / "web.yaml").write_text(SERVICE + "---\nkind: [\n")
        line = proxy.wait_for_log("cannot parse")
        assert "web.yaml:" in line
        (manifests / "extra2.yaml").write_text(DB.replace("db", "db3").replace("172.30.0.20", "172.30.0.22"))
        render = proxy.wait_for_render(lambda r: any("default/db3:pg" in x for x in r), "db3 after the broken YAML")
        assert web_rule in render and any("default/db2:pg" in x for x in render)
        assert not any("default/db:pg" in x for x in render)
        assert proxy.proc.poll() is None
    finally:
        code = proxy.stop()
    assert code == 0


def test_one_shot_dry_run_prints_and_exits(manifests):
    r = kubelab("--source", str(manifests), "--dry-run", *MODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "SVC default/web:http 172.30.0.10:80/TCP -> 10.244.1.5:8080 10.244.2.7:8080\n"
    assert "synced 1 services, 2 endpoints in" in r.stderr and "(full)" in r.stderr


def test_config_file_and_flag_override(manifests, tmp_path):
    cfg = tmp_path / "kube-proxy.yaml"
    cfg.write_text(textwrap.dedent("""\
        apiVersion: kubeproxy.config.k8s.io/v1alpha1
        kind: KubeProxyConfiguration
        mode: ipvs
        hostnameOverride: from-file
        iptables:
          minSyncPeriod: 2s
          syncPeriod: 1m0s
        """))
    r = kubelab("--config", str(cfg), "--proxy-mode", "iptables", "--source", str(manifests), "--dry-run", *MODE)
    assert r.returncode == 0, r.stderr
    assert "iptables mode on node from-file" in r.stderr and "min-sync-period 2s, sync-period 60s" in r.stderr


# config.conf of kubeadm's kube-proxy ConfigMap (`kubectl -n kube-system get cm
# kube-proxy -o yaml`), as a v1.30 cluster carries it, switched to IPVS.
KUBEADM_CONFIG_CONF = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: node-a
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: lc
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ipvs
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"""


def test_kubeadm_config_conf_drives_a_real_mode(tmp_path):
    """A real KubeProxyConfiguration alone picks mode, node, scheduler and servers (no flags but the source)."""
    cfg = tmp_path / "config.conf"
    cfg.write_text(KUBEADM_CONFIG_CONF)
    r = kubelab("--config", str(cfg), "--source", str(REPO / "examples" / "basic"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "kubelab proxy ipvs mode on node node-a" in r.stderr
    assert "-A -t 10.96.100.10:80 -s lc" in r.stdout  # default/web, with the file's scheduler
    # kube-proxy's defaulting of the file's zeros, blanks and nulls
    assert "min-sync-period 0s, sync-period 30s" in r.stderr  # ipvs: minSyncPeriod 0 stays 0, syncPeriod 0 is 30s
    cfg_ = proxy_cli.build_config(_parse("--config", str(cfg)))
    assert (cfg_.metrics_bind_address, cfg_.healthz_bind_address) == ("127.0.0.1:10249", "0.0.0.0:10256")
    assert cfg_.cluster_cidr == ("10.244.0.0/16",) and cfg_.masquerade_bit == 14 and cfg_.config_sync_period == 900
    # an explicit flag "" still disables a server
    assert proxy_cli.build_config(_parse("--config", str(cfg), "--metrics-bind-address", "")).metrics_bind_address == ""


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--min-sync-period", "1 minute"], 2, "invalid duration"),
        (["--nodeport-addresses", "eth0"], 2, "'eth0' is not a CIDR"),
        (["--masquerade-all=maybe"], 2, "invalid boolean"),
        (["--watch"], 2, "--watch only makes sense with --dry-run"),
        (["--dry-run"], 2, "no source of objects: give --source PATH"),
        (["--source", ".", "--kubeconfig", "k"], 2, "not both"),
        (["--min-sync-period", "1m", "--sync-period", "30s"], 2, "--sync-period (30s) must be greater than or equal"),
        (["--config", "/nonexistent/kp.yaml"], 2, "cannot read --config file"),
        (["--proxy-mode", "kernelspace"], 2, "invalid choice"),
        (["--kubeconfig", "/nonexistent/kc", "--dry-run"], 2, "--kubeconfig /nonexistent/kc: no such file"),
    ],
    ids=["duration", "cidr", "bool", "watch", "no-source", "two-sources", "min-above-sync", "config-missing", "mode",
         "kubeconfig-missing"],
)
def test_bad_flags_say_how_to_fix(args, code, message):
    r = kubelab(*args)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert message in r.stderr


def test_bad_config_file_names_file_line_field(tmp_path):
    cfg = tmp_path / "kp.yaml"
    cfg.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nipvs:\n  schedular: rr\n")
    r = kubelab("--config", str(cfg), "--dry-run", "--source", str(tmp_path))
    assert r.returncode == 2
    assert f"{cfg}:4: unknown field 'ipvs.schedular'" in r.stderr


def test_unusable_kubeconfig_is_a_clear_error(tmp_path):
    kc = tmp_path / "kubeconfig"
    kc.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    r = kubelab("--kubeconfig", str(kc), "--dry-run", *MODE, "--metrics-bind-address", "")
    assert r.returncode == 1
    assert f"kubelab proxy: error: the source of objects failed: KubeConfigError: --kubeconfig {kc}" in r.stderr
    assert "Traceback" not in r.stderr


def test_cleanup_calls_the_mode():
    r = kubelab("--cleanup", *MODE)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ECHO cleanup\n"


def test_help_explains():
    r = subprocess.run([sys.executable, "-m", "kubelab", "proxy", "--help"], capture_output=True, text=True, env=_env())
    assert r.returncode == 0
    for text in ["--proxy-mode", "--source PATH", "--dry-run", "--metrics-bind-address", "examples:", "10249/metrics"]:
        assert text in r.stdout


def test_help_explains_every_flag():
    """Every flag a user can give has a help line that says what it does (and its default, where it has one)."""
    import argparse

    parser = argparse.ArgumentParser()
    proxy_cli.add_arguments(parser)
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS and a.dest != "help"]
    assert len(shown) >= 25
    for action in shown:
        flag = action.option_strings[0]
        assert action.help and len(action.help.split()) >= 6, f"{flag}: help too short: {action.help!r}"
        if action.type is not None or action.choices:  # takes a value: say the default (or that there is none)
            assert "default" in action.help or flag in ("--source", "--kubeconfig", "--master", "--context", "--config"), \
                f"{flag}: no default in {action.help!r}"


# ---------------------------------------------------------------- in-process helpers

from kubelab.proxy import cli as proxy_cli  # noqa: E402

ADDRS = ["127.0.0.1", "192.0.2.2", "198.51.100.7", "::1", "fd00::2", "fe80::1%eth0"]


@pytest.mark.parametrize(
    "cidrs,expected",
    [
        ((), ("127.0.0.1", "192.0.2.2", "198.51.100.7", "::1", "fd00::2", "fe80::1")),
        (("192.0.2.0/24",), ("192.0.2.2",)),
        (("192.0.2.0/24", "fd00::/8"), ("192.0.2.2", "fd00::2")),
        (("127.0.0.0/8",), ("127.0.0.1",)),
        (("203.0.113.0/24",), ()),
        (("primary",), ("192.0.2.2", "fd00::2")),
    ],
    ids=["all", "one-block", "dual", "loopback", "none-match", "primary"],
)
def test_filter_node_ips(cidrs, expected):
    assert proxy_cli.filter_node_ips(ADDRS, cidrs) == expected


def _parse(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    proxy_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv,field,expected",
    [
        (["--proxy-mode", "ipvs"], "proxy_mode", "ipvs"),
        (["--masquerade-all"], "masquerade_all", True),
        (["--masquerade-all=false"], "masquerade_all", False),
        (["--cluster-cidr", "10.244.0.0/16,fd00:244::/48"], "cluster_cidr", ("10.244.0.0/16", "fd00:244::/48")),
        (["--nodeport-addresses", "192.0.2.0/24"], "nodeport_addresses", ("192.0.2.0/24",)),
        (["--min-sync-period", "250ms"], "min_sync_period", 0.25),
        (["--sync-period", "1m0s"], "sync_period", 60.0),
        (["--v", "4"], "verbosity", 4),
        (["--ipvs-scheduler", "lc"], "ipvs_scheduler", "lc"),
        (["--iptables-masquerade-bit", "10"], "masquerade_bit", 10),
        ([], "metrics_bind_address", "127.0.0.1:10249"),
        ([], "healthz_bind_address", "0.0.0.0:10256"),
        (["--healthz-bind-address", ""], "healthz_bind_address", ""),
    ],
    ids=lambda v: str(v),
)
def test_flags_to_config(argv, field, expected):
    assert getattr(proxy_cli.build_config(_parse(*argv)), field) == expected


def test_node_name_is_lowercased_override():
    assert proxy_cli.node_name(proxy_cli.build_config(_parse("--hostname-override", " Node-A "))) == "node-a"


@pytest.mark.parametrize("mode", ["iptables", "ipvs", "userspace"])
def test_real_modes_dry_run_the_example(mode):
    """The issue's done-when: each mode prints what it would program for examples/basic."""
    r = kubelab("--proxy-mode", mode, "--source", str(REPO / "examples" / "basic"), "--dry-run",
                "--hostname-override", "node-a")
    assert r.returncode == 0, r.stderr
    assert "10.96.100.10" in r.stdout  # default/web's cluster IP
    assert re.search(r"synced \d+ services, \d+ endpoints in \d+ ms \(full\)", r.stderr)
