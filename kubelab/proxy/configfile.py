"""Read a KubeProxyConfiguration file (``kubeproxy.config.k8s.io/v1alpha1``) into a ProxyConfig.

The file is the one a kube-proxy DaemonSet mounts from its ConfigMap, e.g.::

    apiVersion: kubeproxy.config.k8s.io/v1alpha1
    kind: KubeProxyConfiguration
    mode: ipvs
    clusterCIDR: 10.244.0.0/16
    ipvs:
      scheduler: lc
      syncPeriod: 1m0s

Decoding is strict, like kube-proxy's: an unknown field, a wrong type or a
bad value is an error naming the file, line, field path and what to write
instead.  Durations are Go duration strings (``"30s"``, ``"1m0s"``,
``"1h30m"``, ``"250ms"``).  Fields kube-proxy has but kubelab does not act on
(client connection tuning, OOM score, winkernel, ...) are accepted and
validated so real files load unchanged; :data:`UNUSED_FIELDS` lists them.

Defaulting is kube-proxy's (``SetDefaults_KubeProxyConfiguration``), so a
kubeadm ConfigMap, full of ``0s``, ``""`` and ``null``, means what it means to
kube-proxy: ``null`` is unset; ``healthzBindAddress``/``metricsBindAddress``
``""`` are the defaults (``0.0.0.0:10256``/``127.0.0.1:10249``, the IPv6
equivalents for an IPv6 ``bindAddress``), a bare IP gets the default port.

Which sync periods apply depends on the mode, as in kube-proxy:
``iptables.{syncPeriod,minSyncPeriod}`` for iptables and userspace (0 means
30s / 1s), ``ipvs.*`` for ipvs (syncPeriod 0 means 30s; minSyncPeriod 0 stays
0, kube-proxy's IPVS default: no rate limit), ``nftables.*`` for nftables.

:func:`merge_flags` lays explicitly given command-line flags over the file:
flags win, as in kube-proxy.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from kubelab.proxy.config import ProxyConfig

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
PROXY_MODES = ("iptables", "ipvs", "userspace", "nftables")
DETECT_LOCAL_MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")
IPVS_SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh")


class ConfigError(ValueError):
    """A KubeProxyConfiguration that cannot be used; the message says where and how to fix it."""


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: Any) -> float:
    """A Go duration string ("1m30s", "250ms", "0") in seconds; raises ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration string such as \"30s\" or \"1m0s\", got {text!r}")
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError('empty duration: write e.g. "30s" or "1m0s"')
    total, pos = 0.0, 0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"invalid duration {text!r}: use Go syntax such as \"30s\", \"1m0s\", \"1h30m\" or \"250ms\"")
    return sign * total


# ----------------------------------------------------------------- schema
# Each leaf: a checker turning the YAML value into a Python value, raising
# ValueError with what is wrong.  Nested dicts are sub-objects.


def _str(v: Any) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__} {v!r}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an integer, got {v!r}")
    return v


def _opt_int(v: Any) -> int | None:
    return None if v is None else _int(v)


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"expected a number, got {v!r}")
    return float(v)


def _nonneg_duration(v: Any) -> float:
    d = parse_duration(v)
    if d < 0:
        raise ValueError(f"must be greater than or equal to 0, got {v!r}")
    return d


