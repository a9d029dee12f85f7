"""Every family of tests/families.py captures in one attnflow.capture call, exactly as the model itself
reports its attention, and explains; the family table in docs/families.md is the one families.py writes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from families import FAMILIES, table

import attnflow

TOL = 1e-6


def _outputs(model, inputs):
    import torch

    with torch.no_grad():
        out = model(**inputs)
    tensors = out.to_tuple() if hasattr(out, "to_tuple") else (out if isinstance(out, tuple) else (out,))
    return [t.clone() for t in tensors if isinstance(t, torch.Tensor)]


def _implementation(model):
    config = getattr(model, "config", None)
    return None if config is None else config._attn_implementation


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_captures_exactly_and_explains(family, hooks_of):
    model = family.build()
    inputs = family.inputs(model)
    plain = family.plain(model)
    before, implementation, hooks = _outputs(plain, inputs), _implementation(plain), hooks_of(plain)
    trace = attnflow.capture(model, **inputs)
    assert _implementation(plain) == implementation and hooks_of(plain) == hooks
    expected = family.reference(model, inputs)
    assert list(trace.streams) == list(family.streams)
    assert trace.num_layers == len(expected)
    for index, (layer, (query, key, weights)) in enumerate(zip(trace.layers, expected)):
        assert (layer.query_stream, layer.key_stream) == (query, key or query), f"layer {index} {layer.name}"
        np.testing.assert_allclose(layer.weights, weights.numpy(), atol=TOL, rtol=0, err_msg=f"layer {index}")
    for a, b in zip(before, _outputs(plain, inputs)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for stream in _output_streams(trace):
        explanation = attnflow.explain(trace, ["rollout", "flow"], stream=stream, sources=[-1])
        for method in ("rollout", "flow"):
            scores = explanation[method]
            total = sum(v.sum(-1) for v in scores.values()) if isinstance(scores, dict) else scores.sum(-1)
            np.testing.assert_allclose(total, 1.0, atol=1e-9)


def _output_streams(trace):
    drawn = {layer.key_stream for layer in trace.layers if layer.kind == "cross"} | {link.source for link in trace.links}
    return [name for name in trace.streams if name not in drawn]


def test_family_table_is_written_from_the_matrix():
    root = Path(__file__).parent.parent
    document = (root / "docs" / "families.md").read_text()
    found = re.search(r"<!-- families:start -->\n(.*?)\n<!-- families:end -->", document, re.S)
    assert found, "docs/families.md lacks the families table markers"
    assert found.group(1).strip() == table().strip(), (
        "docs/families.md's family table is out of date: run `python tests/families.py --table` and paste it "
        "between the markers"
    )
    assert "(docs/families.md)" in (root / "README.md").read_text(), "README.md no longer links to docs/families.md"
