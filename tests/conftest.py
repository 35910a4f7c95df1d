"""Test layers, chosen by folder: tests/unit, tests/kernel (root + netns), tests/uml.

Pick a layer with ``-m unit`` / ``-m kernel`` / ``-m uml``.  In CI (``CI`` set)
kernel and UML tests always run and fail loudly when something is missing;
a developer without root sees them skipped with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LAYERS = ("unit", "kernel", "uml")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        for layer in LAYERS:
            if layer in parts:
                item.add_marker(getattr(pytest.mark, layer))
                if layer != "unit" and os.geteuid() != 0 and not os.environ.get("CI"):
                    item.add_marker(pytest.mark.skip(reason=f"{layer} tests need root (they always run in CI)"))
                break
