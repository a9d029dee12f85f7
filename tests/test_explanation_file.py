"""Explanation files are checked on load like traces: every header field typed and ranged, arrays consistent
with the header, scores finite. A file that loads gives an Explanation whose writers work."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import attnflow
from attnflow._explanation import FORMAT, FORMAT_VERSION, load_explanation
from attnflow._tensorfile import read_tensor_file, write_tensor_file

LAYERS, BATCH, HEADS, SEQ = 3, 2, 4, 5


def tiny_explanation():
    rng = np.random.default_rng(7)
    weights = [rng.dirichlet(np.ones(SEQ), size=(BATCH, HEADS, SEQ)) for _ in range(LAYERS)]
    for w in weights:
        w[1, :, :, 3:] = 0
        w[1] /= w[1].sum(-1, keepdims=True)
    mask = np.ones((BATCH, SEQ), bool)
    mask[1, 3:] = False
    trace = attnflow.AttentionTrace.from_arrays(weights, mask=mask, tokens=[list("abcde"), list("fgh..")],
                                                model_name="tiny", metadata={"note": "x"})
    return attnflow.explain(trace, ["raw", "rollout", "flow"], sources=[0, -1], all_layers=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("explanation") / "e.safetensors"
    tiny_explanation().save(path)
    tensors, header = read_tensor_file(path, format=FORMAT, versions=(FORMAT_VERSION,))
    for key in ("format", "version", "sha256"):
        header.pop(key)
    return path, tensors, header


def rewrite(path, tensors, header):
    """A correctly checksummed file holding ``tensors`` and ``header``: only the loader's checks can refuse it."""
    write_tensor_file(path, tensors, header, format=FORMAT, version=FORMAT_VERSION)
    return path


def works(explanation) -> None:
    """What users do with a loaded explanation: none of it may raise."""
    explanation.to_html()
    explanation.to_frame()
    for method in explanation.methods:
        explanation[method]
        explanation.layers(method)
    repr(explanation)


def test_a_saved_explanation_loads_equal(saved):
    path, _, _ = saved
    loaded, original = load_explanation(path), tiny_explanation()
    assert loaded.methods == original.methods and loaded.sources.tolist() == original.sources.tolist()
    for method in original.methods:
        np.testing.assert_array_equal(loaded.layers(method), original.layers(method))
    works(loaded)


def _set(header, path, value):
    header = copy.deepcopy(header)
    target = header
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return header


CRAFTED = [
    (("model_name",), 3), (("framework",), None), (("stream",), "decoder"), (("stream",), 7),
    (("streams", 0, "name"), ""), (("streams", 0, "causal"), "yes"), (("streams", 0, "grid"), [0, 5]),
    (("streams", 0, "tokens"), [["a"], ["b"]]), (("streams", 0, "tokens"), "abc"),
    (("methods", 1, "name"), "raw"), (("methods", 0, "name"), "no spaces please"),
    (("methods", 0, "layers"), [0, 1, 1 << 40]), (("methods", 0, "layers"), [2, 1, 0]),
    (("methods", 0, "layers"), [-1, 0, 1]), (("methods", 0, "layers"), [0, 1, True]),
    (("methods", 0, "streams"), ["elsewhere"]), (("methods", 0, "streams"), []),
    (("requested_sources",), [0]), (("requested_sources",), [0, "x"]), (("source_labels",), [["a", "b"]]),
    (("source_labels",), [["a", "b"], ["c"]]), (("options",), {"residual": 7}), (("options",), {"nope": 1}),
    (("options",), {"heads": {"x": [0]}}), (("metadata",), []), (("metadata",), {"skipped_methods": {"alti": 3}}),
    (("methods",), []), (("streams",), []),
]


