"""attnflow without its optional frameworks: light import, and a clear error naming the extra to install.

Each check runs in a fresh interpreter: this test process has torch loaded already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

FRAMEWORKS = ("torch", "jax", "flax", "transformers")


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )


def test_import_attnflow_imports_no_framework():
    result = run_python(
        f"""
        import json, sys
        import attnflow
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r})))
        """
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_import_attnflow_stays_light():
    """Heavy optional packages load only when used: numba for flow, dask for batch, matplotlib/igraph for plots."""
    heavy = ("numba", "dask", "distributed", "pandas", "pyarrow", "matplotlib", "igraph")
    result = run_python(
        f"""
        import json, sys
        import attnflow
        print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))))
        """
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_loading_the_adapter_entry_points_imports_no_framework():
    result = run_python(
        f"""
        import json, sys
        import attnflow
        names = list(attnflow.list_adapters())
        assert "torch" in names and "transformers" in names, names
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r})))
        """
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize(("blocked", "adapter"), [("torch", "torch"), ("torch", "transformers"), ("transformers", "transformers")])
def test_named_adapter_without_its_framework_names_the_extra(blocked, adapter):
    result = run_python(
        f"""
        import sys
        sys.modules[{blocked!r}] = None  # as if not installed: importing it raises ImportError
        import attnflow
        try:
            attnflow.capture(object(), adapter={adapter!r})
        except attnflow.MissingDependencyError as exc:
            assert isinstance(exc, ImportError)
            print("MESSAGE:", exc)
        else:
            raise SystemExit("no MissingDependencyError")
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr
    message = result.stdout.split("MESSAGE:", 1)[1]
    assert f"pip install 'attnflow[{adapter}]'" in message
    assert repr(blocked) in message or repr(adapter) in message


def test_unclaimed_model_without_frameworks_lists_adapters_and_imports_nothing():
    result = run_python(
        f"""
        import json, sys
        sys.modules["torch"] = None
        import attnflow
        try:
            attnflow.capture(object())
        except attnflow.AdapterError as exc:
            print(json.dumps([str(exc), sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r} and sys.modules[m] is not None)]))
        """
    )
    assert result.returncode == 0, result.stderr
    message, imported = json.loads(result.stdout)
    assert "No adapter recognises a model of type builtins.object" in message
    assert "torch (torch)" in message and "transformers (transformers)" in message
    assert imported == []
