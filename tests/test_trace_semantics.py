"""What a trace means, checked where it is built and where it is loaded: an explicit causal flag against
the weights, boolean masks as 0/1, the enumerations the methods read (head fusion, generation mode, source
dtype), and kinds that agree with the streams.

Sizes differ on every axis: layers 3, batch 2, heads 4, tokens 6 (a second stream: 5)."""

from __future__ import annotations

import numpy as np
import pytest
from test_streams import softmax_rows

import attnflow
from attnflow import AttentionTrace, LayerAttention, Stream, TraceError, TraceFileError
from attnflow._tensorfile import write_tensor_file
from attnflow.trace._file import FORMAT, FORMAT_VERSION, trace_arrays

LAYERS, BATCH, HEADS, SEQ, OTHER = 3, 2, 4, 6, 5


def causal_weights(seed: int = 0, mask: np.ndarray | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((BATCH, SEQ), bool) if mask is None else mask
    out = []
    for _ in range(LAYERS):
        with np.errstate(invalid="ignore"):
            w = softmax_rows(rng, (BATCH, HEADS, SEQ, SEQ), mask, causal=True)
        w[np.isnan(w).any(-1)] = 1.0 / SEQ  # rows of left padding, which see no real key: anywhere
        out.append(w)
    return out


def ahead(weights: np.ndarray, b: int, h: int, q: int, k: int, amount: float) -> None:
    """Move ``amount`` of row (b, h, q) onto the later key k (the row still sums to 1)."""
    weights[b, h, q] *= 1 - amount
    weights[b, h, q, k] += amount


# -- the causal flag -----------------------------------------------------------------------------------
def test_an_explicit_causal_flag_is_checked_against_the_weights():
    weights = causal_weights()
    ahead(weights[1], 1, 2, 3, 5, 0.01)  # layer 1, item 1, head 2: query 3 looks at key 5
    with pytest.raises(TraceError, match=r"Layer 1 .*causal.*query 3 of batch item 1 \(head 2\).*first on key 5"):
        AttentionTrace.from_arrays(weights, causal=True)
    # the same weights without the flag: detected as not causal, and with causal=False: accepted
    assert not AttentionTrace.from_arrays(weights).causal
    assert not AttentionTrace.from_arrays(weights, causal=False).causal


def test_the_causal_check_names_the_first_later_key_with_weight():
    weights = causal_weights(1)
    weights[0][0, 3, 1] = [0.25, 0.25, 0.0, 0.0, 0.5, 0.0]  # query 1: keys 2 and 3 empty, key 4 not
    with pytest.raises(TraceError, match=r"Layer 0 .*query 1 of batch item 0 \(head 3\) puts 0\.5 .*first on key 4"):
        AttentionTrace.from_arrays(weights, causal=True)


def test_float_noise_on_later_keys_passes_the_causal_check():
    weights = causal_weights(2)
    for w in weights:
        w += np.triu(np.full((SEQ, SEQ), 1e-7), k=1)  # below the float32 tolerance, as fused kernels leave
        w /= w.sum(-1, keepdims=True)
    trace = AttentionTrace.from_arrays([w.astype(np.float32) for w in weights], causal=True)
    assert trace.causal
    over = [w.copy() for w in weights]
    ahead(over[2], 0, 0, 0, 1, 3e-4)  # above it
    with pytest.raises(TraceError, match="Layer 2 .*causal"):
        AttentionTrace.from_arrays([w.astype(np.float32) for w in over], causal=True)


def test_padded_rows_and_padded_keys_of_a_causal_stream():
    """Left padding: padded query rows may attend anywhere (not checked); a real query's weight on a later
    padded key is padding, said as such."""
    mask = np.ones((BATCH, SEQ), bool)
    mask[1, :2] = False
    weights = causal_weights(3, mask)
    assert (weights[0][1, :, :2] == 1.0 / SEQ).all()  # the padded rows of item 1 spread over every key
    assert AttentionTrace.from_arrays(weights, mask=mask, causal=True).causal
    right = np.ones((BATCH, SEQ), bool)
    right[0, 4:] = False
    leaky = causal_weights(4, right)
    ahead(leaky[1], 0, 1, 2, 5, 0.1)  # a later key that is padding
    with pytest.raises(TraceError, match="Layer 1 .*query 2 of batch item 0 .*padding"):
        AttentionTrace.from_arrays(leaky, mask=right, causal=True)
    ahead(leaky[1], 0, 1, 2, 3, 0.1)  # and a later real key too: the padding is named first
    with pytest.raises(TraceError, match="padding"):
        AttentionTrace.from_arrays(leaky, mask=right, causal=True)


def test_a_little_on_padding_and_a_little_ahead_pass_each_under_the_tolerance():
    right = np.ones((BATCH, SEQ), bool)
    right[0, 5:] = False
    weights = [w.astype(np.float32) for w in causal_weights(5, right)]
    ahead(weights[0], 0, 0, 1, 5, 6e-5)  # padding
    ahead(weights[0], 0, 0, 1, 3, 6e-5)  # later real key: together over 1e-4, each under it
    assert AttentionTrace.from_arrays(weights, mask=right, causal=True).causal


def test_the_causal_flag_of_a_named_stream_is_checked_and_cross_layers_are_not():
    rng = np.random.default_rng(6)
    enc = softmax_rows(rng, (BATCH, HEADS, OTHER, OTHER), np.ones((BATCH, OTHER), bool))
    dec = causal_weights(7)[0]
    cross = softmax_rows(rng, (BATCH, 2, SEQ, OTHER), np.ones((BATCH, OTHER), bool))  # every key, not causal
    kwargs = {"layer_streams": ["encoder", "decoder", ("decoder", "encoder")]}
    trace = AttentionTrace.from_arrays(
        [enc, dec, cross], streams=[Stream("encoder"), Stream("decoder", causal=True)], **kwargs)
    assert trace.streams["decoder"].causal and not trace.streams["encoder"].causal
    with pytest.raises(TraceError, match="Layer 0 .*stream 'encoder' is causal"):
        AttentionTrace.from_arrays([enc, dec, cross], streams=[Stream("encoder", causal=True), Stream("decoder")],
                                   **kwargs)
    # replace() with new streams checks again
    with pytest.raises(TraceError, match="Layer 0 .*causal"):
        trace.replace(streams=[Stream("encoder", causal=True), trace.streams["decoder"]])


def test_heads_fused_by_max_are_still_checked_for_the_causal_flag():
    weights = [w.max(axis=1, keepdims=True) for w in causal_weights(8)]  # rows no longer sum to 1
    assert AttentionTrace.from_arrays(weights, causal=True, metadata={"head_fusion": "max"}).causal
    weights[2][1, 0, 0, 4] = 0.2
    with pytest.raises(TraceError, match="Layer 2 .*causal"):
        AttentionTrace.from_arrays(weights, causal=True, metadata={"head_fusion": "max"})


def test_a_loaded_causal_flag_is_checked(tmp_path):
    trace = AttentionTrace.from_arrays(causal_weights(9), causal=True)
    weights = [w.copy() for w in causal_weights(9)]
    ahead(weights[0], 1, 3, 2, 4, 0.3)
    forced = AttentionTrace.from_arrays(weights, causal=False)
    tensors, header = trace_arrays(forced)
    header["streams"][0]["causal"] = True  # a re-signed edit of the flag
    path = tmp_path / "t.safetensors"
    write_tensor_file(path, tensors, header, format=FORMAT, version=FORMAT_VERSION)
    with pytest.raises(TraceFileError, match=r"damaged attnflow trace: Layer 0 .*query 2 of batch item 1 \(head 3\)"):
        attnflow.load(path)
    trace.save(path)
    assert attnflow.load(path).causal


# -- boolean masks ---------------------------------------------------------------------------------------
def odd_bytes_mask() -> np.ndarray:
    raw = np.array([[1] * SEQ, [1, 1, 1, 1, 0, 0]], np.uint8)
    raw[0, 2], raw[1, 1], raw[1, 0] = 2, 255, 7
    return raw.view(np.bool_)


def test_bool_masks_of_other_bytes_are_stored_as_0_and_1():
    mask = odd_bytes_mask()
    clean = np.array([[1] * SEQ, [1, 1, 1, 1, 0, 0]], bool)
    rng = np.random.default_rng(10)
    weights = [softmax_rows(rng, (BATCH, HEADS, SEQ, SEQ), clean) for _ in range(LAYERS)]
    special = np.zeros((BATCH, SEQ), np.uint8)
    special[1, 3] = 255
    trace = AttentionTrace.from_arrays(weights, mask=mask, special=special.view(np.bool_))
    assert trace.mask.view(np.uint8).tolist() == clean.view(np.uint8).tolist()
    assert trace.special.view(np.uint8).tolist() == [[0] * SEQ, [0, 0, 0, 1, 0, 0]]
    reference = AttentionTrace.from_arrays(weights, mask=clean, special=special.astype(bool))
    np.testing.assert_array_equal(attnflow.rollout(trace), attnflow.rollout(reference))


@pytest.mark.parametrize("key", ["streams.0.mask", "streams.0.special"])
def test_bool_bytes_other_than_0_and_1_in_a_file_are_refused(tmp_path, key):
    clean = np.array([[1] * SEQ, [1, 1, 1, 1, 0, 0]], bool)
    rng = np.random.default_rng(11)
    weights = [softmax_rows(rng, (BATCH, HEADS, SEQ, SEQ), clean) for _ in range(LAYERS)]
    tensors, header = trace_arrays(AttentionTrace.from_arrays(weights, mask=clean))
    raw = tensors[key].view(np.uint8).copy()
    raw[1, 5] = 255 if key.endswith("special") else 0
    raw[0, 1] = 2
    tensors[key] = raw.view(np.bool_)
    path = tmp_path / "t.safetensors"
    write_tensor_file(path, tensors, header, format=FORMAT, version=FORMAT_VERSION)
    with pytest.raises(TraceFileError, match=f"boolean array '{key}' holds bytes other than 0 and 1"):
        attnflow.load(path)


# -- enumerations ----------------------------------------------------------------------------------------
def saved_with(tmp_path, edit):
    """A correctly signed file of a valid trace whose header ``edit`` changed."""
    mask = np.ones((BATCH, SEQ), bool)
    trace = AttentionTrace.from_arrays(causal_weights(12), mask=mask, metadata={"head_fusion": "mean"})
    tensors, header = trace_arrays(trace)
    edit(header)
    path = tmp_path / "t.safetensors"
    write_tensor_file(path, tensors, header, format=FORMAT, version=FORMAT_VERSION)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["metadata"].update(head_fusion="median"), r"head_fusion.*'median'"),
    (lambda h: h["metadata"].update(head_fusion=["max"]), r"head_fusion"),
    (lambda h: h["layers"][1].update(source_dtype="float128"), r"layers\[1\]\.source_dtype"),
    (lambda h: h["layers"][0].update(source_dtype="object"), r"layers\[0\]\.source_dtype"),
    (lambda h: h["metadata"].update(generation={"mode": "replay", "stream": "tokens", "first_generated": 2}),
     r"\['mode'\]"),
    (lambda h: h["metadata"].update(generation={"stream": "nope", "first_generated": 2}), r"\['stream'\]"),
    (lambda h: h["metadata"].update(generation={"stream": "tokens", "first_generated": 7}), "first_generated"),
    (lambda h: h["metadata"].update(generation={"stream": "tokens", "first_generated": "2"}), "first_generated"),
    (lambda h: h["metadata"].update(generation={"stream": "tokens", "first_generated": 2, "lengths": [1]}),
     "lengths"),
    (lambda h: h["metadata"].update(generation=[1]), "must be a mapping"),
])
def test_unknown_enumerations_in_a_file_are_refused(tmp_path, edit, message):
    with pytest.raises(TraceFileError, match=message):
        attnflow.load(saved_with(tmp_path, edit))


