"""kubelab's benchmark harness: repeated measurements, ratios against peers, reports.

The suites (data path, scale, control plane, DNS) live in
``kubelab.bench.suites``; this package's core is mode-agnostic:

* :mod:`kubelab.bench.stats` -- medians, spread, ratios of paired runs.
* :mod:`kubelab.bench.progress` -- a progress display for long runs.
* :mod:`kubelab.bench.report` -- results JSON, a Markdown table, PNG plots.
"""
