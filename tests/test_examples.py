"""Every example script runs as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
LIBRARY_ONLY = {"flax_bert.py"}  # a module other examples import, run by its own tests
OWN_TEST = {"compare_hf_penzai.py"}  # run by a test of its own below, which also reads what it prints
#: Arguments that keep an example short here: the decoder examples train a few steps into the test's directory
#: (the real run, 3,000 steps, takes about half an hour and is what the README's numbers come from).
ARGS = {
    "train_decoder.py": ["--out", "decoder", "--steps", "12"],
    "explain_generation.py": ["--model", "decoder", "--steps", "12", "--new-tokens", "4"],
}


def run_example(script, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(script), *ARGS.get(script.name, [])], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=600,
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), f"{script.name} printed nothing"
    return result.stdout


@pytest.mark.parametrize("script", [p for p in EXAMPLES if p.name not in LIBRARY_ONLY | OWN_TEST], ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    run_example(script, tmp_path)


def test_hf_gpt_neox_and_its_penzai_conversion_agree_to_1e5(tmp_path):
    """A Hugging Face GPT-NeoX and penzai's JAX conversion of it, both captured by attnflow: every layer and
    head agrees to 1e-5 (float32), as do rollout and flow, on a padded batch."""
    out = run_example(Path(__file__).parent.parent / "examples" / "compare_hf_penzai.py", tmp_path)
    assert "verdict: OK" in out
    line = next(row for row in out.splitlines() if row.startswith("max |attention difference| per layer:"))
    differences = [float(value) for value in line.split(":", 1)[1].split(",")]
    assert len(differences) == 2 and max(differences) <= 1e-5, line
    rollout, flow = (float(part.split()[1]) for part in out.splitlines()[-1].split(","))
    assert rollout <= 1e-5 and flow <= 1e-5


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


def test_sva_evaluate_prints_the_leaderboard_of_every_method(tmp_path):
    """examples/sva: a tiny model trained in seconds, evaluated with every method the torch adapter captures;
    the leaderboard is printed per reference (with the special-token setting) and written as CSV."""
    import csv
    import json

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    sva = Path(__file__).parent.parent / "examples" / "sva"
    subprocess.run([sys.executable, str(sva / "train.py"), "--out", str(tmp_path), "--train", "300", "--test", "60",
                    "--epochs", "1", "--width", "16", "--heads", "2"], check=True, env=env, capture_output=True,
                   timeout=600)

    def evaluate(*args: str) -> str:
        result = subprocess.run([sys.executable, str(sva / "evaluate.py"), "--model", str(tmp_path), *args],
                                env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout

    out = evaluate("--examples", "12")
    assert "Abnar & Zuidema Table 1" in out and "Spearman with blankout" in out
    summary = json.loads((tmp_path / "faithfulness" / "summary.json").read_text())
    methods = [m for m in summary["spearman"] if m != "random"]
    assert {"raw", "rollout", "flow"} <= set(methods)
    for method in summary["skipped"]:  # what the torch adapter cannot capture is named, not raised
        assert f"skipped {method}: " in out
    with open(tmp_path / "faithfulness" / "leaderboard.csv") as handle:
        rows = list(csv.DictReader(handle))
    for reference in ("blankout", "grad_norm", "grad_x_input"):
        assert f"Leaderboard against {reference} " in out and f"Most faithful to {reference} on this data: " in out
        ranked = [row for row in rows if row["reference"] == reference]
        assert sorted(row["method"] for row in ranked) == sorted([*methods, "random"])
        assert [int(row["rank"]) for row in ranked] == list(range(1, len(ranked) + 1))
        assert all(int(row["n"]) == 12 and float(row["rho_last_low"]) <= float(row["rho_last"])
                   <= float(row["rho_last_high"]) for row in ranked)
    assert "special tokens excluded from rankings and removal curves" in out
    assert summary["special"] == "exclude" and summary["lead"]["blankout"]["best"] in methods

    out = evaluate("--examples", "6", "--methods", "rollout", "--special", "include", "--out", str(tmp_path / "inc"))
    assert "special tokens included in rankings and removal curves" in out
    assert list(json.loads((tmp_path / "inc" / "summary.json").read_text())["spearman"]) == [
        "raw", "rollout", "flow", "random"]
