"""What a mutation pass over attnflow/trace/ found untested (issue 20, point 7): one item of a multi-stream
trace (select, with and without crop) with its extras, links, patch grid and generation metadata; every
header field of a trace file named in its error; format-1 files with cross layers, extras and a causal flag
that differs from detection; links' depth and row checks; the metadata's nesting limit; the reprs.

Every expected value is computed here from the arrays the test built. Sizes differ on every axis: batch 2;
vision 7 positions (CLS + a 2x3 patch grid), 3 heads; text 5 positions (item 0 left-padded to 3 real tokens,
item 1 right-padded to 4), 4 heads; extras of width 6.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

import attnflow
from attnflow import AttentionTrace, LayerAttention, Link, Stream, TraceError, TraceFileError
from attnflow._tensorfile import write_tensor_file

BATCH, VISION, TEXT, VH, TH, WIDTH = 2, 7, 5, 3, 4, 6
TEXT_MASK = np.array([[False, False, True, True, True], [True, True, True, True, False]])
VISION_SPECIAL = np.zeros((BATCH, VISION), bool)
VISION_SPECIAL[0, 0] = True  # item 0: CLS first
VISION_SPECIAL[1, 6] = True  # item 1: CLS last
TEXT_TOKENS = [["<pad>", "<pad>", "a", "cat", "sat"], ["the", "dog", "ran", "off", "<pad>"]]
VISION_TOKENS = [[f"v{b}.{i}" for i in range(VISION)] for b in range(BATCH)]
GENERATION = {"stream": "text", "first_generated": 3, "mode": "stitch", "lengths": [2, 1],
              "generated_ids": [[11, 12], [13]]}


def attention(rng, shape, key_mask, causal=False):
    """Rows summing to 1 over the real (and, if causal, earlier) keys; rows with no such key are all 0."""
    allowed = np.broadcast_to(key_mask[:, None, None, :], shape).copy()
    if causal:
        allowed &= np.tril(np.ones(shape[-2:], bool))
    w = rng.random(shape) * allowed
    sums = w.sum(-1, keepdims=True)
    return np.divide(w, sums, out=np.zeros_like(w), where=sums > 0)


def vlm_parts(seed=0):
    """The arrays of a small LLaVA-like trace: 2 vision layers, then text self, text->vision cross, text self;
    a link feeding text position 3 from the vision patches after both vision layers."""
    rng = np.random.default_rng(seed)
    vision_mask = np.ones((BATCH, VISION), bool)
    weights = [
        attention(rng, (BATCH, VH, VISION, VISION), vision_mask),
        attention(rng, (BATCH, VH, VISION, VISION), vision_mask),
        attention(rng, (BATCH, TH, TEXT, TEXT), TEXT_MASK, causal=True),
        attention(rng, (BATCH, TH, TEXT, VISION), vision_mask),
        attention(rng, (BATCH, TH, TEXT, TEXT), TEXT_MASK, causal=True),
    ]
    extras = {
        "attn_grad": rng.standard_normal((BATCH, TH, TEXT, TEXT)),
        "value": rng.standard_normal((BATCH, TH, TEXT, WIDTH)),
        "residual": rng.standard_normal((BATCH, TEXT, WIDTH)),
        "out_weight": rng.standard_normal((1, WIDTH, WIDTH)),  # a parameter: shared by name
        "per_model": rng.standard_normal((1, 8)),  # shared by its batch axis of 1
        "custom": rng.standard_normal((BATCH, 9)),  # unknown token axes: left out by a crop
    }
    cross_grad = rng.standard_normal((BATCH, TH, TEXT, VISION))
    link = np.zeros((BATCH, TEXT, VISION))
    link[:, 3] = np.where(VISION_SPECIAL, 0.0, 1 / 6)
    return weights, extras, cross_grad, link


def vlm_trace(seed=0, metadata=None):
    weights, extras, cross_grad, link = vlm_parts(seed)
    names = ["vision.0", "vision.1", "text.0", "text.cross", "text.1"]
    streams = [("vision", "vision"), ("vision", "vision"), ("text", "text"), ("text", "vision"), ("text", "text")]
    layers = [
        LayerAttention(w, name, query_stream=q, key_stream=k,
                       extras=extras if i == 2 else {"attn_grad": cross_grad} if i == 3 else {})
        for i, (w, name, (q, k)) in enumerate(zip(weights, names, streams))
    ]
    return AttentionTrace(
        layers,
        streams=[Stream("vision", tokens=VISION_TOKENS, special=VISION_SPECIAL, grid=(2, 3), causal=False),
                 Stream("text", mask=TEXT_MASK, tokens=TEXT_TOKENS, causal=True)],
        links=[Link("text", "vision", 2, link)], framework="torch", model_name="tiny-vlm",
        metadata={"note": "kept", "generation": GENERATION} if metadata is None else metadata,
    )


# -- one item: select() ------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1, -1, -2])
def test_select_keeps_one_item_with_its_extras_links_grid_and_generation(index):
    trace = vlm_trace()
    weights, extras, cross_grad, link = vlm_parts()
    b = index % BATCH
    one = trace.select(index)
    assert one.batch_size == 1 and one.layer_names == trace.layer_names
    assert (one.framework, one.model_name) == ("torch", "tiny-vlm")
    for got, w in zip(one.layers, weights):
        np.testing.assert_array_equal(got.weights, w[b : b + 1])
    kept = one.layers[2].extras
    assert sorted(kept) == sorted(extras)
    for key in ("attn_grad", "value", "residual", "custom"):
        np.testing.assert_array_equal(kept[key], extras[key][b : b + 1])
    for key in ("out_weight", "per_model"):  # one for every item: kept whole
        np.testing.assert_array_equal(kept[key], extras[key])
    np.testing.assert_array_equal(one.layers[3].extras["attn_grad"], cross_grad[b : b + 1])
    text, vision = one.streams["text"], one.streams["vision"]
    np.testing.assert_array_equal(text.mask, TEXT_MASK[b : b + 1])
    np.testing.assert_array_equal(vision.special, VISION_SPECIAL[b : b + 1])
    assert text.tokens == (tuple(TEXT_TOKENS[b]),) and vision.tokens == (tuple(VISION_TOKENS[b]),)
    assert (text.causal, vision.causal, vision.grid) == (True, False, (2, 3))
    assert len(one.links) == 1
    assert (one.links[0].stream, one.links[0].source, one.links[0].depth) == ("text", "vision", 2)
    np.testing.assert_array_equal(one.links[0].weights, link[b : b + 1])
    assert one.metadata["note"] == "kept"
    generation = one.metadata["generation"]
    assert generation["lengths"] == (GENERATION["lengths"][b],)
    assert generation["generated_ids"] == (tuple(GENERATION["generated_ids"][b]),)
    assert generation["first_generated"] == 3 and generation["stream"] == "text"


def test_select_of_a_batch_of_one_and_out_of_range_items():
    trace = vlm_trace()
    assert trace.select(-BATCH).streams["text"].tokens == (tuple(TEXT_TOKENS[0]),)
    for bad in (BATCH, -BATCH - 1, 0.5, True):
        with pytest.raises(TraceError, match="batch_index"):
            trace.select(bad)
    with pytest.raises(TraceError, match="crop must be True or False"):
        trace.select(0, crop="yes")


@pytest.mark.parametrize("b", [0, 1])
def test_crop_keeps_the_items_real_tokens_in_weights_extras_links_and_generation(b):
    trace = vlm_trace()
    weights, extras, cross_grad, link = vlm_parts()
    text_real = np.flatnonzero(TEXT_MASK[b])
    every = np.arange(VISION)
    one = trace.select(b, crop=True)
    assert one.streams["text"].length == text_real.size and one.streams["vision"].length == VISION
    assert one.streams["text"].mask.all()
    for got, w, (q, k) in zip(one.layers, weights, [(every, every)] * 2 + [(text_real, text_real),
                                                                           (text_real, every),
                                                                           (text_real, text_real)]):
        np.testing.assert_array_equal(got.weights, w[b][:, q][:, :, k][None])
    kept = one.layers[2].extras
    assert sorted(kept) == ["attn_grad", "out_weight", "per_model", "residual", "value"]  # "custom" left out
    np.testing.assert_array_equal(kept["attn_grad"], extras["attn_grad"][b][:, text_real][:, :, text_real][None])
    np.testing.assert_array_equal(kept["value"], extras["value"][b][:, text_real, :][None])
    np.testing.assert_array_equal(kept["residual"], extras["residual"][b][text_real][None])
    np.testing.assert_array_equal(kept["out_weight"], extras["out_weight"])
    np.testing.assert_array_equal(kept["per_model"], extras["per_model"])
    np.testing.assert_array_equal(one.layers[3].extras["attn_grad"], cross_grad[b][:, text_real][None])
    text, vision = one.streams["text"], one.streams["vision"]
    assert text.tokens == (tuple(TEXT_TOKENS[b][p] for p in text_real),)
    assert (text.causal, vision.causal, vision.grid) == (True, False, (2, 3))
    np.testing.assert_array_equal(vision.special, VISION_SPECIAL[b][None])
    np.testing.assert_array_equal(vision.patch_positions(), np.flatnonzero(~VISION_SPECIAL[b]))
    assert (one.links[0].stream, one.links[0].source, one.links[0].depth) == ("text", "vision", 2)
    np.testing.assert_array_equal(one.links[0].weights, link[b][text_real][None])
    generation = one.metadata["generation"]
    # the first generated token moves left by the padding before it: item 0 has 2 pads, item 1 none before 3
    assert generation["first_generated"] == int((text_real < 3).sum()) == (1 if b == 0 else 3)
    assert generation["lengths"] == (GENERATION["lengths"][b],)
    assert generation["generated_ids"] == (tuple(GENERATION["generated_ids"][b]),)
    assert one.metadata["note"] == "kept" and (one.framework, one.model_name) == ("torch", "tiny-vlm")


def test_crop_of_a_batch_of_one_crops_its_extras():
    rng = np.random.default_rng(3)
    mask = np.array([[True, True, True, False]])
    w = attention(rng, (1, 2, 4, 4), mask)
    grad = rng.standard_normal((1, 2, 4, 4))
    trace = AttentionTrace([LayerAttention(w, "l0", extras={"attn_grad": grad})], mask=mask)
    one = trace.select(0, crop=True)
    np.testing.assert_array_equal(one.layers[0].extras["attn_grad"], grad[:, :, :3, :3])
    np.testing.assert_array_equal(one.layers[0].weights, w[:, :, :3, :3])


def test_generation_entries_that_are_not_per_item_stay_whole():
    trace = vlm_trace(metadata={"generation": {"stream": "text", "first_generated": 4,
                                               "generated_ids": [7, 8, 9]}})
    for crop in (False, True):
        generation = trace.select(1, crop=crop).metadata["generation"]
        assert generation["generated_ids"] == (7, 8, 9) and "lengths" not in generation
        assert generation["first_generated"] == 4
    assert trace.select(0, crop=True).metadata["generation"]["first_generated"] == 2
    plain = vlm_trace(metadata={"note": [1, 2]})
    assert plain.select(1).metadata == {"note": (1, 2)} and plain.select(1, crop=True).metadata == {"note": (1, 2)}


@pytest.mark.parametrize("causal", [False, True])
def test_select_and_crop_keep_a_causal_flag_that_differs_from_detection(causal):
    """Weights that look causal with causal=False given (e.g. a prefix-LM's first layers): the flag stays."""
    rng = np.random.default_rng(4)
    mask = np.array([[True] * 5, [True] * 3 + [False] * 2])
    trace = AttentionTrace.from_arrays([attention(rng, (2, 3, 5, 5), mask, causal=True)], mask=mask,
                                       causal=causal)
    assert trace.causal is causal
    assert trace.select(1).causal is causal and trace.select(1, crop=True).causal is causal


# -- trace files: every field is named in its error ---------------------------------------------------------
def file_parts(trace, tmp_path):
    """(arrays, header) of a saved trace, read with safetensors itself."""
    from safetensors import safe_open

    path = tmp_path / "orig.safetensors"
    trace.save(path)
    with safe_open(str(path), framework="np") as handle:
        header = json.loads(handle.metadata()["attnflow"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for key in ("format", "version", "sha256", "attnflow"):
        header.pop(key, None)
    return tensors, header


def write_signed(path, tensors, header, version=2):
    """A file with every checksum right: what a careful editor of the header would produce."""
    write_tensor_file(path, tensors, header, format="attnflow.trace", version=version, what="trace")
    return path


def test_a_multi_stream_trace_round_trips_with_links_extras_grid_and_generation(tmp_path):
    trace = vlm_trace()
    attnflow.save(trace, tmp_path / "t.safetensors")
    loaded = attnflow.load(tmp_path / "t.safetensors")
    assert list(loaded.streams) == ["vision", "text"] and loaded.layer_names == trace.layer_names
    for a, b in zip(loaded.layers, trace.layers):
        assert (a.kind, a.query_stream, a.key_stream, a.source_dtype) == (b.kind, b.query_stream, b.key_stream,
                                                                          b.source_dtype)
        np.testing.assert_array_equal(a.weights, b.weights)
        assert sorted(a.extras) == sorted(b.extras)
        for key in a.extras:
            np.testing.assert_array_equal(a.extras[key], b.extras[key])
    assert [layer.kind for layer in loaded.layers] == ["self", "self", "self", "cross", "self"]
    for name in ("vision", "text"):
        a, b = loaded.streams[name], trace.streams[name]
        assert (a.tokens, a.causal, a.grid) == (b.tokens, b.causal, b.grid)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.special, b.special)
    link = loaded.links[0]
    assert (link.stream, link.source, link.depth) == ("text", "vision", 2)
    np.testing.assert_array_equal(link.weights, trace.links[0].weights)
    assert loaded.metadata == trace.metadata and (loaded.framework, loaded.model_name) == ("torch", "tiny-vlm")


def test_a_one_layer_trace_round_trips(tmp_path):
    w = attention(np.random.default_rng(5), (2, 3, 4, 4), np.ones((2, 4), bool))
    trace = AttentionTrace.from_arrays([w])
    trace.save(tmp_path / "one.safetensors")
    np.testing.assert_array_equal(attnflow.load(tmp_path / "one.safetensors").layers[0].weights, w)


def _set(path, value):
    """An edit that sets ``header[path[0]][path[1]]... = value``."""
    def edit(header, tensors):
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _drop(key):
    return lambda header, tensors: header.pop(key)


def _array(key, value):
    def edit(header, tensors):
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value(tensors[key])
    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("streams"), r"header field streams is missing"),
        (_set(["streams"], []), r"header field streams has the wrong type or value \(\[\]\)"),
        (_set(["streams", 1], 5), r"header field streams\[1\]\.grid is missing"),
        (_set(["streams", 0, "name"], ""), r"header field streams\[0\]\.name has the wrong type or value \(''\)"),
        (_set(["streams", 0, "grid"], "2x3"), r"header field streams\[0\]\.grid has the wrong type"),
        (_set(["streams", 1, "tokens"], "abc"), r"header field streams\[1\]\.tokens has the wrong type"),
        (_set(["streams", 1, "tokens"], [["a"] * 5, "bcdef"]),
         r"header field streams\[1\]\.tokens must be a list of lists of strings"),
        (_set(["streams", 1, "tokens"], [["a"] * 5, ["b", 2, "c", "d", "e"]]),
         r"header field streams\[1\]\.tokens must be a list of lists of strings"),
        (_set(["streams", 1, "causal"], 1), r"header field streams\[1\]\.causal has the wrong type or value \(1\)"),
        (_drop("layers"), r"header field layers is missing"),
        (_set(["layers"], []), r"header field layers has the wrong type or value \(\[\]\)"),
        (_set(["layers", 2, "name"], 3), r"header field layers\[2\]\.name has the wrong type or value \(3\)"),
        (_set(["layers", 3, "query_stream"], ""), r"header field layers\[3\]\.query_stream has the wrong type"),
        (_set(["layers", 3, "key_stream"], ""), r"header field layers\[3\]\.key_stream has the wrong type"),
        (_set(["layers", 2, "extras"], ["attn_grad", ""]), r"header field layers\[2\]\.extras has the wrong type"),
        (_set(["layers", 2, "extras"], [5]), r"header field layers\[2\]\.extras has the wrong type"),
        (_set(["layers", 1, "source_dtype"], "int8"), r"header field layers\[1\]\.source_dtype has the wrong"),
        (_set(["links"], {}), r"header field links has the wrong type or value \(\{\}\)"),
        (_set(["links", 0, "stream"], ""), r"header field links\[0\]\.stream has the wrong type"),
        (_set(["links", 0, "source"], ""), r"header field links\[0\]\.source has the wrong type"),
        (_set(["links", 0, "depth"], True), r"header field links\[0\]\.depth has the wrong type or value \(True\)"),
        (_set(["links", 0, "depth"], "2"), r"header field links\[0\]\.depth has the wrong type or value \('2'\)"),
        (_set(["metadata"], []), r"header field metadata has the wrong type or value \(\[\]\)"),
        (_set(["framework"], 5), r"header field framework has the wrong type or value \(5\)"),
        (_set(["model_name"], None), r"header field model_name has the wrong type or value \(None\)"),
        (_array("streams.1.mask", lambda m: m.astype(np.uint8)), r"the mask of stream 'text' is not boolean"),
        (_array("layers.0.weights", None), r"array 'layers.0.weights' is missing"),
    ],
)
def test_every_edited_header_field_is_named_in_the_error(tmp_path, edit, message):
    tensors, header = file_parts(vlm_trace(), tmp_path)
    header, tensors = copy.deepcopy(header), dict(tensors)
    edit(header, tensors)
    path = write_signed(tmp_path / "edited.safetensors", tensors, header)
    prefix = re.escape(f"{str(path)!r} is a damaged attnflow trace: ")
    with pytest.raises(TraceFileError, match=prefix + message):
        attnflow.load(path)