def _cidr_list(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise ValueError(f"expected a list of CIDRs such as [\"10.0.0.0/8\"], got {v!r}")
    out = []
    for item in v:
        if not isinstance(item, str):
            raise ValueError(f"expected CIDR strings, got {item!r}")
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not a valid IP block (write e.g. 10.0.0.0/8)") from None
        out.append(item)
    return tuple(out)


def _node_port_addresses(v: Any) -> tuple[str, ...]:
    if isinstance(v, list) and v == ["primary"]:
        return ("primary",)
    return _cidr_list(v)


def _cluster_cidr(v: Any) -> tuple[str, ...]:
    text = _str(v).strip()
    if not text:
        return ()
    cidrs = tuple(c.strip() for c in text.split(","))
    if len(cidrs) > 2:
        raise ValueError("only one CIDR allowed, or two of different IP families (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)")
    families = set()
    for c in cidrs:
        try:
            families.add(ipaddress.ip_network(c, strict=False).version)
        except ValueError:
            raise ValueError(f"{c!r} must be a valid CIDR block (e.g. 10.100.0.0/16 or fde4:8dba:82e1::/48)") from None
    if len(cidrs) == 2 and len(families) != 2:
        raise ValueError("two CIDRs must be one IPv4 and one IPv6 (e.g. 10.100.0.0/16,fde4:8dba:82e1::/48)")
    return cidrs


def _ip(v: Any) -> str:
    text = _str(v)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a valid IP address (e.g. 0.0.0.0 or ::)") from None
    return text


def _host_port(v: Any) -> str:
    text = _str(v)
    if text == "":
        return ""
    if _is_ip(text.strip("[]")):
        return text  # a bare IP: the caller appends the default port, as kube-proxy's AppendPortIfNeeded
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", text)
    if not m:
        raise ValueError(f"{text!r} must be IP:port or IP (e.g. 0.0.0.0:10256 or [::]:10256)")
    host = m.group(1) or m.group(3) or ""
    port = int(m.group(2) or m.group(4))
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} must be a valid IP") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} in {text!r} must be 1-65535")
    return text


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _bind_address(value: str, bind_address: str, default_host_v4: str, default_host_v6: str, port: int) -> str:
    """kube-proxy's defaulting of healthzBindAddress / metricsBindAddress.

    Empty: the default host of bindAddress's family (IPv6 bindAddress -> IPv6
    default) and the default port; a bare IP gets the default port appended.
    """
    if value == "":
        v6 = _is_ip(bind_address) and ipaddress.ip_address(bind_address).version == 6
        host = default_host_v6 if v6 else default_host_v4
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bare = value.strip("[]")
    if _is_ip(bare):
        return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
    return value


def _choice(choices: tuple[str, ...], blank_ok: bool = True) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        text = _str(v)
        if (blank_ok and text == "") or text in choices:
            return text
        raise ValueError(f"{text!r} must be one of {', '.join(choices)}" + (" or blank" if blank_ok else ""))

    return check


def _feature_gates(v: Any) -> dict[str, bool]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"expected a map of gate name to true/false, got {v!r}")
    out = {}
    for k, val in v.items():
        if not isinstance(val, bool):
            raise ValueError(f"feature gate {k!r} must be true or false, got {val!r}")
        out[str(k)] = val
    return out


def _masquerade_bit(v: Any) -> int | None:
    if v is None:
        return None
    bit = _int(v)
    if not 0 <= bit <= 31:
        raise ValueError(f"must be within the range [0, 31], got {bit}")
    return bit


def _oom(v: Any) -> int | None:
    if v is None:
        return None
    n = _int(v)
    if not -1000 <= n <= 1000:
        raise ValueError(f"must be within the range [-1000, 1000], got {n}")
    return n


def _any(v: Any) -> Any:
    return v


_SYNC = {"minSyncPeriod": _nonneg_duration, "syncPeriod": _nonneg_duration}

SCHEMA: dict[str, Any] = {
    "apiVersion": _str,
    "kind": _str,
    "bindAddress": _ip,
    "bindAddressHardFail": _bool,
    "clientConnection": {
        "acceptContentTypes": _str,
        "burst": _int,
        "contentType": _str,
        "kubeconfig": _str,
        "qps": _number,
    },
    "clusterCIDR": _cluster_cidr,
    "configSyncPeriod": _nonneg_duration,
    "conntrack": {
        "maxPerCore": _opt_int,
        "min": _opt_int,
        "tcpBeLiberal": _bool,
        "tcpCloseWaitTimeout": _nonneg_duration,
        "tcpEstablishedTimeout": _nonneg_duration,
        "udpStreamTimeout": _nonneg_duration,
        "udpTimeout": _nonneg_duration,
    },
    "detectLocal": {"bridgeInterface": _str, "interfaceNamePrefix": _str},
    "detectLocalMode": _choice(DETECT_LOCAL_MODES),
    "enableProfiling": _bool,
    "featureGates": _feature_gates,
    "healthzBindAddress": _host_port,
    "hostnameOverride": _str,
    "iptables": {"localhostNodePorts": _bool, "masqueradeAll": _bool, "masqueradeBit": _masquerade_bit, **_SYNC},
    "ipvs": {
        "excludeCIDRs": _cidr_list,
        "ipSet": {"hashSize": _opt_int, "maxElements": _opt_int},
        "scheduler": _choice(IPVS_SCHEDULERS),
        "strictARP": _bool,
        "tcpFinTimeout": _nonneg_duration,
        "tcpTimeout": _nonneg_duration,
        "udpTimeout": _nonneg_duration,
        **_SYNC,
    },
    "nftables": {"masqueradeAll": _bool, "masqueradeBit": _masquerade_bit, **_SYNC},
    "logging": _any,  # component-base LoggingConfiguration; only verbosity is used
    "metricsBindAddress": _host_port,
    "mode": _choice(PROXY_MODES),
    "nodePortAddresses": _node_port_addresses,
    "oomScoreAdj": _oom,
    "portRange": _str,
    "showHiddenMetricsForVersion": _str,
    "udpIdleTimeout": _nonneg_duration,
    "winkernel": _any,
    "windowsRunAsService": _bool,
}

