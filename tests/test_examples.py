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
    """A Hugging Face GPT-NeoX and Mistral and penzai's JAX conversions of them, both captured by attnflow: every
    method both sides compute agrees after every layer, to 1e-9 in float64 (value-side methods: 1e-7) and to 1e-5
    in float32, on padded batches (the example's table, read back here)."""
    out = run_example(Path(__file__).parent.parent / "examples" / "compare_hf_penzai.py", tmp_path)
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    columns = [cell.strip() for cell in lines[0].strip("|").split("|")][2:]
    rows = {}
    for line in lines[1:]:  # the separator row starts with "|-", not "| "
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0], cells[1]] = {c: float(v) for c, v in zip(columns, cells[2:]) if v != "-"}
    assert {dtype for _, dtype in rows} == {"float32", "float64"} and len(rows) == 4
    value_side = {"norm", "norm_residual", "alti", "effective_attention"}
    for (model, dtype), found in rows.items():
        assert {"attention", "rollout", "flow", "attn_grad", "grad_rollout"} <= set(found), (model, dtype)
        for method, difference in found.items():
            limit = 1e-5 if dtype == "float32" else 1e-7 if method in value_side else 1e-9
            assert difference <= limit, (model, dtype, method, difference)
    assert value_side | {"value_zeroing"} <= set(rows["Mistral (grouped-query)", "float64"])


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
