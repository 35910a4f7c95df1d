#!/usr/bin/env python3
"""Compare kubelab's proxy modes (and kubelab dns against its peers): the script behind ``kubelab bench``.

    python3 bench/modes_compare.py --quick                # < 5 minutes: bench/results/quick/
    python3 bench/modes_compare.py                        # the full run (states its duration first)
    python3 bench/modes_compare.py --plan                 # steps and expected duration only

Same flags as ``kubelab bench`` (see ``--help``); it is that command, runnable
from a checkout without installing the console script.  Needs root.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kubelab.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