@pytest.mark.parametrize(("where", "value"), CRAFTED, ids=[f"{'.'.join(map(str, w))}={v!r}"[:60] for w, v in CRAFTED])
def test_crafted_headers_are_refused(saved, tmp_path, where, value):
    path, tensors, header = saved
    with pytest.raises(attnflow.TraceFileError, match="damaged attnflow explanation"):
        load_explanation(rewrite(tmp_path / "bad.safetensors", tensors, _set(header, where, value)))


def _array_edits(tensors):
    nan = tensors["scores.0.0"].copy()
    nan[0, 0, 0, 1] = np.nan
    big = tensors["scores.1.0"].copy()
    big[-1, 1, 1, 0] = np.inf
    bytes_mask = tensors["streams.0.mask"].view(np.uint8).copy()
    bytes_mask[0, 0] = 2
    yield "nan score", {"scores.0.0": nan}
    yield "inf score", {"scores.1.0": big}
    yield "source out of range", {"sources": tensors["sources"] + SEQ}
    yield "negative source", {"sources": tensors["sources"] - SEQ}
    yield "float sources", {"sources": tensors["sources"].astype(np.float64)}
    yield "scores of another shape", {"scores.2.0": tensors["scores.2.0"][:, :, :1]}
    yield "integer scores", {"scores.0.0": tensors["scores.0.0"].astype(np.int64)}
    yield "mask byte 2", {"streams.0.mask": bytes_mask.view(np.bool_)}
    yield "mask of another shape", {"streams.0.mask": tensors["streams.0.mask"][:, :3]}
    yield "special as ints", {"streams.0.special": tensors["streams.0.special"].astype(np.int8)}
    yield "a stray array", {"extra": np.zeros(3)}


def test_crafted_arrays_are_refused(saved, tmp_path):
    path, tensors, header = saved
    for what, edit in _array_edits(tensors):
        with pytest.raises(attnflow.TraceFileError):
            load_explanation(rewrite(tmp_path / "bad.safetensors", {**tensors, **edit}, header))
            pytest.fail(what)
    missing = dict(tensors)
    del missing["scores.1.0"]
    with pytest.raises(attnflow.TraceFileError, match="missing"):
        load_explanation(rewrite(tmp_path / "bad.safetensors", missing, header))


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


POOL = [None, True, 0, 1, -1, 2, 7, 1 << 40, 0.5, "", "x", "raw", "tokens", [], [0], [0, 1], [[]], [["a"]], {},
        {"a": 1}]


def test_seeded_fuzz_of_headers_and_arrays(saved, tmp_path):
    """Random edits of one header value (re-checksummed) or one array: refused with TraceFileError, or loaded
    into an explanation whose writers work. Never another exception."""
    path, tensors, header = saved
    rng = np.random.default_rng(20261207)
    paths = [p for p in _paths(header) if p]
    outcomes = {"refused": 0, "loaded": 0}
    for _ in range(400):
        edited_header, edited_tensors = header, tensors
        if rng.random() < 0.8:
            where = paths[rng.integers(len(paths))]
            edited_header = _set(header, where, copy.deepcopy(POOL[rng.integers(len(POOL))]))
        else:
            key = sorted(tensors)[rng.integers(len(tensors))]
            array = np.array(tensors[key])
            flat = array.reshape(-1)
            if flat.size and array.dtype.kind == "f":
                flat[rng.integers(flat.size)] = [np.nan, np.inf, -1.0, 1e30][rng.integers(4)]
            elif flat.size and array.dtype.kind in "iu":
                flat[rng.integers(flat.size)] = int(rng.integers(-3, 3 * SEQ))
            elif flat.size:
                flat.view(np.uint8)[rng.integers(flat.size)] = int(rng.integers(0, 256))
            edited_tensors = {**tensors, key: array}
        try:
            json.dumps(edited_header)
            loaded = load_explanation(rewrite(tmp_path / "fuzz.safetensors", edited_tensors, edited_header))
        except attnflow.TraceFileError:
            outcomes["refused"] += 1
            continue
        works(loaded)
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 10, outcomes