def test_a_long_wrong_value_is_shortened_in_the_error(tmp_path):
    tensors, header = file_parts(vlm_trace(), tmp_path)
    fits = ["a" * 56]  # repr: 60 characters, shown whole
    header["model_name"] = fits
    with pytest.raises(TraceFileError, match=re.escape(f"({fits!r})")):
        attnflow.load(write_signed(tmp_path / "fits.safetensors", tensors, header))
    long = ["b" * 57]  # repr: 61 characters, cut to 57 and "..."
    header["model_name"] = long
    with pytest.raises(TraceFileError, match=re.escape(f"({repr(long)[:57]}...)")):
        attnflow.load(write_signed(tmp_path / "long.safetensors", tensors, header))


def test_the_trace_modules_save_writes_only_traces(tmp_path):
    from attnflow.trace import load, save

    with pytest.raises(TraceFileError, match=re.escape("attnflow.save() writes attnflow traces; got dict.")):
        save({"not": "a trace"}, tmp_path / "t.safetensors")
    assert not (tmp_path / "t.safetensors").exists()
    trace = vlm_trace()
    save(trace, tmp_path / "t.safetensors")
    assert load(tmp_path / "t.safetensors").metadata == trace.metadata


# -- format 1 (attnflow 0.1) --------------------------------------------------------------------------------
V1_MASK = np.array([[True] * 4, [True] * 3 + [False]])
V1_TOKENS = [["a", "b", "c", "d"], ["e", "f", "g", "<pad>"]]


