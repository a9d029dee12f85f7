"""The wheel a user installs (issue 23, point 1): built offline from the checkout, installed without
dependencies into a fresh virtual environment that sees this environment's packages, and used from a
directory outside the checkout: the quick start runs and the HTML page carries its packaged script."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import attnflow

ROOT = Path(__file__).resolve().parents[1]

QUICK_START = textwrap.dedent("""
    import attnflow, sys
    from transformers import AutoModel, AutoTokenizer

    assert attnflow.__file__.startswith(sys.prefix), attnflow.__file__  # the installed copy, not the checkout
    tokenizer = AutoTokenizer.from_pretrained(attnflow.packaged_model_dir())
    model = AutoModel.from_pretrained(attnflow.packaged_model_dir())
    inputs = tokenizer(["The keys to the cabinet are on the table."], return_tensors="pt")
    trace = attnflow.capture(model, tokens=tokenizer, methods=["rollout", "alti"], **inputs)
    e = attnflow.explain(trace, ["raw", "rollout", "flow", "alti"], sources=[0])
    page = e.to_html(trace)
    assert "attnflow-data" in page and "DecompressionStream" in page  # view.js, packaged data
    assert abs(e["alti"][0, 0].sum() - 1) < 1e-9
    import attnflow.adapters
    print("ok", attnflow.__version__, sorted(attnflow.list_adapters())[:2])
""")


def test_the_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("attnflow-*.whl")
    assert wheel.name.startswith(f"attnflow-{attnflow.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    for packaged in ("attnflow/html/view.js", "attnflow/html/view.css", "attnflow/py.typed",
                     "attnflow/adapters/_torch/hf_transformers.py"):
        assert packaged in names, packaged
    assert not any(name.startswith(("tests/", "examples/")) for name in names)

    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies come from this environment; attnflow itself only from the wheel
    (site / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(python), "-c", QUICK_START], cwd=away, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"ok {attnflow.__version__}")
    cli = subprocess.run([str(env_dir / "bin" / "attnflow"), "--version"], cwd=away, capture_output=True, text=True,
                         env=env, timeout=120)
    assert cli.stdout.strip() == f"attnflow {attnflow.__version__}"
