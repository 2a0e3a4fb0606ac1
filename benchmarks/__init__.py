"""Benchmark scripts; each writes its section of docs/RESULTS.md (``--write-results``).

Run them from the repository root with the package installed (``pip install -e .``) as
``python benchmarks/NAME.py``: Python puts the script's folder on the import path, so they import
their helpers (``results_md``, ``app_server``) from beside them. This file makes the folder a
package too, so that the tests can import ``benchmarks.app_reliability`` and ``benchmarks.app_server``.
"""
