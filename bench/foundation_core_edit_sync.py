#!/usr/bin/env python3
"""Edit -> sync latency of ``kubelab proxy`` watching a manifest folder, end to end.

Runs ``kubelab proxy --proxy-mode iptables --source <copy of examples/basic>
--dry-run --watch`` (default --min-sync-period 1s, the real iptables renderer,
nothing touches the kernel), then repeatedly rewrites services.yaml (rename
into place, toggling one Service's sessionAffinity so every edit is a real
change) and times from the rename to the next sync's output header.  ``--gap``
is how long after the previous sync each edit is made: 2 s shows the files
source's polling alone; 0.1 s lands inside --min-sync-period, where kube-proxy's
burst of 2 lets the sync run at once and a third change waits for a token.

The figure is compared with kube-proxy's own bound, its 1 s --min-sync-period.

    python3 bench/foundation_core_edit_sync.py --runs 15 --gap 2
    python3 bench/foundation_core_edit_sync.py --runs 15 --gap 0.1
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEADER = "# kubelab proxy --dry-run: sync"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="edits to time (default 15)")
    ap.add_argument("--gap", type=float, default=2.0, help="seconds between a sync and the next edit (default 2)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kl-core-bench-"))
    folder = tmp / "basic"
    shutil.copytree(REPO / "examples" / "basic", folder)
    target = folder / "services.yaml"
    original = target.read_text()
    if original.count("  sessionAffinity: None") < 1:
        raise SystemExit("examples/basic/services.yaml has no `sessionAffinity: None` to toggle")
    edited = original.replace("  sessionAffinity: None", "  sessionAffinity: ClientIP", 1)

    proc = subprocess.Popen(
        [sys.executable, "-m", "kubelab", "proxy", "--proxy-mode", "iptables", "--source", str(folder), "--dry-run",
         "--watch", "--hostname-override", "node-a", "--metrics-bind-address", "", "--healthz-bind-address", ""],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    syncs: queue.Queue[float] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith(HEADER):
                syncs.put(time.monotonic())

    threading.Thread(target=pump, daemon=True).start()
    latencies: list[float] = []
    try:
        last = syncs.get(timeout=120)
        for i in range(args.runs):
            time.sleep(max(0.0, last + args.gap - time.monotonic()))
            while not syncs.empty():
                syncs.get()
            tmpfile = folder / ".services.yaml.new"
            tmpfile.write_text(edited if i % 2 == 0 else original)
            t0 = time.monotonic()
            os.rename(tmpfile, target)
            last = syncs.get(timeout=60)
            latencies.append(last - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median(latencies)
    print(f"edit -> sync, gap {args.gap:g}s, {len(latencies)} edits: median {med:.3f}s "
          f"(min {min(latencies):.3f}, max {max(latencies):.3f}); ratio to kube-proxy's 1s min-sync-period {med:.2f}")
    print("all: " + " ".join(f"{x:.3f}" for x in latencies))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