def v1_parts():
    """A format-1 file's arrays and header: a self layer whose weights look causal under causal=False, with
    an extra and source_dtype bfloat16, and a cross layer onto 6 memory positions."""
    rng = np.random.default_rng(6)
    self_w = attention(rng, (2, 3, 4, 4), V1_MASK, causal=True).astype(np.float32)
    cross_w = attention(rng, (2, 3, 4, 6), np.ones((2, 6), bool)).astype(np.float32)
    grad = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    tensors = {"mask": V1_MASK, "layers.0.weights": self_w, "layers.0.extras.attn_grad": grad,
               "layers.1.weights": cross_w}
    header = {
        "layers": [{"name": "enc.0", "kind": "self", "source_dtype": "bfloat16", "extras": ["attn_grad"]},
                   {"name": "dec.cross", "kind": "cross", "source_dtype": "float32", "extras": []}],
        "tokens": V1_TOKENS, "causal": False, "framework": "torch", "model_name": "old", "metadata": {"n": 3},
    }
    return tensors, header


def test_format_1_cross_layers_extras_tokens_and_flags_load(tmp_path):
    tensors, header = v1_parts()
    loaded = attnflow.load(write_signed(tmp_path / "v1.safetensors", tensors, header, version=1))
    assert list(loaded.streams) == ["tokens", "memory"] and loaded.streams["memory"].length == 6
    assert [(layer.kind, layer.query_stream, layer.key_stream) for layer in loaded.layers] == [
        ("self", "tokens", "tokens"), ("cross", "tokens", "memory")]
    assert [layer.source_dtype for layer in loaded.layers] == ["bfloat16", "float32"]
    np.testing.assert_array_equal(loaded.layers[0].extras["attn_grad"], tensors["layers.0.extras.attn_grad"])
    assert loaded.streams["tokens"].tokens == tuple(map(tuple, V1_TOKENS))
    assert loaded.streams["tokens"].causal is False  # as stored, though the weights look causal
    np.testing.assert_array_equal(loaded.streams["tokens"].mask, V1_MASK)
    assert (loaded.framework, loaded.model_name, dict(loaded.metadata)) == ("torch", "old", {"n": 3})
    one = {"mask": V1_MASK, "layers.0.weights": tensors["layers.1.weights"]}
    single = dict(header, layers=[header["layers"][1]])
    assert attnflow.load(write_signed(tmp_path / "one.safetensors", one, single, version=1)).num_layers == 1


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set(["layers"], []), r"header field layers has the wrong type or value \(\[\]\)"),
        (_drop("layers"), r"header field layers is missing"),
        (_set(["layers", 0, "kind"], "sideways"), r"header field layers\[0\]\.kind has the wrong type or value"),
        (_set(["layers", 1, "name"], 7), r"header field layers\[1\]\.name has the wrong type"),
        (_set(["layers", 0, "source_dtype"], "complex"), r"header field layers\[0\]\.source_dtype has the wrong"),
        (_set(["layers", 0, "extras"], [""]), r"header field layers\[0\]\.extras has the wrong type"),
        (_set(["tokens"], "ab"), r"header field tokens has the wrong type"),
        (_set(["tokens"], [["a"] * 4, 7]), r"header field tokens must be a list of lists of strings"),
        (_set(["causal"], "yes"), r"header field causal has the wrong type or value \('yes'\)"),
        (_array("mask", lambda m: m.astype(np.uint8)), r"the mask is not boolean"),
    ],
)
def test_every_edited_format_1_field_is_named_in_the_error(tmp_path, edit, message):
    tensors, header = v1_parts()
    edit(header, tensors)
    path = write_signed(tmp_path / "v1.safetensors", tensors, header, version=1)
    with pytest.raises(TraceFileError, match=re.escape(f"{str(path)!r} is a damaged attnflow trace: ") + message):
        attnflow.load(path)


