"""The API reference builds from the docstrings with no warning (mkdocs --strict), as `make docs` does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_builds_without_warnings(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "site" / "api" / "attnflow" / "index.html").read_text()
    for name in ("recording._capture.capture", "attach", "explain", "Explanation", "rollout", "flow", "Options"):
        assert f'id="attnflow.{name}"' in page, name