# Accepted for compatibility, no effect in kubelab (it never talks to an API
# server through these knobs, never sets sysctls it was not asked to, runs on Linux).
UNUSED_FIELDS = (
    "bindAddressHardFail",
    "clientConnection",
    "conntrack.maxPerCore",
    "conntrack.min",
    "conntrack.tcpBeLiberal",
    "conntrack.udpStreamTimeout",
    "conntrack.udpTimeout",
    "enableProfiling",
    "ipvs.ipSet",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "winkernel",
    "windowsRunAsService",
)


def _lines(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    """Record the 1-based line of every mapping key, by dotted path."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}{key.value}"
            out[path] = key.start_mark.line + 1
            _lines(value, path + ".", out)


def _walk(data: Mapping, schema: Mapping, prefix: str, out: dict[str, Any], where: Callable[[str], str]) -> None:
    for key, value in data.items():
        path = f"{prefix}{key}"
        rule = schema.get(key) if isinstance(key, str) else None
        if rule is None:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"{where(path)}: unknown field {path!r} (known fields here: {known})")
        if isinstance(rule, dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where(path)}: {path} must be a mapping, got {value!r}")
            _walk(value, rule, path + ".", out, where)
            continue
        if value is None:
            # `field: null` is "not set" to Go's decoder (nil pointer or zero
            # value), then defaulted: kubeadm's ConfigMap is full of them
            # (conntrack.maxPerCore, iptables.masqueradeBit, oomScoreAdj ...).
            continue
        try:
            out[path] = rule(value)
        except ValueError as e:
            raise ConfigError(f"{where(path)}: {path}: {e}") from None


def parse_config(text: str, source: str = "<config>", mode: str | None = None) -> tuple[ProxyConfig, frozenset[str]]:
    """Parse KubeProxyConfiguration text; returns the config and which ProxyConfig fields it set.

    ``mode`` is the proxy mode that will actually run when a ``--proxy-mode``
    flag overrides the file's: it picks the section (iptables, ipvs, nftables)
    the sync periods and masquerade settings come from, as kube-proxy reads
    them after its flags are applied.
    """
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{line}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a KubeProxyConfiguration mapping with apiVersion {API_VERSION}")
    lines: dict[str, int] = {}
    if node is not None:
        _lines(node, "", lines)

    def where(path: str) -> str:
        return f"{source}:{lines[path]}" if path in lines else source

    if data.get("apiVersion") != API_VERSION:
        raise ConfigError(
            f"{where('apiVersion')}: apiVersion is {data.get('apiVersion')!r}; kubelab reads {API_VERSION!r}"
        )
    if data.get("kind") != KIND:
        raise ConfigError(f"{where('kind')}: kind is {data.get('kind')!r}; expected {KIND!r}")
    values: dict[str, Any] = {}
    _walk(data, SCHEMA, "", values, where)
    return _to_proxy_config(values, where, mode)


def load_config_file(path: str | Path, mode: str | None = None) -> tuple[ProxyConfig, frozenset[str]]:
    """Read ``--config FILE``; errors name the file.  ``mode``: as :func:`parse_config`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read --config file: {e.strerror}") from None
    return parse_config(text, str(p), mode)


def _to_proxy_config(
    v: dict[str, Any], where: Callable[[str], str], mode_override: str | None = None
) -> tuple[ProxyConfig, frozenset[str]]:
    fields: dict[str, Any] = {}

    def put(name: str, key: str, transform: Callable[[Any], Any] = lambda x: x) -> None:
        if key in v:
            fields[name] = transform(v[key])

    mode = v.get("mode") or "iptables"
    if "mode" in v and v["mode"]:
        fields["proxy_mode"] = mode
    put("hostname_override", "hostnameOverride", str.strip)
    put("bind_address", "bindAddress")
    put("cluster_cidr", "clusterCIDR")
    put("detect_local_mode", "detectLocalMode")
    if fields.get("detect_local_mode") == "":
        del fields["detect_local_mode"]
    put("bridge_interface", "detectLocal.bridgeInterface")
    put("interface_name_prefix", "detectLocal.interfaceNamePrefix")
    put("nodeport_addresses", "nodePortAddresses")
    # As kube-proxy's v1alpha1 defaulting: in the file, "" means the default
    # address (only an explicit --metrics-bind-address "" flag disables a server).
    bind = v.get("bindAddress") or "0.0.0.0"
    if "metricsBindAddress" in v:
        fields["metrics_bind_address"] = _bind_address(v["metricsBindAddress"], bind, "127.0.0.1", "::1", 10249)
    if "healthzBindAddress" in v:
        fields["healthz_bind_address"] = _bind_address(v["healthzBindAddress"], bind, "0.0.0.0", "::", 10256)
    if v.get("configSyncPeriod"):  # 0 means the default (15m), as kube-proxy
        fields["config_sync_period"] = v["configSyncPeriod"]
    put("feature_gates", "featureGates")
    put("iptables_localhost_nodeports", "iptables.localhostNodePorts")
    if v.get("udpIdleTimeout"):  # 0 means the default (250ms), as kube-proxy
        fields["udp_idle_timeout"] = v["udpIdleTimeout"]
    put("conntrack_tcp_timeout_established", "conntrack.tcpEstablishedTimeout")
    put("conntrack_tcp_timeout_close_wait", "conntrack.tcpCloseWaitTimeout")
    # ipvs
    if v.get("ipvs.scheduler"):
        fields["ipvs_scheduler"] = v["ipvs.scheduler"]
    put("ipvs_strict_arp", "ipvs.strictARP")
    put("ipvs_exclude_cidrs", "ipvs.excludeCIDRs")
    put("ipvs_tcp_timeout", "ipvs.tcpTimeout")
    put("ipvs_tcpfin_timeout", "ipvs.tcpFinTimeout")
    put("ipvs_udp_timeout", "ipvs.udpTimeout")
    if isinstance(v.get("logging"), dict) and "verbosity" in v["logging"]:
        verbosity = v["logging"]["verbosity"]
        if isinstance(verbosity, bool) or not isinstance(verbosity, int) or verbosity < 0:
            raise ConfigError(f"{where('logging')}: logging.verbosity must be a non-negative integer, got {verbosity!r}")
        fields["verbosity"] = verbosity

    # Masquerading and sync periods come from the section of the mode that runs.
    section = {"ipvs": "ipvs", "nftables": "nftables"}.get(mode_override or mode, "iptables")
    for name, key in (("masquerade_all", "masqueradeAll"), ("masquerade_bit", "masqueradeBit")):
        sec = "nftables" if section == "nftables" else "iptables"
        if v.get(f"{sec}.{key}") is not None:
            fields[name] = v[f"{sec}.{key}"]
    # kube-proxy's v1alpha1 defaulting: a zero (or absent) syncPeriod is 30s in
    # every section; a zero minSyncPeriod is 1s for iptables (and nftables) but
    # stays 0 for ipvs -- the IPVS proxier is not rate limited by default.
    sync = v.get(f"{section}.syncPeriod")
    if sync:
        fields["sync_period"] = sync
    min_sync = v.get(f"{section}.minSyncPeriod")
    if section == "ipvs":
        fields["min_sync_period"] = min_sync or 0.0
    elif min_sync:
        fields["min_sync_period"] = min_sync
    sync = fields.get("sync_period", ProxyConfig.sync_period)
    min_sync = fields.get("min_sync_period", ProxyConfig.min_sync_period)
    if min_sync > sync:
        raise ConfigError(
            f"{where(section + '.syncPeriod')}: {section}.syncPeriod ({sync:g}s) must be greater than or equal "
            f"to {section}.minSyncPeriod ({min_sync:g}s)"
        )
    return ProxyConfig(**fields), frozenset(fields)


def merge_flags(base: ProxyConfig, flags: Mapping[str, Any]) -> ProxyConfig:
    """``base`` (defaults or the file) with every explicitly given flag laid over it.

    ``flags`` maps ProxyConfig field names to values; None means "not given".
    """
    given = {k: v for k, v in flags.items() if v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(ProxyConfig)}
    if unknown:
        raise KeyError(f"not ProxyConfig fields: {sorted(unknown)}")
    merged = dataclasses.replace(base, **given)
    if merged.min_sync_period > merged.sync_period:
        raise ConfigError(
            f"--sync-period ({merged.sync_period:g}s) must be greater than or equal to "
            f"--min-sync-period ({merged.min_sync_period:g}s)"
        )
    return merged
