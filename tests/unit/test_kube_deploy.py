"""deploy/: every manifest parses, has the kinds and shape kube-proxy's need, and runs our CLI.

No addresses: nothing is contacted (the manifests' 10.96.0.10 / 10.244.0.0/16
are only read).
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest
import yaml

from kubelab.proxy.configfile import load_config_file

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def docs() -> list[dict]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                doc["_file"] = path.name
                out.append(doc)
    return out


def one(kind: str, name: str) -> dict:
    (doc,) = [d for d in docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_every_manifest_is_a_kubernetes_object():
    kinds = {}
    for d in docs():
        assert {"apiVersion", "kind", "metadata"} <= set(d), d.get("_file")
        assert d["metadata"].get("name"), d
        kinds.setdefault(d["_file"], []).append(d["kind"])
    assert sorted(kinds["kubelab-proxy.yaml"]) == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"])
    assert sorted(kinds["kubelab-dns.yaml"]) == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"])
    api_versions = {"ServiceAccount": "v1", "ConfigMap": "v1", "Service": "v1", "DaemonSet": "apps/v1",
                    "Deployment": "apps/v1", "ClusterRole": "rbac.authorization.k8s.io/v1",
                    "ClusterRoleBinding": "rbac.authorization.k8s.io/v1"}
    for d in docs():
        assert d["apiVersion"] == api_versions[d["kind"]], d["metadata"]["name"]
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == "kube-system"


RBAC = [
    ("kubelab-proxy", {("", "services"): {"list", "watch"},
                       ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
                       ("", "endpoints"): {"list", "watch"},
                       ("", "nodes"): {"list", "watch"},
                       ("events.k8s.io", "events"): {"create"}}),
    ("kubelab-dns", {("", "services"): {"list", "watch"}, ("", "pods"): {"list", "watch"},
                     ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
                     ("", "endpoints"): {"list", "watch"}}),
]


@pytest.mark.parametrize("name,expected", RBAC, ids=[r[0] for r in RBAC])
def test_rbac_verbs(name, expected):
    got: dict[tuple[str, str], set[str]] = {}
    for rule in one("ClusterRole", name)["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                got.setdefault((group, res), set()).update(rule["verbs"])
    assert got == expected
    binding = one("ClusterRoleBinding", name)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
    (subject,) = binding["subjects"]
    assert one("ServiceAccount", subject["name"])["metadata"]["namespace"] == subject["namespace"]


def test_daemonset_is_shaped_like_kube_proxy():
    ds = one("DaemonSet", "kubelab-proxy")
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "Default"  # cluster DNS needs this very proxy first
    assert spec["serviceAccountName"] == "kubelab-proxy"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is True
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["/lib/modules"].get("readOnly") is True
    assert volumes[mounts["/lib/modules"]["name"]]["hostPath"]["path"] == "/lib/modules"
    lock = volumes[mounts["/run/xtables.lock"]["name"]]["hostPath"]
    assert lock == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["livenessProbe"]["httpGet"]["port"] == 10256


def _expand(argv: list[str], env: dict[str, str]) -> list[str]:
    # The kubelet's $(VAR) expansion in command/args.
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in argv]


COMMANDS = [("DaemonSet", "kubelab-proxy", "proxy"), ("Deployment", "kubelab-dns", "dns")]


@pytest.mark.parametrize("kind,name,sub", COMMANDS, ids=[c[2] for c in COMMANDS])
def test_container_command_parses_with_our_cli(kind, name, sub, tmp_path):
    from kubelab.cli import COMMANDS as TABLE

    (c,) = one(kind, name)["spec"]["template"]["spec"]["containers"]
    argv = _expand(c["command"] + c.get("args", []), {"NODE_NAME": "node-a"})
    assert argv[:2] == ["kubelab", sub]
    module = importlib.import_module(TABLE[sub][0])
    parser = argparse.ArgumentParser(prog=f"kubelab {sub}", exit_on_error=False)
    module.add_arguments(parser)
    args = parser.parse_args(argv[2:])
    assert args.in_cluster is True
    if sub == "proxy":
        assert args.hostname_override == "node-a"
        # The config file the DaemonSet mounts, as the container will see it.
        (cm,) = [d for d in docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kubelab-proxy"]
        conf = tmp_path / "config.conf"
        conf.write_text(cm["data"]["config.conf"])
        config, given = load_config_file(conf)
        assert config.proxy_mode == "iptables" and "cluster_cidr" in given
        assert args.config == "/var/lib/kubelab-proxy/config.conf"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert str(Path(args.config).parent) in mounts
    else:
        assert args.pods == "verified"


def test_kube_dns_service_selects_the_deployment():
    svc = one("Service", "kube-dns")
    dep = one("Deployment", "kubelab-dns")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    # CoreDNS's Deployment selects k8s-app: kube-dns; ours must not (nor be selected by it).
    assert dep["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "kubelab-dns"}
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]}
    assert {(53, "UDP"), (53, "TCP")} <= ports
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert dep["spec"]["template"]["spec"]["dnsPolicy"] == "Default"  # never resolve through itself
    assert {p["containerPort"] for p in c["ports"]} >= {53}


def test_containerfile_installs_kernel_tools_and_the_package():
    text = (DEPLOY / "Containerfile").read_text()
    for pkg in ("iptables", "ipset", "conntrack", "kmod", "python3"):
        assert re.search(rf"\b{pkg}\b", text), pkg
    assert "COPY kubelab" in text and "pip install" in text
    assert (DEPLOY / "README.md").read_text().count("kubectl -n kube-system patch ds kube-proxy") == 2