# -- links ----------------------------------------------------------------------------------------------------
def linked(link_weights=None, depth=2, order=("v", "v", "t"), source_mask=None):
    """Vision (6 positions; item 1: 5 real) and text (4 positions); layers in ``order``; one link feeding
    text position 1 (uniform over the real vision tokens unless ``link_weights``)."""
    rng = np.random.default_rng(7)
    vmask = np.ones((2, 6), bool) if source_mask is None else source_mask
    vmask_default = vmask.copy()
    tmask = np.ones((2, 4), bool)
    weights, streams = [], []
    for kind in order:
        mask = vmask if kind == "v" else tmask
        weights.append(attention(rng, (2, 3 if kind == "v" else 2, mask.shape[1], mask.shape[1]), mask))
        streams.append("vision" if kind == "v" else "text")
    if link_weights is None:
        link_weights = np.zeros((2, 4, 6))
        link_weights[:, 1] = vmask_default / vmask_default.sum(1, keepdims=True)
    return AttentionTrace.from_arrays(
        weights, layer_streams=streams, streams=[Stream("vision", mask=vmask), Stream("text", mask=tmask)],
        links=[Link("text", "vision", depth, link_weights)],
    )


def test_link_depth_runs_from_0_to_the_sources_layer_count():
    for depth in (0, 1, 2):
        assert linked(depth=depth).links[0].depth == depth
    for depth in (3, -1, 1.0, True):
        with pytest.raises(TraceError, match=re.escape("Link 0 ('text' <- 'vision'): depth must be an int in [0, 2]")):
            linked(depth=depth)


