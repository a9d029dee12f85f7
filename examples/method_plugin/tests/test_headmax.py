"""The plugin passes attnflow's method checks and reaches the doors without any of them knowing it."""

from __future__ import annotations

import numpy as np

import attnflow
from attnflow.testing import check_method, method_traces


def test_registered_through_its_entry_point():
    assert "head_max" in attnflow.list_methods()


def test_keeps_every_invariant():
    check_method("head_max")


def test_equals_the_sharpest_head_by_hand():
    trace = method_traces("head_max")["encoder"]
    scores = attnflow.explain(trace, ["head_max"], all_layers=True).layers("head_max")
    for b in range(trace.batch_size):
        real = trace.valid_index(b)
        for d, layer in enumerate(trace.layers):
            heads = layer.weights[b][:, real][:, :, real].astype(np.float64)
            best = max(range(heads.shape[0]), key=lambda h: heads[h].max(-1).mean())
            np.testing.assert_allclose(scores[d, b][np.ix_(real, real)], heads[best], atol=1e-12)


def test_all_methods_include_it():
    trace = method_traces("head_max")["causal"]
    assert "head_max" in attnflow.explain(trace, "all").methods
