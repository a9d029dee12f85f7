"""AttentionTrace: construction, validation errors, save/load."""

from __future__ import annotations

import numpy as np
import pytest

import attnflow
from attnflow import AttentionTrace, TraceError, TraceFileError

# distinct size on every axis: layers 4, batch 2, heads 3, seq 5
LAYERS, BATCH, HEADS, SEQ = 4, 2, 3, 5


def random_weights(rng, layers=LAYERS, batch=BATCH, heads=HEADS, seq=SEQ, dtype=np.float32):
    return [rng.dirichlet(np.ones(seq), size=(batch, heads, seq)).astype(dtype) for _ in range(layers)]


def test_from_arrays_shapes_and_defaults():
    rng = np.random.default_rng(0)
    trace = AttentionTrace.from_arrays(random_weights(rng))
    assert (trace.num_layers, trace.batch_size, trace.seq_len) == (LAYERS, BATCH, SEQ)
    assert trace.num_heads == (HEADS,) * LAYERS
    assert trace.mask.shape == (BATCH, SEQ) and trace.mask.all()
    assert trace.tokens == [[f"#{i}" for i in range(SEQ)]] * BATCH
    assert trace.layer_names == [f"layer.{i}" for i in range(LAYERS)]
    assert trace.stack().shape == (LAYERS, BATCH, HEADS, SEQ, SEQ)
    assert not trace.causal


def test_stacked_array_and_single_item_labels():
    rng = np.random.default_rng(1)
    stacked = np.stack(random_weights(rng, batch=1))
    trace = AttentionTrace.from_arrays(stacked, tokens=list("abcde"))
    assert trace.batch_size == 1 and trace.tokens == [list("abcde")]


def test_causal_detection_ignores_padding_rows():
    """Left-padded decoders: padded query rows may attend anywhere; only real rows decide causality."""
    rng = np.random.default_rng(21)
    w = np.tril(rng.random((2, 3, SEQ, SEQ)))
    w[0, :, :2, :] = 1.0  # item 0 is left-padded by 2: its padded rows spread over every key
    w[0, :, 2:, :2] = 0.0
    w /= w.sum(-1, keepdims=True)
    mask = np.ones((2, SEQ), bool)
    mask[0, :2] = False
    assert AttentionTrace.from_arrays([w, w], mask=mask).causal


def test_bfloat16_arrays_are_stored_as_float32_with_their_tolerance():
    import ml_dtypes

    w = random_weights(np.random.default_rng(22))
    bf16 = [x.astype(ml_dtypes.bfloat16) for x in w]
    trace = AttentionTrace.from_arrays(bf16)
    assert all(layer.weights.dtype == np.float32 and layer.source_dtype == "bfloat16" for layer in trace.layers)
    np.testing.assert_array_equal(trace.layers[0].weights, bf16[0].astype(np.float32))
    # rounded to bfloat16, rows are off by more than the float32 tolerance: converting by hand needs source_dtype
    upcast = [x.astype(np.float32) for x in bf16]
    assert max(abs(x.sum(-1) - 1).max() for x in upcast) > 1e-4
    with pytest.raises(TraceError, match="source_dtype='bfloat16'"):
        AttentionTrace.from_arrays(upcast)
    assert AttentionTrace.from_arrays(upcast, source_dtype="bfloat16").layers[0].source_dtype == "bfloat16"


def test_causal_is_detected():
    rng = np.random.default_rng(2)
    weights = []
    for _ in range(2):
        w = np.tril(rng.random((1, 3, SEQ, SEQ))) + np.eye(SEQ) * 1e-3
        weights.append(w / w.sum(-1, keepdims=True))
    assert AttentionTrace.from_arrays(weights).causal
    assert not AttentionTrace.from_arrays(weights, causal=False).causal


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda w: w.__setitem__((0, 1, 2, 3), np.nan), "NaN or Inf"),
        (lambda w: w.__setitem__((1, 0, 0, 0), -0.25), "negative"),
        (lambda w: w.__setitem__((0, 2, 4, slice(None)), 0.5), "sums to"),
    ],
)
def test_bad_values_name_the_layer(mutate, message):
    rng = np.random.default_rng(3)
    weights = random_weights(rng)
    mutate(weights[2])
    with pytest.raises(TraceError, match=message) as info:
        AttentionTrace.from_arrays(weights)
    assert "Layer 2" in str(info.value)