def test_link_weights_are_kept_as_float64_and_fed_tokens_are_reported():
    weights = np.zeros((2, 4, 6), np.float32)
    weights[:, 2, 1:3] = 0.5  # rows summing to exactly 1
    trace = linked(weights)
    assert trace.links[0].weights.dtype == np.float64
    np.testing.assert_array_equal(trace.links[0].fed(1), [False, False, True, False])
    assert repr(trace.links[0]) == "Link('text' <- 'vision' at depth 2, weights (2, 4, 6))"


@pytest.mark.parametrize(
    "row, message",
    [
        ([0.5, 0.5, 0.5, -0.5, 0, 0], "weights must be finite and non-negative"),
        ([np.nan, 0.5, 0.5, 0, 0, 0], "weights must be finite and non-negative"),
        ([0.25, 0.25, 0, 0, 0, 0], "each fed token's row must sum to 1"),
        ([0.35, 0.35, 0.35, 0, 0, 0], "each fed token's row must sum to 1"),
        ([0.25, 0.25, 0.25, 0.25, 0.25, 0.25], "each fed token's row must sum to 1"),
    ],
)
def test_link_rows_must_be_finite_non_negative_and_sum_to_1(row, message):
    weights = np.zeros((2, 4, 6))
    weights[1, 2] = row
    with pytest.raises(TraceError, match=re.escape(f"Link 0 ('text' <- 'vision'): {message}")):
        linked(weights)


