"""Names that resolve (issue 22): every `attnflow.*` name the README and the guides write resolves as written, and
the adapter contract's old import path (`attnflow.capture`, hidden by the function) loads no module twice."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

import attnflow

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the CHANGELOG names history too


def _resolve(dotted: str) -> object:
    """``attnflow.a.b``: attribute access from the package, importing submodules the way a user would."""
    parts = dotted.split(".")
    obj: object = attnflow
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def test_every_attnflow_name_in_the_readme_and_guides_resolves():
    names = set()
    for path in DOCS:
        for name in re.findall(r"`(attnflow(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", path.read_text()):
            names.add((name, path.name))
    assert len(names) > 30
    broken = []
    for name, where in sorted(names):
        try:
            _resolve(name)
        except (AttributeError, ImportError) as exc:
            broken.append(f"{where}: {name} ({type(exc).__name__}: {exc})")
    assert not broken, "names that do not resolve:\n" + "\n".join(broken)


def test_the_function_and_the_package_both_resolve():
    assert callable(attnflow.capture) and attnflow.capture.__module__ == "attnflow.recording._capture"
    from attnflow.capture import CAPABILITIES, KINDS, deferred_interrupts, switch  # the old path, one release
    from attnflow.capture._recorder import Recorder

    assert Recorder is attnflow.Recorder and switch is attnflow.recording.switch
    assert KINDS is attnflow.recording.KINDS and CAPABILITIES is attnflow.recording.CAPABILITIES
    assert deferred_interrupts is attnflow.recording.deferred_interrupts
    for name, module in list(sys.modules.items()):
        if name.startswith("attnflow.capture."):
            assert module is sys.modules["attnflow.recording." + name[len("attnflow.capture."):]], name


def test_every_error_class_lives_in_attnflow_errors():
    import inspect

    from attnflow import _errors, errors

    classes = {name for name, obj in vars(_errors).items() if inspect.isclass(obj) and issubclass(obj, Exception)}
    assert classes <= set(errors.__all__)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), attnflow.AttnflowError), name
    assert attnflow.errors.TraceError is attnflow.TraceError  # the top-level name, kept for one release


def test_reprs_that_fit():
    """Displays (issue 22): a layer prints its dtype and shape, never its values; a trace has an HTML view."""
    import numpy as np

    rng = np.random.default_rng(0)
    weights = [rng.dirichlet(np.ones(128), size=(1, 12, 128)).astype(np.float32) for _ in range(2)]
    trace = attnflow.AttentionTrace.from_arrays(weights, tokens=[[f"t{i}" for i in range(128)]])
    text = repr(trace.layers[0])
    assert text == "LayerAttention('layer.0', self, tokens, f32[1,12,128,128])" and "\n" not in text
    page = trace._repr_html_()
    assert page.count("<tr>") == 1 + len(trace.streams) + trace.num_layers and "f32[1,12,128,128]" in page
    assert page.count('title="t') == 2 * 48  # a strip of the first 48 keys per layer, each labelled


def test_replacing_the_recorded_head_fusion_checks_the_rows_again():
    """Found by the mutation pass: dropping head_fusion='max' from a max-fused trace's metadata used to give a trace
    whose rows sum to more than 1 while it claims unfused heads."""
    import numpy as np
    import pytest

    rng = np.random.default_rng(0)
    weights = [rng.dirichlet(np.ones(6), size=(1, 4, 6)).max(axis=1, keepdims=True) for _ in range(2)]
    fused = attnflow.AttentionTrace.from_arrays(weights, tokens=[list("abcdef")], metadata={"head_fusion": "max"})
    with pytest.raises(attnflow.TraceError, match="sums to"):
        fused.replace(metadata={})
    assert fused.replace(metadata={"head_fusion": "max", "note": 1}).metadata["note"] == 1


def test_adapter_modules_grouped_by_framework_keep_their_old_paths():
    """adapters/ is grouped into _torch/ and _jax/ (issue 22, point 8): each module's path from before the grouping
    imports the very module at its new path, its own spec kept; the built-in entry points name the new paths;
    nothing framework-specific is left between the two groups."""
    import importlib.metadata

    import attnflow.adapters as adapters

    root = Path(adapters.__file__).parent
    for group in ("_torch", "_jax"):
        names = sorted(p.stem for p in (root / group).glob("*.py") if p.stem != "__init__")
        assert names, group
        for name in names:
            new = importlib.import_module(f"attnflow.adapters.{group}.{name}")
            old = importlib.import_module(f"attnflow.adapters.{name}")
            assert old is new and old.__spec__.name == new.__name__ == f"attnflow.adapters.{group}.{name}"
    assert sorted(p.stem for p in root.glob("*.py")) == ["__init__", "_hf_families", "_layout", "_maps"]
    built_in = {e.name: e.value for e in importlib.metadata.entry_points(group="attnflow.adapters")
                if e.value.startswith("attnflow.adapters.")}
    assert len(built_in) >= 10 and all(v.startswith(("attnflow.adapters._torch.", "attnflow.adapters._jax."))
                                       for v in built_in.values()), built_in
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("attnflow.adapters.no_such_adapter")
