"""The method author's kit: every registered method passes check_method (add a method to the registry and it
is checked), a ten-line third-party method built on the kit passes and reaches every door, and each invariant
catches the bug it is for."""

from __future__ import annotations

import numpy as np
import pytest

import attnflow
from attnflow.testing import check_method, method_traces


def _traces_for(method, cache):
    needs = set(attnflow.get_method(method).needs)
    if needs <= {"weights"}:
        key = "weights"
    else:
        key = "all"
    if key not in cache:
        cache[key] = method_traces(method) if key == "weights" else _everything()
    return cache[key]


def _everything():
    """Traces with gradients, values and value zeroing (what every built-in method needs)."""
    import torch
    import transformers

    from attnflow.testing import _methods

    return {name: attnflow.capture(build(), methods="all", **inputs(torch))
            for name, (build, inputs) in _methods._models(torch, transformers).items()}


_CACHE: dict = {}


@pytest.mark.parametrize("method", attnflow.list_methods())
def test_every_registered_method_keeps_the_invariants(method):
    check_method(method, _traces_for(method, _CACHE))


class Smoothed(attnflow.LayerMethod):
    """A third party's per-layer method in a few lines: attention mixed with uniform over the real keys."""

    name = "smoothed_for_test"
    row_sum = "one"

    def layer_scores(self, trace, layer, item, options):
        fused = trace.layers[layer].weights[item].mean(0)
        q, k = trace.valid_index(item, trace.layers[layer].query_stream), trace.valid_index(item, trace.layers[layer].key_stream)
        return 0.5 * fused[np.ix_(q, k)] + 0.5 / k.size


class Sharpened(attnflow.RoutedMethod):
    """A third party's routed method: squared attention, routed like rollout."""

    name = "sharpened_for_test"

    def edge_scores(self, trace, layer, item, options):
        fused = trace.layers[layer].weights[item].mean(0) ** 2
        q, k = trace.valid_index(item, trace.layers[layer].query_stream), trace.valid_index(item, trace.layers[layer].key_stream)
        return fused[np.ix_(q, k)]


@pytest.mark.parametrize("method", [Smoothed(), Sharpened()], ids=["layer", "routed"])
def test_a_kit_method_passes_unregistered_and_registered(method):
    check_method(method, _traces_for("rollout", _CACHE))
    attnflow.register_method(type(method))
    try:
        trace = _traces_for("rollout", _CACHE)["encoder"]
        explanation = attnflow.explain(trace, "all")
        assert method.name in explanation.methods
        np.testing.assert_allclose(explanation[method.name], attnflow.explain(trace, [method])[method.name])
    finally:
        attnflow.unregister_method(method.name)


def test_sharpened_equals_rollout_of_its_edges_by_hand():
    """The routed kit: (1-r) * rownorm(A^2) + r * I per layer, multiplied from the last layer down (Abnar & Zuidema's
    rollout with other edges), on a padded trace, written here with numpy."""
    trace = _traces_for("rollout", _CACHE)["encoder"]
    scores = attnflow.explain(trace, [Sharpened()])["sharpened_for_test"]
    for b in range(trace.batch_size):
        real = trace.valid_index(b)
        product = np.eye(real.size)
        for layer in trace.layers:
            a = layer.weights[b].astype(np.float64).mean(0)[np.ix_(real, real)] ** 2
            a = a / a.sum(-1, keepdims=True)
            product = (0.5 * a + 0.5 * np.eye(real.size)) @ product
        np.testing.assert_allclose(scores[b][np.ix_(real, real)], product, atol=1e-10)


class _Broken(attnflow.Method):
    name = "broken_for_test"
    row_sum = "one"

    def compute(self, trace, options, *, stream, sources, all_layers):
        raw = attnflow.get_method("raw").compute(trace, options, stream=stream, sources=sources, all_layers=all_layers)
        return {name: self.damage(trace, array.copy()) for name, array in raw.items()}


class PadsRows(_Broken):
    def damage(self, trace, array):  # the old example plugin's bug: scores on padded rows
        array[:, 1, -1, :] = 0.1
        return array


class IgnoresSources(_Broken):
    def compute(self, trace, options, *, stream, sources, all_layers):
        return super().compute(trace, options, stream=stream, sources=None, all_layers=all_layers) if sources is None else {
            name: np.zeros_like(a)[:, :, : len(sources)] + 1e-3 for name, a in super().compute(
                trace, options, stream=stream, sources=sources, all_layers=all_layers).items()}

    def damage(self, trace, array):
        return array


class HalfRows(_Broken):
    def damage(self, trace, array):
        return array * 0.5


class NaNs(_Broken):
    def damage(self, trace, array):
        array[0, 0, 0, 0] = np.nan
        return array


@pytest.mark.parametrize(("method", "invariant"), [
    (PadsRows(), "padding"), (IgnoresSources(), "sources"), (HalfRows(), "row_sum"), (NaNs(), "finite"),
])
def test_each_invariant_catches_its_bug(method, invariant):
    with pytest.raises(AssertionError, match=f"^{invariant}: "):
        check_method(method, {"encoder": _traces_for("rollout", _CACHE)["encoder"]})


def test_the_guide_examples_run_and_pass_the_kit():
    """docs/methods.md's first Python block, run as written (its register_method undone afterwards)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "docs/methods.md", "exec"), namespace)  # noqa: S102 - our own documentation
    try:
        for name in ("Smoothed", "Sharpened"):
            check_method(namespace[name](), {"encoder": _traces_for("rollout", _CACHE)["encoder"]})
        assert "smoothed" in attnflow.list_methods()
    finally:
        attnflow.unregister_method("smoothed")