def test_link_onto_padding_or_within_one_stream_is_refused():
    mask = np.ones((2, 6), bool)
    mask[1, 5] = False
    weights = np.zeros((2, 4, 6))
    weights[:, 1] = 1 / 6
    with pytest.raises(TraceError, match=re.escape("Link 0 ('text' <- 'vision'): weights point at padding of "
                                                   "stream 'vision'")):
        linked(weights, source_mask=mask)
    trace = linked()
    with pytest.raises(TraceError, match=re.escape("Link 0 ('text' <- 'text'): a link joins two different streams")):
        trace.replace(links=[Link("text", "text", 0, np.zeros((2, 4, 4)))])


def test_a_link_feeds_only_from_layers_that_ran_before_the_streams_first_layer():
    # vision, text, vision: depth 1 is computed before text's first layer, depth 2 after it
    assert linked(depth=1, order=("v", "t", "v")).links[0].depth == 1
    with pytest.raises(TraceError, match=re.escape("'vision' reaches depth 2 only after 'text''s first layer ran; a "
                                                   "link feeds a stream's inputs from what was computed before.")):
        linked(depth=2, order=("v", "t", "v"))


def test_input_streams_leave_out_a_stream_every_real_token_of_which_is_fed():
    """A Swin-like stage whose tokens are all fed by two links from the stage before has no inputs of its own."""
    rng = np.random.default_rng(8)
    one, two = np.ones((2, 4), bool), np.array([[True, True], [True, False]])
    first, second = np.zeros((2, 2, 4)), np.zeros((2, 2, 4))
    first[:, 0, :2] = 0.5  # stage2 token 0 <- stage1 tokens 0, 1
    second[0, 1, 2:] = 0.5  # stage2 token 1 <- stage1 tokens 2, 3 (item 0; item 1's token 1 is padding)
    trace = AttentionTrace.from_arrays(
        [attention(rng, (2, 3, 4, 4), one), attention(rng, (2, 2, 2, 2), two)],
        streams=[Stream("stage1", mask=one), Stream("stage2", mask=two)], layer_streams=["stage1", "stage2"],
        links=[Link("stage2", "stage1", 1, first), Link("stage2", "stage1", 1, second)],
    )
    assert trace.inputs_of("stage2") == ["stage1", "stage2"]
    assert trace.input_streams("stage2") == ["stage1"]
    partly = trace.replace(links=[Link("stage2", "stage1", 1, first)])
    assert partly.input_streams("stage2") == ["stage1", "stage2"]


