"""Every expected failure of the command line is one clear line and a non-zero exit, never a traceback.

Bad invocations of explain, compare and batch run through ``attnflow.cli.main`` in this process; a full disk
is simulated in a subprocess whose file-size limit (RLIMIT_FSIZE) makes writes fail with EFBIG. Settings are
checked before any model loads: those cases name a model directory that does not exist, so a check made
after loading would report the missing model instead.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import attnflow
from attnflow.cli import main

LONG_TEXT = " ".join("abcdefghijklmnopqrst")  # 22 tokens with [CLS] and [SEP]; the tiny model takes 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the bad invocations point at: a regular file, traces, a JSONL input, model directories."""
    from test_transformers_adapter import remote_code_dir, tiny_model_dir

    root = tmp_path_factory.mktemp("cli-errors")
    paths = {"dir": root / "a-dir", "file": root / "a-file", "jsonl": root / "in.jsonl"}
    paths["dir"].mkdir()
    paths["file"].write_text("not a directory")
    paths["jsonl"].write_text(json.dumps({"text": "hello"}) + "\n")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        weights = rng.dirichlet(np.ones(4), size=(1, 2, 4)).astype(np.float32)
        paths[name] = root / f"{name}.safetensors"
        attnflow.AttentionTrace.from_arrays([weights]).save(paths[name])
    paths["tiny"] = tiny_model_dir(root / "tiny")
    paths["truncated"] = tiny_model_dir(root / "truncated")
    weights = paths["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    paths["pickled"] = tiny_model_dir(root / "pickled")
    (paths["pickled"] / "model.safetensors").unlink()
    import torch

    torch.save({"not": object()}, paths["pickled"] / "pytorch_model.bin")
    paths["remote"], paths["marker"] = remote_code_dir(root / "remote")
    paths["missing"] = root / "no-such-model"
    return paths


def assert_one_error_line(stderr, expected):
    """attnflow wrote exactly one line, the error, and it is the last thing on stderr (transformers' own
    "Loading weights" progress bar may come before it)."""
    ours = [line for line in stderr.splitlines() if line.startswith("attnflow")]
    assert len(ours) == 1 and ours[0].startswith("attnflow: error: "), stderr
    assert stderr.endswith(ours[0] + "\n") and expected in ours[0], stderr
    assert "Traceback" not in stderr


def explain(*args):
    return ["explain", "a b c", *args]


def batch(p, *args):
    return ["batch", str(p["jsonl"]), "--no-progress", *args]


def compare(p, *args):
    return ["compare", str(p["a"]), str(p["b"]), "--no-flow", *args]


CASES = {
    "explain --out onto a file": (lambda p: explain("--out", str(p["file"])), "exists and is not a directory"),
    "explain --out under a file": (lambda p: explain("--out", str(p["file"] / "out")), "Cannot create"),
    "batch --out onto a file": (lambda p: batch(p, "--out", str(p["file"])), "exists and is not a directory"),
    "batch --out under a file": (lambda p: batch(p, "--out", str(p["file"] / "out")), "Cannot create"),
    "compare --png into a directory": (lambda p: compare(p, "--png", str(p["dir"])), "is a directory"),
    "compare --json into a missing directory": (
        lambda p: compare(p, "--json", str(p["dir"] / "missing" / "r.json")), "does not exist"),
    "compare --html under a file": (lambda p: compare(p, "--html", str(p["file"] / "r.html")), "not a directory"),
    "explain a truncated model.safetensors": (
        lambda p: explain("--model", str(p["truncated"]), "--out", str(p["dir"] / "o1")), "Cannot load"),
    "explain a pickle-only model": (
        lambda p: explain("--model", str(p["pickled"]), "--out", str(p["dir"] / "o2")), "Cannot load"),
    "explain a text longer than the model takes": (
        lambda p: ["explain", LONG_TEXT, "--model", str(p["tiny"]), "--out", str(p["dir"] / "o3")], "--max-length 16"),
    "explain a model with its own code": (
        lambda p: explain("--model", str(p["remote"]), "--out", str(p["dir"] / "o4")), "--trust-remote-code"),
    "batch --scheduler notaurl": (
        lambda p: batch(p, "--out", str(p["dir"] / "b1"), "--scheduler", "notaurl"), "not a Dask scheduler address"),
    "batch --tls-* with a missing certificate": (
        lambda p: batch(p, "--out", str(p["dir"] / "b2"), "--scheduler", "tls://127.0.0.1:8786",
                        "--tls-ca-file", str(p["file"]), "--tls-cert", str(p["dir"] / "none.pem"),
                        "--tls-key", str(p["file"])), "--tls-cert: no PEM file"),
    "batch --tls-* with a certificate that is not PEM": (
        lambda p: batch(p, "--out", str(p["dir"] / "b5"), "--scheduler", "tls://127.0.0.1:8786",
                        *[arg for flag in ("--tls-ca-file", "--tls-cert", "--tls-key") for arg in (flag, str(p["file"]))]),
        "Cannot reach the Dask scheduler"),
    "explain --residual 1.5": (lambda p: explain("--residual", "1.5", "--model", str(p["missing"])), "residual"),
    "explain --discard-ratio 1": (lambda p: explain("--discard-ratio", "1", "--model", str(p["missing"])), "discard_ratio"),
    "explain --max-seconds nan": (lambda p: explain("--max-seconds", "nan", "--model", str(p["missing"])), "max_seconds"),
    "explain --max-seconds -1": (lambda p: explain("--max-seconds", "-1", "--model", str(p["missing"])), "max_seconds"),
    "explain --top 0": (lambda p: explain("--top", "0", "--model", str(p["missing"])), "--top"),
    "batch --residual 1.5": (
        lambda p: batch(p, "--out", str(p["dir"] / "b3"), "--residual", "1.5", "--model", str(p["missing"])), "residual"),
    "batch --max-seconds nan": (
        lambda p: batch(p, "--out", str(p["dir"] / "b4"), "--max-seconds", "nan", "--model", str(p["missing"])),
        "max_seconds"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_invocation_is_one_clear_line(case, files, capsys, monkeypatch):
    argv, expected = CASES[case]
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # any prompt would be answered "yes"
    status = main(argv(files))
    err = capsys.readouterr().err
    assert status == 1, err
    assert_one_error_line(err, expected)
    assert not files["marker"].exists()  # the model directory's own code never ran


def test_over_long_text_is_explained_when_truncation_is_asked_for(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["explain", LONG_TEXT, "--model", str(files["tiny"]), "--out", str(out), "--max-length", "16"]) == 0
    capsys.readouterr()
    assert len(json.loads((out / "explanation.json").read_text())["tokens"]) == 16


# Sets the file-size limit, then becomes the attnflow command (a plain spawn: no preexec_fn fork of this
# process, which may run JAX threads).
LIMITED = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200)); os.execv(sys.executable, sys.argv[1:])"


@pytest.mark.parametrize("command", ["compare --json", "compare --png", "explain"])
def test_full_disk_is_one_clear_line(command, files, tmp_path):
    """Writes beyond RLIMIT_FSIZE fail with EFBIG (Python ignores SIGXFSZ), as on a full disk."""
    out = tmp_path / "out"
    out.mkdir()
    argv = {
        "compare --json": compare(files, "--json", str(out / "r.json")),
        "compare --png": compare(files, "--png", str(out / "r.png")),
        "explain": ["explain", "a b c", "--model", str(files["tiny"]), "--out", str(out)],
    }[command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", LIMITED, sys.executable, "-m", "attnflow.cli", *argv], capture_output=True, text=True,
        env=env, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert_one_error_line(result.stderr, "File too large (free some disk space or write elsewhere)")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written temporary files


def test_generate_without_its_model_names_the_recipe(tmp_path, capsys):
    """The guide's --generate example needs a trained decoder; a missing directory says how to make one."""
    from attnflow.cli import main

    missing = tmp_path / "docstring-gpt2"
    assert main(["explain", "--generate", "3", "Return True", "--model", str(missing), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"python examples/train_decoder.py --out {missing} --steps 300" in err
