"""kube-proxy's configuration, as kubelab understands it.

:class:`ProxyConfig` holds every setting a mode may read.  Field names follow
kube-proxy's flags (``--min-sync-period`` -> ``min_sync_period``).  The CLI
fills it from flags and ``--config FILE`` (a KubeProxyConfiguration of
``kubeproxy.config.k8s.io/v1alpha1``); see ``kubelab.proxy.configfile``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProxyConfig:
    """All proxy settings; defaults are kube-proxy's."""

    proxy_mode: str = "iptables"
    hostname_override: str = ""
    bind_address: str = "0.0.0.0"
    cluster_cidr: tuple[str, ...] = ()  # detect-local by pod CIDR(s), kube-proxy's --cluster-cidr
    detect_local_mode: str = "ClusterCIDR"  # ClusterCIDR | NodeCIDR | BridgeInterface | InterfaceNamePrefix
    bridge_interface: str = ""
    interface_name_prefix: str = ""
    masquerade_all: bool = False
    masquerade_bit: int = 14  # --iptables-masquerade-bit: mark 0x4000
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs, or ("primary",); () = all node IPs
    metrics_bind_address: str = "127.0.0.1:10249"
    healthz_bind_address: str = "0.0.0.0:10256"
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    # iptables
    iptables_localhost_nodeports: bool = True
    # ipvs
    ipvs_scheduler: str = "rr"
    ipvs_strict_arp: bool = False
    ipvs_exclude_cidrs: tuple[str, ...] = ()
    ipvs_tcp_timeout: float = 0.0
    ipvs_tcpfin_timeout: float = 0.0
    ipvs_udp_timeout: float = 0.0
    ipvs_graceful_termination_timeout: float = 900.0
    # userspace
    udp_idle_timeout: float = 0.25  # kube-proxy's --udp-timeout default (250ms): a UDP session with no traffic for this long is closed
    userspace_max_connections: int = 10000
    userspace_connect_retries: int = 4
    # conntrack
    conntrack_tcp_timeout_established: float = 86400.0
    conntrack_tcp_timeout_close_wait: float = 3600.0
    # misc
    config_sync_period: float = 900.0
    feature_gates: dict[str, bool] = field(default_factory=dict)
    verbosity: int = 0