def test_inputs_of_follows_cross_layers_through_several_streams():
    """text draws on image, which draws on audio: the second step needs a second pass over the layers."""
    rng = np.random.default_rng(9)
    m = {n: np.ones((1, size), bool) for n, size in (("audio", 3), ("image", 4), ("text", 5))}
    trace = AttentionTrace.from_arrays(
        [attention(rng, (1, 2, 3, 3), m["audio"]), attention(rng, (1, 2, 4, 3), m["audio"]),
         attention(rng, (1, 2, 5, 4), m["image"])],
        streams=[Stream("audio"), Stream("image"), Stream("text")],
        layer_streams=["audio", ("image", "audio"), ("text", "image")],
    )
    assert trace.inputs_of("text") == ["audio", "image", "text"]
    assert trace.inputs_of("image") == ["audio", "image"]


# -- building -------------------------------------------------------------------------------------------------
def test_cross_kinds_without_streams_attend_to_a_memory_stream():
    rng = np.random.default_rng(10)
    mask = np.ones((2, 4), bool)
    trace = AttentionTrace.from_arrays(
        [attention(rng, (2, 3, 4, 4), mask), attention(rng, (2, 3, 4, 7), np.ones((2, 7), bool))],
        kinds=["self", "cross"],
    )
    assert list(trace.streams) == ["tokens", "memory"] and trace.streams["memory"].length == 7
    assert [(layer.kind, layer.key_stream) for layer in trace.layers] == [("self", "tokens"), ("cross", "memory")]
    with pytest.raises(TraceError, match="names stream 'text'; declare the streams with streams="):
        AttentionTrace([LayerAttention(trace.layers[0].weights, "x", query_stream="text")])


def test_a_length_mismatch_names_the_layer_and_hints_at_streams_only_for_one_stream():
    rng = np.random.default_rng(11)
    a, b = attention(rng, (1, 2, 4, 4), np.ones((1, 4), bool)), attention(rng, (1, 2, 5, 5), np.ones((1, 5), bool))
    with pytest.raises(TraceError) as single:
        AttentionTrace.from_arrays([a, b])
    assert str(single.value) == (
        "Layer 1 ('layer.1') has 5 query positions, but stream 'tokens' has 4 tokens in other layers; every layer of "
        "a stream must cover the same tokens. If this model has several token streams (encoder-decoder, text and "
        "vision), capture it with attnflow.capture (the adapters name the streams) or build the trace with "
        "streams= and layer_streams=."
    )
    c = attention(rng, (1, 2, 3, 3), np.ones((1, 3), bool))
    with pytest.raises(TraceError) as several:
        AttentionTrace.from_arrays([c, a, b], streams=[Stream("x"), Stream("y")], layer_streams=["x", "y", "y"])
    assert str(several.value).endswith("every layer of a stream must cover the same tokens.")