def test_swapped_axes_are_caught_by_row_sums():
    rng = np.random.default_rng(4)
    weights = [w.transpose(0, 1, 3, 2) for w in random_weights(rng)]  # (batch, heads, key, query)
    with pytest.raises(TraceError, match="transpose"):
        AttentionTrace.from_arrays(weights)


def test_mismatched_token_counts():
    rng = np.random.default_rng(5)
    weights = random_weights(rng)
    weights[3] = random_weights(rng, layers=1, seq=SEQ + 2)[0]
    with pytest.raises(TraceError, match=r"Layer 3 .*7"):
        AttentionTrace.from_arrays(weights)


def test_mismatched_batch_and_bad_rank():
    rng = np.random.default_rng(6)
    weights = random_weights(rng)
    weights[1] = weights[1][:1]
    with pytest.raises(TraceError, match="batch size 1"):
        AttentionTrace.from_arrays(weights)
    with pytest.raises(TraceError, match="4 axes"):
        AttentionTrace.from_arrays([np.ones((2, 2))])


def test_empty_trace():
    with pytest.raises(TraceError, match="no attention layers"):
        AttentionTrace.from_arrays([])


def test_mask_checks():
    rng = np.random.default_rng(7)
    weights = random_weights(rng)
    with pytest.raises(TraceError, match=r"mask must have shape"):
        AttentionTrace.from_arrays(weights, mask=np.ones((BATCH, SEQ + 1)))
    with pytest.raises(TraceError, match="no real token"):
        AttentionTrace.from_arrays(weights, mask=np.array([[1] * SEQ, [0] * SEQ]))
    # weights put attention on keys the mask calls padding: the mask does not match the model's
    with pytest.raises(TraceError, match="padding"):
        AttentionTrace.from_arrays(weights, mask=np.array([[1] * SEQ, [1, 1, 1, 0, 0]]))


def test_token_label_checks():
    rng = np.random.default_rng(8)
    with pytest.raises(TraceError, match="tokens has 1 items"):
        AttentionTrace.from_arrays(random_weights(rng), tokens=[list("abcde")])
    with pytest.raises(TraceError, match=r"tokens\[1\] has 4 labels"):
        AttentionTrace.from_arrays(random_weights(rng), tokens=[list("abcde"), list("abcd")])


def padded_trace(rng):
    """Batch item 1 has 3 real tokens of 5; its weights are zero on padded keys."""
    weights = random_weights(rng)
    for w in weights:
        w[1, :, :, 3:] = 0
        w[1] /= w[1].sum(-1, keepdims=True)
    mask = np.array([[1] * SEQ, [1, 1, 1, 0, 0]], dtype=bool)
    tokens = [list("abcde"), ["x", "y", "z", "[PAD]", "[PAD]"]]
    return AttentionTrace.from_arrays(
        weights, mask=mask, tokens=tokens, names=[f"enc.{i}" for i in range(LAYERS)],
        model_name="tiny", metadata={"note": "test", "n": 3},
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    rng = np.random.default_rng(9)
    trace = padded_trace(rng)
    trace = AttentionTrace(
        [attnflow.LayerAttention(layer.weights.astype(dtype), layer.name, extras={"grad": layer.weights * 2})
         for layer in trace.layers],
        mask=trace.mask, tokens=trace.tokens, model_name=trace.model_name, metadata=trace.metadata, check_rows=False,
    )
    path = tmp_path / "trace.safetensors"
    trace.save(path)
    loaded = attnflow.load(path)
    assert loaded.layer_names == trace.layer_names
    assert loaded.tokens == trace.tokens and loaded.metadata == trace.metadata
    assert loaded.model_name == "tiny" and loaded.causal == trace.causal
    np.testing.assert_array_equal(loaded.mask, trace.mask)
    for a, b in zip(loaded.layers, trace.layers):
        assert a.weights.dtype == b.weights.dtype
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.extras["grad"], b.extras["grad"])


def test_saved_file_is_plain_safetensors_without_pickle(tmp_path):
    from safetensors.numpy import load_file

    path = tmp_path / "t.safetensors"
    padded_trace(np.random.default_rng(10)).save(path)
    arrays = load_file(str(path))  # an independent reader sees plain arrays
    assert set(arrays) == {"streams.0.mask", "streams.0.special"} | {f"layers.{i}.weights" for i in range(LAYERS)}
    assert b"pickle" not in path.read_bytes()


