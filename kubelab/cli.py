"""The ``kubelab`` command: one explicit table of subcommands.

Each subcommand lives in its room's own ``cli`` module, which exposes
``add_arguments(parser)`` and ``run(args) -> int``.  Only the module of the
chosen subcommand is imported, so ``kubelab resolve`` does not pay for scapy
or pyroute2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "proxy": ("kubelab.proxy.cli", "run the service proxy (userspace, iptables or ipvs mode), like kube-proxy"),
    "dns": ("kubelab.dns.cli", "run the cluster DNS responder, like CoreDNS's kubernetes plugin"),
    "resolve": ("kubelab.dns.resolve_cli", "resolve a name the way glibc or musl walks resolv.conf, printing every query"),
    "lab": ("kubelab.netlab.cli", "build and drive network-namespace clusters (up, exec, apply, delete, status, down)"),
    "trace": ("kubelab.netlab.trace_cli", "capture one flow through a lab and show each address translation"),
    "demo": ("kubelab.netlab.demo", "bring up the example lab, show a Service working, trace a flow, tear down"),
    "bench": ("kubelab.bench_cli", "benchmark the proxy modes and DNS against peers, with tables and plots"),
}

EPILOG = """\
examples:
  kubelab demo
  kubelab proxy --proxy-mode iptables --source examples/basic --dry-run
  kubelab dns --source examples/basic --listen 127.0.0.1:5353
  kubelab resolve web --resolv-conf examples/resolv.conf --server 127.0.0.1:5353
  kubelab lab up examples/labs/basic.yaml

Run 'kubelab COMMAND --help' for a command's options.
"""


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubelab",
        description="A Kubernetes service dataplane in Python, and labs to see it work packet by packet.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kubelab {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub.add_parser(name, help=summary)
    return parser


def _version() -> str:
    from kubelab import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kubelab`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if not argv:
            parser.print_help()
            return 2
        parser.parse_args(argv)  # prints --help / --version, or an error naming the choices
        return 2
    name, rest = argv[0], argv[1:]
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"kubelab {name}",
        description=getattr(module, "DESCRIPTION", summary),
        epilog=getattr(module, "EPILOG", None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