def test_metadata_nests_32_levels_deep_and_no_deeper():
    def nested(levels, wrap):
        value = 1
        for _ in range(levels):
            value = wrap(value)
        return value

    w = [attention(np.random.default_rng(12), (1, 2, 3, 3), np.ones((1, 3), bool))]
    assert AttentionTrace.from_arrays(w, metadata=nested(32, lambda v: {"k": v})) is not None
    assert AttentionTrace.from_arrays(w, metadata={"k": nested(31, lambda v: [v])}) is not None
    for metadata in (nested(33, lambda v: {"k": v}), {"k": nested(32, lambda v: [v])}):
        with pytest.raises(TraceError, match=r"is nested too deeply \(more than 32 levels\)"):
            AttentionTrace.from_arrays(w, metadata=metadata)
    with pytest.raises(TraceError, match=re.escape("metadata['a'][1]['b'] is a complex; metadata holds JSON values "
                                                   "only (dicts with string keys, lists, strings, numbers, booleans, "
                                                   "None).")):
        AttentionTrace.from_arrays(w, metadata={"a": [0, {"b": 1j}]})


def test_replace_takes_every_constructor_field_and_checks_new_layers():
    trace = vlm_trace()
    assert trace.replace(framework="jax").framework == "jax"
    assert trace.replace(links=[]).links == ()
    fewer = trace.replace(layers=trace.layers[:2], streams=[trace.streams["vision"]], links=[], metadata={})
    assert fewer.num_layers == 2 and list(fewer.streams) == ["vision"]
    short = dataclass_weights(trace.layers[0], trace.layers[0].weights * 0.5)
    with pytest.raises(TraceError, match="sums to 0.5"):
        trace.replace(layers=[short, *trace.layers[1:]])
    with pytest.raises(TraceError, match=re.escape("replace() takes ['framework', 'layers', 'links', 'metadata', "
                                                   "'model_name', 'streams']; got ['mask']")):
        trace.replace(mask=None)


def dataclass_weights(layer, weights):
    import dataclasses

    return dataclasses.replace(layer, weights=weights)


def test_stack_gives_float64_and_refuses_unequal_head_counts():
    rng = np.random.default_rng(13)
    m = np.ones((2, 4), bool)
    same = AttentionTrace.from_arrays([attention(rng, (2, 3, 4, 4), m).astype(np.float32) for _ in range(2)])
    stacked = same.stack()
    assert stacked.shape == (2, 2, 3, 4, 4) and stacked.dtype == np.float64
    mixed = AttentionTrace.from_arrays([attention(rng, (2, 3, 4, 4), m), attention(rng, (2, 5, 4, 4), m)])
    with pytest.raises(TraceError, match=re.escape("Layers have different head counts [3, 5]")):
        mixed.stack()


@pytest.mark.parametrize("call, name", [(lambda t: t.stack(), "stack()"), (lambda t: t.lengths(), "lengths()"),
                                        (lambda t: t.valid_index(0), "valid_index()")])
def test_single_stream_calls_on_several_streams_name_the_call(call, name):
    with pytest.raises(TraceError, match=re.escape(f"trace.{name} exists only for single-stream traces")):
        call(vlm_trace())


def test_stream_valid_index_accepts_exactly_the_batchs_items():
    text = vlm_trace().streams["text"]
    np.testing.assert_array_equal(text.valid_index(-2), [2, 3, 4])
    np.testing.assert_array_equal(text.valid_index(1), [0, 1, 2, 3])
    for bad in (2, 3, -3, 0.5):
        with pytest.raises(TraceError, match=re.escape(f"batch_index {bad!r} is out of range for a batch of 2 "
                                                       "(stream 'text')")):
            text.valid_index(bad)


def test_patch_positions_are_the_items_non_special_tokens():
    vision = vlm_trace().streams["vision"]
    np.testing.assert_array_equal(vision.patch_positions(), [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(vision.patch_positions(1), [0, 1, 2, 3, 4, 5])
    with pytest.raises(TraceError, match="Stream 'text' has no patch grid; only vision streams have patches"):
        vlm_trace().streams["text"].patch_positions()


def test_reprs():
    trace = vlm_trace()
    assert repr(trace) == ("AttentionTrace(layers=5, batch=2, heads=[3, 4], streams={'vision': 7, 'text': 5}, "
                           "framework='torch', model='tiny-vlm')")
    w = attention(np.random.default_rng(14), (2, 3, 4, 4), np.ones((2, 4), bool))
    assert repr(AttentionTrace.from_arrays([w, w], model_name="m")) == (
        "AttentionTrace(layers=2, batch=2, heads=3, seq=4, causal=False, framework='numpy', model='m')")
    assert repr(trace.streams["vision"]) == "Stream('vision', batch=2, length=7, causal=False, grid=(2, 3))"
    assert repr(trace.streams["text"]) == "Stream('text', batch=2, length=5, causal=True)"
    assert repr(Stream("encoder")) == "Stream('encoder')"