def test_truncated_and_corrupted_files(tmp_path):
    path = tmp_path / "t.safetensors"
    padded_trace(np.random.default_rng(11)).save(path)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceFileError, match="truncated or corrupted"):
        attnflow.load(truncated)

    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # one byte of the last array's data
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(TraceFileError, match="checksum"):
        attnflow.load(corrupted)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(TraceFileError):
        attnflow.load(garbage)
    with pytest.raises(TraceFileError, match="No trace at"):
        attnflow.load(tmp_path / "missing.safetensors")


def test_other_safetensors_file_is_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"x": np.zeros(3)}, str(path))
    with pytest.raises(TraceFileError, match="not an attnflow trace"):
        attnflow.load(path)


def test_select_keeps_one_item():
    trace = padded_trace(np.random.default_rng(12))
    one = trace.select(-1)
    assert one.batch_size == 1 and one.tokens == [trace.tokens[1]]
    np.testing.assert_array_equal(one.layers[0].weights[0], trace.layers[0].weights[1])
    with pytest.raises(TraceError, match="out of range"):
        trace.select(2)


@pytest.mark.parametrize("dtype, tol", [(np.float16, 1e-2), (np.float32, 1e-4), (np.float64, 1e-6)])
def test_rows_are_judged_on_their_exact_sums_and_masses(dtype, tol):
    """Validation screens rows in one float32 (float64) pass and sums the rows outside half the tolerance again
    exactly: a row within the tolerance passes, one beyond it fails, for the sums, padding and the future."""
    seq = SEQ
    causal = np.tril(np.ones((seq, seq)))
    base = np.broadcast_to(causal / causal.sum(-1, keepdims=True), (BATCH, HEADS, seq, seq)).astype(dtype)
    mask = np.ones((BATCH, seq), bool)
    mask[1, -2:] = False

    def build(change, amount):
        w = np.array(base)
        w[1, :, :, -2:] = 0.0  # item 1: the last two keys are padding
        w[1] /= w[1].sum(-1, keepdims=True)
        change(w, amount * tol)
        return AttentionTrace.from_arrays([w, w.copy()], mask=mask, causal=True, names=["a", "b"])

    def scale_row(w, x):  # the row of (batch 0, head 2, query 4) sums to 1 + x
        w[0, 2, 4] *= 1 + x

    def onto_padding(w, x):  # query 2 of item 1 puts x on a padded key
        w[1, 1, 2, -1] = x
        w[1, 1, 2, :-2] *= 1 - x

    def onto_later(w, x):  # query 1 of item 0 puts x on key 3
        w[0, 0, 1, 3] = x
        w[0, 0, 1, :2] *= 1 - x

    for change, message in ((scale_row, "sums to"), (onto_padding, "padding"), (onto_later, "later tokens")):
        assert build(change, 0.75).num_layers == 2
        with pytest.raises(TraceError, match=message):
            build(change, 1.5)


@pytest.mark.parametrize("dtype", ["<f2", ">f4", "<f8"])
@pytest.mark.parametrize("check_rows", [True, False])
def test_non_finite_and_negative_weights_are_refused_in_every_dtype_and_byte_order(dtype, check_rows):
    """The value check reads the bits (NaN, ±inf, negatives at or above +inf's bits): each is found, with its
    position, in float16/32/64 of either byte order, also where rows are not checked; -0.0 is a zero."""
    for value, message in ((np.inf, "NaN or Inf"), (-np.inf, "NaN or Inf"), (np.nan, "NaN or Inf"),
                           (-1e-3, "negative values")):
        weights = [w.astype(dtype) for w in random_weights(np.random.default_rng(11))]
        weights[1][1, 0, 3, 2] = value
        layers = [attnflow.LayerAttention(weights=w, name=f"layer.{i}") for i, w in enumerate(weights)]
        with pytest.raises(TraceError, match=rf"Layer 1 .*{message}.*\(1, 0, 3, 2\)"):
            AttentionTrace(layers, check_rows=check_rows)
    weights = [w.astype(dtype) for w in random_weights(np.random.default_rng(11))]
    weights[1][1, 0, 3, 1] += weights[1][1, 0, 3, 2]  # the row keeps its sum
    weights[1][1, 0, 3, 2] = -0.0
    assert AttentionTrace.from_arrays(weights).num_layers == LAYERS