def test_known_enumerations_load(tmp_path):
    def edit(h):
        h["metadata"]["generation"] = {"mode": "rerun", "stream": "tokens", "first_generated": SEQ, "lengths": [1, 0]}
        h["layers"][0]["source_dtype"] = "bfloat16"
        h["layers"][1]["source_dtype"] = ">f4"  # what traces of big-endian arrays stored before

    loaded = attnflow.load(saved_with(tmp_path, edit))
    assert [layer.source_dtype for layer in loaded.layers] == ["bfloat16", "float32", "float64"]
    assert loaded.metadata["generation"]["mode"] == "rerun" and loaded.metadata["head_fusion"] == "mean"


def test_big_endian_weights_record_the_dtype_name():
    weights = [w.astype(">f4") for w in causal_weights(13)]
    assert [layer.source_dtype for layer in AttentionTrace.from_arrays(weights).layers] == ["float32"] * LAYERS


# -- kinds and streams -----------------------------------------------------------------------------------
def test_a_cross_layer_within_one_stream_is_refused():
    weights = causal_weights(14)
    with pytest.raises(TraceError, match=r"Layer 2 .*kind='cross' but its queries and keys are both stream 'tokens'"):
        AttentionTrace.from_arrays(weights, kinds=["self", "self", "cross"],
                                   layer_streams=["tokens", "tokens", ("tokens", "tokens")])
    with pytest.raises(TraceError, match=r"Layer 1 .*kind='cross' but its queries and keys are both stream 'a'"):
        AttentionTrace([LayerAttention(w, f"l{i}", kind="cross" if i == 1 else None, query_stream="a", key_stream="a")
                        for i, w in enumerate(weights)], streams=[Stream("a")])
    with pytest.raises(TraceError, match=r"Layer 0 .*kind='self' but its query and key streams differ"):
        AttentionTrace.from_arrays(weights[:1], kinds=["self"], layer_streams=[("tokens", "memory")])


