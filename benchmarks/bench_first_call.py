"""Seconds from a new Python process to its first attention flow, import included, with and without the kernel
cache ``make install`` writes.

Run: ``.venv/bin/python benchmarks/bench_first_call.py`` (about a minute; ``--repeat N`` fresh processes per
setting, default 5 with the cache and 2 without).

Each process runs ``import attnflow`` and one ``attnflow.flow(trace)`` on a MiniLM-sized trace (6 layers x 12
heads x 12 tokens, every token; random attention, so no model or torch is loaded) and reports the wall time
from its start to the end of that call. Settings, side by side in one run:

* cached: numba's cache as ``make install`` leaves it (``python -m attnflow.network._compile`` is run first);
* cold: an empty ``NUMBA_CACHE_DIR``, so the kernel is compiled (what the first call cost before the install step
  wrote the cache, and what it costs where no cache can be written).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import time
start = time.perf_counter()
import numpy as np
import attnflow
imported = time.perf_counter()
rng = np.random.default_rng(0)
trace = attnflow.AttentionTrace.from_arrays([rng.dirichlet(np.ones(12), size=(1, 12, 12)) for _ in range(6)])
attnflow.flow(trace, progress=False)
print(imported - start, time.perf_counter() - start)
"""


def first_call(env: dict) -> tuple[float, float]:
    """``(seconds to import attnflow, seconds to the end of the first flow)`` in a new process.

    The interpreter's own start-up (before the first line runs) is not included; it is the same for both settings.
    """
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    imported, total = (float(x) for x in done.stdout.split())
    return imported, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cold-repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "attnflow.network._compile"], env=env, cwd=ROOT, check=True)
    cached = [first_call(env) for _ in range(args.repeat)]
    cold = []
    for _ in range(args.cold_repeat):
        with tempfile.TemporaryDirectory() as empty:
            cold.append(first_call({**env, "NUMBA_CACHE_DIR": empty}))
    print()
    print("| setting | import attnflow | import + first flow (median) | min - max | runs |")
    print("|---|---|---|---|---|")
    for name, runs in (("cached (after make install)", cached), ("cold (empty numba cache)", cold)):
        imports, totals = np.array(runs).T
        print(f"| {name} | {np.median(imports):.2f} s | {np.median(totals):.2f} s | {totals.min():.2f} - "
              f"{totals.max():.2f} s | {len(runs)} |")
    print(f"cold / cached: {np.median(np.array(cold)[:, 1]) / np.median(np.array(cached)[:, 1]):.0f}x")


if __name__ == "__main__":
    main()
