"""Compile the flow kernel once, ahead of the first ``attnflow.flow``: ``python -m attnflow.network._compile``.

``make install`` runs it. numba keeps the machine code in its on-disk cache (``__pycache__`` beside
``_dinic.py``, or ``$NUMBA_CACHE_DIR``); a new process then loads it in well under a second instead of compiling
for 10-20 s. The cache is keyed by the kernel file's path, modification time and size, numba's version and the
CPU, so an edited kernel, another numba or another machine compiles afresh rather than loading stale code.
Only the default solver (``"dinic"``) is compiled here; ``"dinic-v1"`` compiles on its first use.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np


def compile_kernel() -> dict[str, int]:
    """Run the kernel's entry points with the argument types [`attnflow.flow`][attnflow.flow] passes them, so that numba
    compiles (or loads) and caches them. Returns the number of signatures each entry point compiled now."""
    from . import _dinic
    from ._solvers import max_flow_values

    rng = np.random.default_rng(0)
    adj = rng.dirichlet(np.ones(4), size=(3, 4))
    max_flow_values(adj, [0], method="dinic")  # one source: per-sink data recomputed
    max_flow_values(adj, [0, 3], method="dinic", all_layers=True)  # several: kept
    entry_points: dict[str, Any] = {  # numba dispatchers
        "spans": _dinic.spans, "arc_bits": _dinic.arc_bits, "pruned_source_flows": _dinic.pruned_source_flows,
    }
    return {name: sum(fn.stats.cache_misses.values()) for name, fn in entry_points.items()}


def main() -> int:
    from ._solvers import numba_available

    if not numba_available():
        print("attnflow: numba is not installed; flow uses its numpy/igraph solver, nothing to compile.")
        return 0
    start = time.perf_counter()
    compiled = compile_kernel()
    from . import _dinic

    where = _dinic.pruned_source_flows.stats.cache_path
    what = "compiled" if any(compiled.values()) else "already cached"
    print(f"attnflow: flow kernel {what} in {time.perf_counter() - start:.1f} s (numba cache: {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