# -- trace files: arrays and their stored shapes ---------------------------------------------------------
def trace_with_extras() -> AttentionTrace:
    rng = np.random.default_rng(15)
    weights = causal_weights(15)
    layers = [LayerAttention(w, f"dec.{i}", extras={"value": rng.standard_normal((BATCH, SEQ, 7)).astype(np.float32)})
              for i, w in enumerate(weights)]
    return AttentionTrace(layers)


def test_an_array_no_header_field_names_is_refused(tmp_path):
    """Correctly signed (every checksum right), but one array belongs to nothing the header describes."""
    tensors, header = trace_arrays(trace_with_extras())
    tensors["layers.1.extras.stray"] = np.arange(BATCH * 3, dtype=np.float32).reshape(BATCH, 3)
    tensors["streams.4.mask"] = np.ones((BATCH, SEQ), bool)
    path = tmp_path / "t.safetensors"
    write_tensor_file(path, tensors, header, format=FORMAT, version=FORMAT_VERSION)
    with pytest.raises(TraceFileError, match=r"arrays \['layers.1.extras.stray', 'streams.4.mask'\] belong to nothing"):
        attnflow.load(path)


@pytest.mark.parametrize("edit, expected", [
    (lambda entry: entry.update(shape=[BATCH, 7, SEQ]), (BATCH, 7, SEQ)),  # same bytes, other shape
    (lambda entry: entry.update(dtype="I32"), np.int32),  # same bytes, other dtype
])
def test_a_stored_shape_or_dtype_edited_with_the_bytes_kept_is_refused(tmp_path, edit, expected):
    """The safetensors header says each array's dtype and shape; the attnflow header (signed) keeps a digest
    of both with the bytes, so editing either alone is caught."""
    import json
    import struct

    trace = trace_with_extras()
    path = tmp_path / "t.safetensors"
    trace.save(path)
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    st_header = json.loads(data[8:8 + size])
    edit(st_header["layers.2.extras.value"])
    raw = json.dumps(st_header).encode()
    raw += b" " * (-len(raw) % 8)
    edited = tmp_path / "edited.safetensors"
    edited.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size:])
    from safetensors.numpy import load_file

    stored = load_file(str(edited))["layers.2.extras.value"]  # safetensors reads the edit as it is
    assert stored.shape == expected if isinstance(expected, tuple) else stored.dtype == expected
    with pytest.raises(TraceFileError, match="array 'layers.2.extras.value' does not match its checksum"):
        attnflow.load(edited)
