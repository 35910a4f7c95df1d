"""KubeProxyConfiguration files: Go durations, field mapping, strict errors, flags over the file.

Addresses: 10.244.0.0/16, fd00:244::/48 (cluster CIDRs), 192.0.2.0/24
(nodePortAddresses / excludeCIDRs); data only.
"""

from __future__ import annotations

import textwrap

import pytest

from kubelab.proxy.config import ProxyConfig
from kubelab.proxy.configfile import ConfigError, load_config_file, merge_flags, parse_config, parse_duration

HEADER = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"

# The defaulted v1alpha1 file kube-proxy itself writes (--write-config-to), trimmed of nothing.
KUBE_PROXY_DEFAULTS = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: ""
  qps: 5
clusterCIDR: ""
configSyncPeriod: 15m0s
conntrack:
  maxPerCore: 32768
  min: 131072
  tcpBeLiberal: false
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  localhostNodePorts: true
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 1s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  ipSet:
    hashSize: 1024
    maxElements: 65536
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 5s
  format: text
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 127.0.0.1:10249
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"""


@pytest.mark.parametrize(
    "text,seconds",
    [("30s", 30), ("1m0s", 60), ("1h30m", 5400), ("250ms", 0.25), ("1.5s", 1.5), ("0", 0), ("0s", 0),
     ("24h0m0s", 86400), ("100us", 1e-4), ("-1s", -1), ("2h45m30.5s", 9930.5)],
    ids=lambda v: str(v),
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["30", "1 m", "1d", "s", "", "1m0", 30], ids=lambda v: repr(v))
def test_parse_duration_errors(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_kube_proxy_written_defaults_load_as_our_defaults():
    cfg, given = parse_config(KUBE_PROXY_DEFAULTS, "kube-proxy.yaml")
    defaults = ProxyConfig()
    for name in given:
        assert getattr(cfg, name) == getattr(defaults, name), name


FIELDS = [
    # (id, yaml body, ProxyConfig field, expected)
    ("mode", "mode: ipvs", "proxy_mode", "ipvs"),
    ("cluster-cidr", "clusterCIDR: 10.244.0.0/16", "cluster_cidr", ("10.244.0.0/16",)),
    ("cluster-cidr-dual", "clusterCIDR: 10.244.0.0/16,fd00:244::/48", "cluster_cidr", ("10.244.0.0/16", "fd00:244::/48")),
    ("hostname-override", "hostnameOverride: ' node-a '", "hostname_override", "node-a"),
    ("bind-address", "bindAddress: '::'", "bind_address", "::"),
    ("healthz", "healthzBindAddress: 127.0.0.1:12256", "healthz_bind_address", "127.0.0.1:12256"),
    ("metrics", "metricsBindAddress: '[::1]:12249'", "metrics_bind_address", "[::1]:12249"),
    ("nodeport-addresses", "nodePortAddresses: [192.0.2.0/24]", "nodeport_addresses", ("192.0.2.0/24",)),
    ("nodeport-primary", "nodePortAddresses: [primary]", "nodeport_addresses", ("primary",)),
    ("masquerade-all", "iptables: {masqueradeAll: true}", "masquerade_all", True),
    ("masquerade-bit", "iptables: {masqueradeBit: 10}", "masquerade_bit", 10),
    ("iptables-sync", "iptables: {syncPeriod: 1m0s, minSyncPeriod: 500ms}", "sync_period", 60.0),
    ("iptables-min-sync", "iptables: {syncPeriod: 1m0s, minSyncPeriod: 500ms}", "min_sync_period", 0.5),
    ("localhost-nodeports", "iptables: {localhostNodePorts: false}", "iptables_localhost_nodeports", False),
    ("ipvs-scheduler", "ipvs: {scheduler: sh}", "ipvs_scheduler", "sh"),
    ("ipvs-sync-for-ipvs-mode", "mode: ipvs\nipvs: {syncPeriod: 45s, minSyncPeriod: 0s}", "sync_period", 45.0),
    ("ipvs-min-sync-zero", "mode: ipvs\nipvs: {syncPeriod: 45s, minSyncPeriod: 0s}", "min_sync_period", 0.0),
    # kube-proxy's defaulting (SetDefaults_KubeProxyConfiguration): zero is "the default" ...
    ("ipvs-zero-sync-is-30s", "mode: ipvs\niptables: {syncPeriod: 20s}\nipvs: {syncPeriod: 0s}", "sync_period", 30.0),
    ("ipvs-min-sync-defaults-to-zero", "mode: ipvs\niptables: {minSyncPeriod: 2s}", "min_sync_period", 0.0),
    ("iptables-zero-min-sync-is-1s", "iptables: {minSyncPeriod: 0s, syncPeriod: 0s}", "min_sync_period", 1.0),
    ("iptables-zero-sync-is-30s", "iptables: {minSyncPeriod: 0s, syncPeriod: 0s}", "sync_period", 30.0),
    ("config-sync-zero-is-15m", "configSyncPeriod: 0s", "config_sync_period", 900.0),
    ("udp-idle-zero-is-250ms", "udpIdleTimeout: 0s", "udp_idle_timeout", 0.25),
    ("healthz-blank-is-default", "healthzBindAddress: ''", "healthz_bind_address", "0.0.0.0:10256"),
    ("metrics-blank-is-default", "metricsBindAddress: ''", "metrics_bind_address", "127.0.0.1:10249"),
    ("healthz-blank-v6-bind", "bindAddress: '::'\nhealthzBindAddress: ''", "healthz_bind_address", "[::]:10256"),
    ("metrics-blank-v6-bind", "bindAddress: '::'\nmetricsBindAddress: ''", "metrics_bind_address", "[::1]:10249"),
    ("healthz-bare-ip-gets-port", "healthzBindAddress: 0.0.0.0", "healthz_bind_address", "0.0.0.0:10256"),
    ("metrics-bare-v6-gets-port", "metricsBindAddress: '::1'", "metrics_bind_address", "[::1]:10249"),
    # ... and null is "not set" (kubeadm writes these)
    ("null-masquerade-bit", "iptables: {masqueradeBit: null}", "masquerade_bit", 14),
    ("null-conntrack", "conntrack: {maxPerCore: null, tcpCloseWaitTimeout: null}", "conntrack_tcp_timeout_close_wait",
     ProxyConfig().conntrack_tcp_timeout_close_wait),
    ("null-oom", "oomScoreAdj: null", "proxy_mode", "iptables"),
    ("ipvs-sync-ignored-in-iptables-mode", "ipvs: {syncPeriod: 45s}", "sync_period", 30.0),
    ("strict-arp", "ipvs: {strictARP: true}", "ipvs_strict_arp", True),
    ("exclude-cidrs", "ipvs: {excludeCIDRs: [192.0.2.0/24]}", "ipvs_exclude_cidrs", ("192.0.2.0/24",)),
    ("ipvs-timeouts", "ipvs: {tcpTimeout: 15m, tcpFinTimeout: 30s, udpTimeout: 5s}", "ipvs_tcpfin_timeout", 30.0),
    ("detect-local-mode", "detectLocalMode: InterfaceNamePrefix", "detect_local_mode", "InterfaceNamePrefix"),
    ("detect-local-prefix", "detectLocal: {interfaceNamePrefix: veth}", "interface_name_prefix", "veth"),
    ("detect-local-bridge", "detectLocal: {bridgeInterface: cbr0}", "bridge_interface", "cbr0"),
    ("conntrack", "conntrack: {tcpEstablishedTimeout: 1h0m0s}", "conntrack_tcp_timeout_established", 3600.0),
    ("feature-gates", "featureGates: {PreferSameTrafficDistribution: false}", "feature_gates",
     {"PreferSameTrafficDistribution": False}),
    ("verbosity", "logging: {verbosity: 4}", "verbosity", 4),
    ("nftables-sync", "mode: nftables\nnftables: {syncPeriod: 10s, masqueradeAll: true}", "masquerade_all", True),
]


@pytest.mark.parametrize("body,field,expected", [f[1:] for f in FIELDS], ids=[f[0] for f in FIELDS])
def test_fields(body, field, expected):
    cfg, given = parse_config(HEADER + body + "\n", "c.yaml")
    assert getattr(cfg, field) == expected
    if field in given:
        return
    assert getattr(ProxyConfig(), field) == expected  # not given: the default stands


ERRORS = [
    # (id, yaml body, substrings of the error)
    ("unknown-top", "modee: ipvs", ["c.yaml:3", "unknown field 'modee'", "known fields here", "mode"]),
    ("unknown-nested", "ipvs:\n  schedular: rr", ["c.yaml:4", "unknown field 'ipvs.schedular'", "scheduler"]),
    ("bad-duration", "iptables:\n  syncPeriod: 30", ["c.yaml:4", "iptables.syncPeriod", '"30s"']),
    ("bad-duration-text", "configSyncPeriod: 15 minutes", ["c.yaml:3", "configSyncPeriod", "invalid duration"]),
    ("bad-mode", "mode: kernelspace", ["mode", "must be one of iptables, ipvs, userspace, nftables"]),
    ("bad-scheduler", "ipvs: {scheduler: fastest}", ["ipvs.scheduler", "'fastest'", "rr"]),
    ("bad-bit", "iptables: {masqueradeBit: 32}", ["iptables.masqueradeBit", "[0, 31]"]),
    ("bad-cidr", "clusterCIDR: 10.244.0.0/33", ["clusterCIDR", "valid CIDR"]),
    ("two-v4-cidrs", "clusterCIDR: 10.0.0.0/8,10.1.0.0/16", ["one IPv4 and one IPv6"]),
    ("bad-bind", "bindAddress: localhost", ["bindAddress", "not a valid IP address"]),
    ("bad-healthz", "healthzBindAddress: localhost:10256", ["healthzBindAddress", "must be a valid IP"]),
    ("bad-healthz-host", "healthzBindAddress: localhost", ["healthzBindAddress", "must be IP:port or IP"]),
    ("bad-healthz-port", "healthzBindAddress: 0.0.0.0:99999", ["must be 1-65535"]),
    ("bad-nodeport-addresses", "nodePortAddresses: [eth0]", ["nodePortAddresses", "'eth0' is not a valid IP block"]),
    ("wrong-type-bool", "iptables: {masqueradeAll: 'yes'}", ["iptables.masqueradeAll", "true or false"]),
    ("section-not-mapping", "ipvs: rr", ["ipvs must be a mapping"]),
    ("min-above-sync", "iptables: {syncPeriod: 1s, minSyncPeriod: 5s}", ["iptables.syncPeriod (1s)", "minSyncPeriod (5s)"]),
    ("bad-gate", "featureGates: {Foo: 1}", ["feature gate 'Foo' must be true or false"]),
    ("oom", "oomScoreAdj: -2000", ["oomScoreAdj", "[-1000, 1000]"]),
]


@pytest.mark.parametrize("body,parts", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(body, parts):
    with pytest.raises(ConfigError) as e:
        parse_config(HEADER + body + "\n", "c.yaml")
    for part in parts:
        assert part in str(e.value)


@pytest.mark.parametrize(
    "text,parts",
    [
        ("apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n", ["c.yaml:1", "v1beta1", "v1alpha1"]),
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n", ["c.yaml:2", "KubeletConfiguration"]),
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: [\n", ["c.yaml:", "not valid YAML"]),
        ("- a\n- b\n", ["expected a KubeProxyConfiguration mapping"]),
    ],
    ids=["api-version", "kind", "broken-yaml", "list"],
)
def test_document_errors(text, parts):
    with pytest.raises(ConfigError) as e:
        parse_config(text, "c.yaml")
    for part in parts:
        assert part in str(e.value)


def test_load_file_and_missing_file(tmp_path):
    p = tmp_path / "kube-proxy.yaml"
    p.write_text(HEADER + textwrap.dedent("""\
        mode: ipvs
        ipvs:
          scheduler: lc
        """))
    cfg, given = load_config_file(p)
    assert (cfg.proxy_mode, cfg.ipvs_scheduler) == ("ipvs", "lc")
    with pytest.raises(ConfigError, match="cannot read --config file"):
        load_config_file(tmp_path / "nope.yaml")


def test_flags_override_file():
    cfg, _ = parse_config(HEADER + "mode: ipvs\nclusterCIDR: 10.244.0.0/16\niptables: {masqueradeAll: true}\n")
    merged = merge_flags(cfg, {"proxy_mode": "iptables", "masquerade_all": None, "cluster_cidr": None})
    assert merged.proxy_mode == "iptables"  # flag given: wins
    assert merged.masquerade_all is True  # flag not given: file stands
    assert merged.cluster_cidr == ("10.244.0.0/16",)


def test_mode_override_picks_the_section():
    """--proxy-mode over a file written for another mode: that mode's section applies, as in kube-proxy."""
    text = HEADER + "mode: ipvs\niptables: {minSyncPeriod: 2s, syncPeriod: 1m0s}\nipvs: {minSyncPeriod: 0s, syncPeriod: 45s}\n"
    as_ipvs, _ = parse_config(text)
    as_iptables, _ = parse_config(text, mode="iptables")
    assert (as_ipvs.min_sync_period, as_ipvs.sync_period) == (0.0, 45.0)
    assert (as_iptables.min_sync_period, as_iptables.sync_period) == (2.0, 60.0)


def test_flags_min_above_sync_is_an_error():
    with pytest.raises(ConfigError, match="--sync-period"):
        merge_flags(ProxyConfig(), {"min_sync_period": 60.0})
