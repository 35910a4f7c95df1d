"""Chain names of kube-proxy's iptables mode, and how the per-service ones are hashed.

Everything here matches ``pkg/proxy/iptables/proxier.go`` so that the same
Service produces the same chain names as kube-proxy (operators grep for them,
and the golden tests compare them):

* ``KUBE-SVC-`` / ``KUBE-SVL-`` / ``KUBE-EXT-`` / ``KUBE-FW-`` + the first 16
  characters of base32(sha256(servicePortName + protocol)), where
  servicePortName is ``ns/name:port`` (``ns/name`` when the port is unnamed)
  and protocol is lower case ("tcp");
* ``KUBE-SEP-`` + the same over servicePortName + protocol + "ip:port".

iptables chain names must be at most 28 characters, hence the hash.
"""

from __future__ import annotations

import hashlib

# Top-level chains (kube-proxy's constants of the same meaning).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_PROXY_CANARY = "KUBE-PROXY-CANARY"
# kubelet's anti-martian chain, which kube-proxy duplicates when it enables
# localhost NodePorts (route_localnet); see https://issues.k8s.io/90259.
KUBE_FIREWALL = "KUBE-FIREWALL"

# Above this many endpoints kube-proxy switches into "large cluster mode":
# no per-endpoint comments, and stale chains are only deleted once per sync period.
LARGE_CLUSTER_ENDPOINTS_THRESHOLD = 1000

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
FW_PREFIX = "KUBE-FW-"
EXT_PREFIX = "KUBE-EXT-"
SEP_PREFIX = "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, SEP_PREFIX, FW_PREFIX, EXT_PREFIX)

# nfacct counters kube-proxy attaches to two rules (pkg/proxy/metrics).
NFACCT_CT_STATE_INVALID_DROPPED = "ct_state_invalid_dropped_pkts"
NFACCT_LOCALHOST_NODEPORT_ACCEPTED = "localhost_nps_accepted_pkts"


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
# Base32 of 10 bits at a time: two characters per table entry.
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)


def _hash16(text: str, _pairs: tuple[str, ...] = _B32_PAIRS) -> str:
    # 16 base32 characters are exactly the first 10 bytes (80 bits) of the digest.
    # base64.b32encode is pure Python in 3.11 (about 8 us a call); 60k chain names
    # per full sync at 10k services made it the renderer's biggest cost, so encode
    # the 80 bits, 10 at a time, through a 1024-entry table instead (same text).
    d = hashlib.sha256(text.encode()).digest()
    a = int.from_bytes(d[:5], "big")
    b = int.from_bytes(d[5:10], "big")
    return (
        f"{_pairs[a >> 30]}{_pairs[(a >> 20) & 1023]}{_pairs[(a >> 10) & 1023]}{_pairs[a & 1023]}"
        f"{_pairs[b >> 30]}{_pairs[(b >> 20) & 1023]}{_pairs[(b >> 10) & 1023]}{_pairs[b & 1023]}"
    )


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """kube-proxy's portProtoHash: 16 base32 chars of sha256(name + protocol)."""
    return _hash16(service_port_name + protocol)


def service_chain_names(service_port_name: str, protocol: str) -> tuple[str, str, str, str]:
    """(KUBE-SVC-, KUBE-SVL-, KUBE-FW-, KUBE-EXT-) chains of one service port.

    ``protocol`` is lower case ("tcp", "udp", "sctp"), as kube-proxy hashes it.
    """
    h = port_proto_hash(service_port_name, protocol)
    return SVC_PREFIX + h, SVL_PREFIX + h, FW_PREFIX + h, EXT_PREFIX + h


def endpoint_chain_name(service_port_name: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP- chain of one endpoint ("ip:port", IPv6 bracketed) of one service port."""
    return SEP_PREFIX + _hash16(service_port_name + protocol + endpoint)


def is_service_chain_name(chain: str) -> bool:
    """True for the per-service chains kube-proxy creates (and may delete as stale)."""
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


def compute_probability(n: int) -> str:
    """The ``--probability`` of picking one of ``n`` remaining endpoints, as kube-proxy prints it."""
    return "%0.10f" % (1.0 / n)
