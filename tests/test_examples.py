"""Every example script runs as a user would run it.

Each script runs as ``__main__`` (``runpy``, with its own ``sys.argv`` and working directory) in this process:
a new interpreter per example would import torch, transformers and JAX again (seconds each) and compile again
what this process has compiled already. :func:`run_example` puts back everything an example changes in the
process (argv, path, working directory, environment, torch's seed and threads, numpy's print options, the
modules it imports from examples/)."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
LIBRARY_ONLY = {"flax_bert.py"}  # a module other examples import, run by its own tests
#: run by tests of their own below, which also read what they print or write
OWN_TEST = {"compare_hf_penzai.py", "export_graphml.py"}
#: Arguments that keep an example short here. train_decoder.py trains 2 steps (each about 0.8 s here; the real
#: run, 3,000 steps, takes about half an hour and is what the README's numbers come from) and
#: explain_generation.py explains with that model (fixture ``decoder``) instead of training its own.
#: Examples that compile JAX code: compiled with XLA's optimisations off here (fixture ``jax_quick_compile``).
JAX = {"compare_torch_jax.py"}
ARGS = {
    "explain_generation.py": ["--new-tokens", "4"],
}


@contextlib.contextmanager
def _example_process(cwd: Path, argv: list[str]):
    """The process as ``python SCRIPT ARGV`` in ``cwd`` would see it, put back as it was afterwards."""
    import numpy as np
    import torch

    saved_argv, saved_path, saved_cwd, saved_env = sys.argv, list(sys.path), Path.cwd(), dict(os.environ)
    saved_modules = set(sys.modules)
    rng, threads, printoptions = torch.random.get_rng_state(), torch.get_num_threads(), np.get_printoptions()
    sys.argv = argv
    os.environ.update({"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"})
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_env)
        torch.random.set_rng_state(rng)
        torch.set_num_threads(threads)
        np.set_printoptions(**printoptions)
        for name in set(sys.modules) - saved_modules:  # the modules next to it (train_decoder, flax_bert, sva)
            if Path(getattr(sys.modules[name], "__file__", None) or "/").resolve().parent == Path(argv[0]).resolve().parent:
                del sys.modules[name]


def run_example(script: Path, cwd: Path, *args: str) -> str:
    """Run ``script`` as ``__main__`` with ``args`` in ``cwd``; returns what it printed. A nonzero exit fails."""
    out = io.StringIO()
    with _example_process(cwd, [str(script), *args]), contextlib.redirect_stdout(out):
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code in (0, None), f"{script.name} exited with {exit_.code}:\n{out.getvalue()}"
    assert out.getvalue().strip(), f"{script.name} printed nothing"
    return out.getvalue()


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """train_decoder.py's run (2 steps): its directory and what it printed."""
    cwd = tmp_path_factory.mktemp("train_decoder")
    out = run_example(EXAMPLES_DIR / "train_decoder.py", cwd, "--out", "decoder", "--steps", "2")
    return cwd / "decoder", out


@pytest.mark.parametrize("script", [p for p in EXAMPLES if p.name not in LIBRARY_ONLY | OWN_TEST], ids=lambda p: p.name)
def test_example_runs(script, tmp_path, request):
    if script.name in JAX:
        request.getfixturevalue("jax_quick_compile")
    if script.name == "train_decoder.py":
        directory, out = request.getfixturevalue("decoder")
        assert "saved to" in out and (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file()
        return
    args = ARGS.get(script.name, [])
    if script.name == "explain_generation.py":
        args = ["--model", str(request.getfixturevalue("decoder")[0]), *args]
    run_example(script, tmp_path, *args)


def test_hf_gpt_neox_and_its_penzai_conversion_agree_to_1e5(tmp_path, jax_quick_compile):
    """A Hugging Face GPT-NeoX and Mistral and penzai's JAX conversions of them, both captured by attnflow: every
    method agrees after every layer, to 1e-9 in float64 and to 1e-5 in float32 (value zeroing 1e-6), on padded
    batches (the example's table, read back here); both models compute every method on both sides."""
    out = run_example(EXAMPLES_DIR / "compare_hf_penzai.py", tmp_path)
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    columns = [cell.strip() for cell in lines[0].strip("|").split("|")][2:]
    rows = {}
    for line in lines[1:]:  # the separator row starts with "|-", not "| "
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0], cells[1]] = {c: float(v) for c, v in zip(columns, cells[2:]) if v != "-"}
    assert {dtype for _, dtype in rows} == {"float32", "float64"} and len(rows) == 4
    every = {"attention", "rollout", "flow", "attn_grad", "grad_rollout", "norm", "norm_residual", "alti",
             "value_zeroing", "effective_attention"}
    for (model, dtype), found in rows.items():
        assert set(found) == every, (model, dtype, every - set(found))
        for method, difference in found.items():
            limit = 1e-9 if dtype == "float64" else 1e-6 if method == "value_zeroing" else 1e-5
            assert difference <= limit, (model, dtype, method, difference)


def test_graphml_export_is_readable(tmp_path):
    """export_graphml.py as the README runs it (its output file named), read back with igraph."""
    import igraph

    out = tmp_path / "net.graphml"
    printed = run_example(EXAMPLES_DIR / "export_graphml.py", tmp_path, str(out))
    assert f"wrote {out}" in printed
    graph = igraph.Graph.Read_GraphML(str(out))
    assert graph.vcount() % 7 == 0  # 6 layers + inputs = 7 copies of the tokens
    assert min(graph.es["capacity"]) > 0 and all(label.startswith("L") for label in graph.vs["label"])


def test_sva_evaluate_prints_the_leaderboard_of_every_method(tmp_path):
    """examples/sva: a tiny model trained in seconds, evaluated with every method the torch adapter captures;
    the leaderboard is printed per reference (with the special-token setting) and written as CSV, and the
    summary has the paper's per-layer table (6 layers) over the sentences asked for."""
    import csv
    import json

    sva = EXAMPLES_DIR / "sva"
    run_example(sva / "train.py", tmp_path, "--out", str(tmp_path), "--train", "300", "--test", "60", "--epochs", "1",
                "--width", "16", "--heads", "2")

    def evaluate(*args: str) -> str:
        return run_example(sva / "evaluate.py", tmp_path, "--model", str(tmp_path), *args)

    out = evaluate("--examples", "12")
    assert "Abnar & Zuidema Table 1" in out and "Spearman with blankout" in out
    summary = json.loads((tmp_path / "faithfulness" / "summary.json").read_text())
    assert summary["items"] == 12 and len(summary["spearman"]["flow"]["blankout"]) == 6
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
