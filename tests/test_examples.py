"""Every example script runs as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
LIBRARY_ONLY = {"flax_bert.py"}  # a module other examples import, run by its own tests


@pytest.mark.parametrize("script", [p for p in EXAMPLES if p.name not in LIBRARY_ONLY], ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), f"{script.name} printed nothing"


def test_graphml_export_is_readable(tmp_path):
    import igraph

    script = Path(__file__).parent.parent / "examples" / "export_graphml.py"
    out = tmp_path / "net.graphml"
    subprocess.run(
        [sys.executable, str(script), str(out)], check=True, capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    graph = igraph.Graph.Read_GraphML(str(out))
    assert graph.vcount() % 7 == 0  # 6 layers + inputs = 7 copies of the tokens
    assert min(graph.es["capacity"]) > 0 and all(label.startswith("L") for label in graph.vs["label"])
