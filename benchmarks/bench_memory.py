"""Peak memory of ``rollout`` and ``flow``: the code before issue 14 against this tree, side by side in one run.

Run: ``.venv/bin/python benchmarks/bench_memory.py`` (about 2 minutes: the old flow kernel is compiled once, into a
temporary numba cache), ``--before REV`` to compare with another commit (default ``8b29f74``, the last commit
before this work; its ``attnflow`` package is taken with ``git archive``).

Each measurement runs in a fresh process that builds the trace, warms the code up on a tiny trace, then records
during the one call: the tracemalloc peak (numpy reports its buffers to tracemalloc) and how far the process's
resident memory rose above where it stood before the call (Linux: the peak is reset through
``/proc/self/clear_refs`` and read from ``VmHWM``). The trace itself is not counted by either.

Cases:
* rollout, 12 layers x 12 heads x batch 16 x 384 tokens (float32): the result is ``(16, 384, 384)`` float64, 18 MiB;
* flow from the first token, 12 layers x 12 heads x 512 tokens;
* flow from the last token of causal attention, 24 layers x 6 heads x 1024 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, tracemalloc
import numpy as np
import attnflow
case = sys.argv[1]
rng = np.random.default_rng(0)

def layer(batch, heads, n, causal):
    w = np.empty((batch, heads, n, n), np.float32)
    for b in range(batch):
        for h in range(heads):
            x = rng.standard_normal((n, n), dtype=np.float32)
            if causal:
                x[:, 0] += 3.0
                x[np.triu_indices(n, 1)] = -np.inf
            x -= x.max(-1, keepdims=True)
            np.exp(x, out=x)
            w[b, h] = x / x.sum(-1, keepdims=True)
    return w

if case == "rollout":
    trace = attnflow.AttentionTrace.from_arrays([layer(16, 12, 384, False) for _ in range(12)])
    call = lambda: attnflow.rollout(trace)
elif case == "flow":
    trace = attnflow.AttentionTrace.from_arrays([layer(1, 12, 512, False) for _ in range(12)])
    call = lambda: attnflow.flow(trace, sources=[0], progress=False)
else:
    trace = attnflow.AttentionTrace.from_arrays([layer(1, 6, 1024, True) for _ in range(24)], causal=True)
    call = lambda: attnflow.flow(trace, sources=[-1], progress=False)
tiny = attnflow.AttentionTrace.from_arrays([np.full((1, 1, 4, 4), 0.25, np.float32)] * 3)
attnflow.rollout(tiny); attnflow.flow(tiny, sources=[0], progress=False)  # imports, kernel load or compile

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak resident set (VmHWM) to the current one
before = status("VmRSS:")
tracemalloc.start()
result = call()
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"peak": peak / 2**20, "rss_growth": (status("VmHWM:") - before) / 1024,
                  "result": result.nbytes / 2**20, "trace": sum(l.weights.nbytes for l in trace.layers) / 2**20}))
"""

CASES = {
    "rollout": "rollout, 12 layers x 12 heads x batch 16 x 384 tokens",
    "flow": "flow(sources=[0]), 12 layers x 12 heads x 512 tokens",
    "causal": "flow(sources=[-1]), causal, 24 layers x 6 heads x 1024 tokens",
}


def old_tree(rev: str, into: Path) -> Path:
    """The ``attnflow`` package at ``rev``, unpacked into ``into``."""
    archive = subprocess.run(["git", "archive", rev, "attnflow"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def measure(case: str, path: Path, numba_cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path), "NUMBA_CACHE_DIR": str(numba_cache)}
    done = subprocess.run([sys.executable, "-c", CHILD, case], env=env, capture_output=True, text=True, cwd=path)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    out = json.loads(done.stdout.strip().splitlines()[-1])
    check = subprocess.run([sys.executable, "-c", "import attnflow; print(attnflow.__file__)"], env=env,
                           capture_output=True, text=True, cwd=path).stdout.strip()
    assert check.startswith(str(path)), (check, path)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="8b29f74", help="the commit to compare with")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before_tree = old_tree(args.before, Path(tmp) / "before")
        rows = []
        for case, label in CASES.items():
            old = measure(case, before_tree, Path(tmp) / "numba-before")
            new = measure(case, ROOT, Path(tmp) / "numba-after")
            rows.append((label, old, new))
            print(f"  done: {label}", flush=True)
    print()
    print(f"| case | result | trace | before ({args.before}): tracemalloc peak / RSS growth | after: tracemalloc peak "
          "/ RSS growth | peak ratio |")
    print("|---|---|---|---|---|---|")
    for label, old, new in rows:
        print(f"| {label} | {new['result']:.1f} MiB | {new['trace']:.0f} MiB | {old['peak']:.0f} / {old['rss_growth']:.0f} "
              f"MiB | {new['peak']:.0f} / {new['rss_growth']:.0f} MiB | {old['peak'] / new['peak']:.1f}x |")
    print("(each number from its own fresh process; tracemalloc peak = the most memory Python and numpy held at once "
          "during the call, beyond what was held before it)")


if __name__ == "__main__":
    main()
