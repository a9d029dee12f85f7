"""One version (issue 23): written once in attnflow/_version.py, read by pyproject.toml, printed by
`attnflow --version`, recorded in every file attnflow writes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import tomllib

import attnflow
from attnflow._tensorfile import read_tensor_file

ROOT = Path(__file__).resolve().parents[1]


def test_one_version_everywhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    setting = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]["version"]
    assert setting == {"attr": "attnflow._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", attnflow.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {attnflow.__version__}" in changelog, "the CHANGELOG names the release the code says it is"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert project["license"] == "MIT"


def test_cli_prints_the_version():
    result = subprocess.run([sys.executable, "-m", "attnflow.cli", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"attnflow {attnflow.__version__}"


def test_written_files_record_the_version(tmp_path):
    weights = [np.full((1, 2, 3, 3), 1 / 3)]
    trace = attnflow.AttentionTrace.from_arrays(weights, tokens=[list("abc")])
    trace.save(tmp_path / "t.safetensors")
    attnflow.explain(trace, ["rollout"]).save(tmp_path / "e.safetensors")
    for name, fmt in (("t", "attnflow.trace"), ("e", "attnflow.explanation")):
        _, header = read_tensor_file(tmp_path / f"{name}.safetensors", format=fmt, versions=(1, 2))
        assert header["attnflow"] == attnflow.__version__, name
