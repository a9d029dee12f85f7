"""The README's Python blocks run as written, in order, on the packaged model (issue 23: the front door works
verbatim)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quick start saves files into the working directory
    namespace: dict = {}
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) >= 3
    for number, block in enumerate(blocks):
        exec(compile(block, f"README.md block {number + 1}", "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "trace.safetensors").is_file()
    assert "alti" in namespace["e"].methods
