"""The conformance kit's own tests: deliberately broken adapters fail it, saying which check and why."""

from __future__ import annotations

import contextlib
import sys
import textwrap

import pytest
import torch
from attnflow.adapters._torch.torch_hooks import TorchAdapter
from test_conformance import mha_reference

import attnflow
from attnflow.testing import check_adapter, models


def run(adapter, checks):
    check_adapter(adapter, models.torch_encoder, models.torch_encoder_inputs, mha_reference, checks=checks)


class LeavesAHook(TorchAdapter):
    name = "leaves_a_hook"

    @contextlib.contextmanager
    def hooks(self, model, recorder, **options):
        model.register_forward_hook(lambda *args: None)  # never removed
        with super().hooks(model, recorder, **options):
            yield


class LeavesTheFastPathOff(TorchAdapter):
    name = "leaves_fastpath_off"

    @contextlib.contextmanager
    def hooks(self, model, recorder, **options):
        with super().hooks(model, recorder, disable_fastpath=False):
            torch.backends.mha.set_fastpath_enabled(False)
            yield


class _Rewriting(TorchAdapter):
    """Hands the recorder something else than what the model computed."""

    def rewrite(self, recorder, record, name, weights, **kwargs):
        record(name, weights, **kwargs)

    @contextlib.contextmanager
    def hooks(self, model, recorder, **options):
        record = recorder.record
        recorder.record = lambda name, weights, **kwargs: self.rewrite(recorder, record, name, weights, **kwargs)
        try:
            with super().hooks(model, recorder, **options):
                yield
        finally:
            recorder.record = record


class SwapsAxes(_Rewriting):
    name = "swaps_axes"

    def rewrite(self, recorder, record, name, weights, **kwargs):
        record(name, weights.swapaxes(-1, -2), **kwargs)


class DropsALayer(_Rewriting):
    name = "drops_a_layer"

    def rewrite(self, recorder, record, name, weights, **kwargs):
        if not name.endswith("0.self_attn"):
            record(name, weights, **kwargs)


class SwallowsErrors(TorchAdapter):
    name = "swallows_errors"

    @contextlib.contextmanager
    def hooks(self, model, recorder, **options):
        with super().hooks(model, recorder, **options):
            try:
                yield
            except Exception:
                pass


@pytest.fixture(autouse=True)
def fastpath_back_on():
    yield
    torch.backends.mha.set_fastpath_enabled(True)


def test_a_good_adapter_passes_every_check():
    run(TorchAdapter(), ["declaration", "weights", "restored", "raises", "interrupt", "nested", "overlapping"])


@pytest.mark.parametrize(
    "adapter, check, message",
    [
        (LeavesAHook(), "restored", r"check 'restored' failed: the model or the process changed.*torch hooks"),
        (LeavesTheFastPathOff(), "restored", r"check 'restored' failed: .*fastpath\]: True -> False"),
        (SwapsAxes(), "weights", r"check 'weights' failed: TraceError: Layer 0 .* sums to"),
        (DropsALayer(), "weights", r"check 'weights' failed: the trace has 2 layers .*the reference 3"),
        (SwallowsErrors(), "raises", r"check 'raises' failed: the injected InjectedFailure did not propagate"),
    ],
    ids=["hook-left-behind", "switch-left-on", "axes-swapped", "layer-dropped", "errors-swallowed"],
)
def test_broken_adapters_fail_the_kit_saying_why(adapter, check, message):
    with pytest.raises(AssertionError, match=message):
        run(adapter, [check])


def test_an_adapter_module_that_imports_a_framework_fails_the_light_import_check(tmp_path, monkeypatch):
    (tmp_path / "heavy_adapter_mod.py").write_text(textwrap.dedent("""
        import torch  # at module level: every attnflow import would load torch
        from attnflow.adapters._torch.torch_hooks import TorchAdapter

        class Heavy(TorchAdapter):
            name = "heavy"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + ":" + ":".join(sys.path))
    from heavy_adapter_mod import Heavy

    with pytest.raises(AssertionError, match=r"check 'light_import' failed: importing 'heavy_adapter_mod' imports torch"):
        run(Heavy(), ["light_import"])
    run(TorchAdapter(), ["light_import"])


def test_a_broken_declaration_fails_the_declaration_check():
    class BadOptions(TorchAdapter):
        name = "bad_options"
        options = (attnflow.AdapterOption("colour", str),)

    with pytest.raises(AssertionError, match=r"check 'declaration' failed: .*declares 'colour'"):
        run(BadOptions(), ["declaration"])


def test_unknown_checks_and_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="Unknown check 'speed'"):
        run(TorchAdapter(), ["speed"])
    with pytest.raises(AssertionError, match=r"must return \(args, kwargs\)"):
        check_adapter(TorchAdapter(), models.torch_encoder, lambda m: [1, 2], checks=["weights"])
