"""Trace files under damage: every damaged or edited file is a clean TraceFileError or the exact trace.

Also: format-1 files (attnflow 0.1) still load, big-endian arrays round-trip, saving to bad places fails
cleanly, and a trace cannot change after it is built.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

import attnflow
from attnflow import AttentionTrace, AttnflowError, TraceError, TraceFileError

# distinct sizes: layers 3, batch 2, heads 4, seq 5
LAYERS, BATCH, HEADS, SEQ = 3, 2, 4, 5


def sample_trace(rng=None, causal=None) -> AttentionTrace:
    """Non-causal weights, or with ``causal=True`` weights that are (the flag is checked against them)."""
    rng = rng or np.random.default_rng(0)
    weights = [rng.dirichlet(np.ones(SEQ), size=(BATCH, HEADS, SEQ)).astype(np.float32) for _ in range(LAYERS)]
    for w in weights:
        if causal:
            w *= np.tril(np.ones((SEQ, SEQ), np.float32))
            w /= w.sum(-1, keepdims=True)
        w[1, :, :, 3:] = 0
        w[1] /= w[1].sum(-1, keepdims=True)
    mask = np.ones((BATCH, SEQ), bool)
    mask[1, 3:] = False
    return AttentionTrace.from_arrays(
        weights, mask=mask, tokens=[list("abcde"), list("fgh..")], names=[f"enc.{i}" for i in range(LAYERS)],
        causal=causal, model_name="tiny", metadata={"note": "fuzz", "n": 3},
    )


def same_trace(a: AttentionTrace, b: AttentionTrace) -> bool:
    if a.layer_names != b.layer_names or list(a.streams) != list(b.streams) or a.metadata != b.metadata:
        return False
    if (a.framework, a.model_name) != (b.framework, b.model_name):
        return False
    for la, lb in zip(a.layers, b.layers):
        if (la.kind, la.query_stream, la.key_stream, la.source_dtype) != (lb.kind, lb.query_stream, lb.key_stream,
                                                                         lb.source_dtype):
            return False
        if la.weights.dtype != lb.weights.dtype or not np.array_equal(la.weights, lb.weights):
            return False
    for name, sa in a.streams.items():
        sb = b.streams[name]
        if (sa.tokens, sa.causal, sa.grid) != (sb.tokens, sb.causal, sb.grid):
            return False
        if not (np.array_equal(sa.mask, sb.mask) and np.array_equal(sa.special, sb.special)):
            return False
    return True


def split_file(data: bytes) -> tuple[dict, dict, bytes]:
    """(safetensors header, attnflow header, array bytes) of a file."""
    size = struct.unpack("<Q", data[:8])[0]
    st_header = json.loads(data[8 : 8 + size])
    return st_header, json.loads(st_header["__metadata__"]["attnflow"]), data[8 + size :]


def join_file(st_header: dict, header: dict | str, body: bytes, *, sign: bool) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header, sort_keys=True, separators=(",", ":"))
    meta = st_header["__metadata__"]
    meta["attnflow"] = text
    if sign:
        meta["attnflow.sha256"] = hashlib.sha256(text.encode()).hexdigest()
    else:
        meta.pop("attnflow.sha256", None)
    return _with_metadata(st_header, body)


def load_outcome(path, original: AttentionTrace) -> str:
    """'error' (a clean attnflow error), 'same' (the exact trace); anything else fails the test."""
    try:
        loaded = attnflow.load(path)
    except AttnflowError:
        return "error"
    assert same_trace(loaded, original), "a damaged file loaded as a different trace"
    return "same"


def test_fuzzed_files_are_caught_or_identical(tmp_path):
    """Seeded and bounded: byte flips anywhere, truncations, and random header bytes."""
    trace = sample_trace()
    path = tmp_path / "t.safetensors"
    trace.save(path)
    data = path.read_bytes()
    rng = np.random.default_rng(1234)
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    outcomes = {"error": 0, "same": 0}
    damaged = tmp_path / "d.safetensors"
    for k in range(400):
        mutated = bytearray(data)
        if k % 4 == 0:
            mutated = mutated[: int(rng.integers(0, len(data)))]
        elif k % 4 == 1:  # the header, where the text lives
            mutated[int(rng.integers(0, header_end))] ^= 1 << int(rng.integers(0, 8))
        else:
            for _ in range(int(rng.integers(1, 4))):
                mutated[int(rng.integers(0, len(data)))] ^= int(rng.integers(1, 256))
        damaged.write_bytes(bytes(mutated))
        outcomes[load_outcome(damaged, trace)] += 1
    assert outcomes["error"] > 350


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["layers"][0].update(key_stream="memory"),          # self -> cross
        lambda h: h.update(layers=h["layers"][:-1]),                     # drop a layer
        lambda h: h["streams"][0].update(causal="false"),                # a string for a bool
        lambda h: h["layers"][1].update(name=7),                          # a number for a name
        lambda h: h["streams"][0].update(tokens=None),                    # null labels
        lambda h: h["streams"][0].update(tokens=[["a", "b"], [1, 2]]),    # labels of the wrong type
        lambda h: h.update(metadata=[1, 2]),                              # metadata not an object
        lambda h: h.pop("framework"),                                     # a missing field
        lambda h: h["layers"][2].update(source_dtype=None),
        lambda h: h["streams"][0].update(grid=[2, "x"]),
    ],
)
def test_edited_headers_are_refused_with_and_without_a_checksum(tmp_path, edit):
    trace = sample_trace()
    path = tmp_path / "t.safetensors"
    trace.save(path)
    st_header, header, body = split_file(path.read_bytes())
    digest = st_header["__metadata__"]["attnflow.sha256"]
    edit(header)
    stale = tmp_path / "stale.safetensors"  # the edit alone: the header no longer matches its checksum
    stale.write_bytes(join_file(st_header, header, body, sign=False))
    st_stale, _, body_stale = split_file(stale.read_bytes())
    st_stale["__metadata__"]["attnflow.sha256"] = digest
    stale.write_bytes(_with_metadata(st_stale, body_stale))
    with pytest.raises(TraceFileError, match="header does not match its checksum"):
        attnflow.load(stale)
    # a file without a header checksum (as files from before it are) is refused by the type checks instead
    unsigned = tmp_path / "unsigned.safetensors"
    unsigned.write_bytes(join_file(st_header, header, body, sign=False))
    with pytest.raises(TraceFileError, match="damaged attnflow trace"):
        attnflow.load(unsigned)


def _with_metadata(st_header: dict, body: bytes) -> bytes:
    raw = json.dumps(st_header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    "header_text, message",
    [
        ("[1, 2, 3]", "not a JSON object"),
        ("{" * 5000 + "}" * 5000, "nested"),
        ('{"format": "attnflow.trace"', "not valid JSON"),
        ('{"format": "attnflow.trace", "version": 2}', "checksums are missing"),
        ('{"format": "attnflow.trace", "version": true, "sha256": {}}', "version True"),
        ('{"format": "other", "version": 2}', "format is 'other'"),
    ],
)
def test_hostile_headers_are_clean_errors(tmp_path, header_text, message):
    trace = sample_trace()
    path = tmp_path / "t.safetensors"
    trace.save(path)
    st_header, _, body = split_file(path.read_bytes())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(join_file(st_header, header_text, body, sign=True))
    with pytest.raises(TraceFileError, match=message):
        attnflow.load(bad)


def test_format_1_files_still_load(tmp_path):
    """A file as attnflow 0.1 wrote it (written here by hand from that format's description)."""
    from safetensors.numpy import save_file

    trace = sample_trace(causal=True)
    tensors = {"mask": trace.mask}
    layers = []
    for i, layer in enumerate(trace.layers):
        tensors[f"layers.{i}.weights"] = layer.weights
        layers.append({"name": layer.name, "kind": "self", "source_dtype": layer.source_dtype, "extras": []})
    cross = np.random.default_rng(3).dirichlet(np.ones(6), size=(BATCH, 2, SEQ)).astype(np.float32)
    tensors[f"layers.{LAYERS}.weights"] = cross
    layers.append({"name": "dec.cross", "kind": "cross", "source_dtype": "float32", "extras": []})
    header = {
        "format": "attnflow.trace", "version": 1, "layers": layers, "tokens": trace.tokens, "causal": True,
        "framework": "numpy", "model_name": "tiny", "metadata": {"note": "fuzz", "n": 3},
        "sha256": {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in tensors.items()},
    }
    path = tmp_path / "v1.safetensors"
    save_file(tensors, str(path), metadata={"attnflow": json.dumps(header)})
    loaded = attnflow.load(path)
    assert list(loaded.streams) == ["tokens", "memory"] and loaded.streams["tokens"].causal
    assert loaded.streams["memory"].length == 6 and loaded.layers[-1].kind == "cross"
    for a, b in zip(loaded.layers, trace.layers):
        np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(loaded.streams["tokens"].mask, trace.mask)
    # a flipped array byte is still caught in the old format
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFileError, match="checksum"):
        attnflow.load(path)


def test_causal_flag_that_differs_from_detection_round_trips(tmp_path):
    trace = sample_trace(causal=True)
    assert trace.causal
    trace.save(tmp_path / "t.safetensors")
    assert attnflow.load(tmp_path / "t.safetensors").causal
    forced_off = AttentionTrace.from_arrays([np.tril(np.ones((1, 1, 3, 3))) / np.arange(1, 4)[:, None]] * 2,
                                            causal=False)
    forced_off.save(tmp_path / "u.safetensors")
    assert not attnflow.load(tmp_path / "u.safetensors").causal


def test_big_endian_arrays_round_trip(tmp_path):
    trace = sample_trace()
    swapped = AttentionTrace.from_arrays(
        [layer.weights.astype(">f4") for layer in trace.layers], mask=trace.mask, tokens=trace.tokens
    )
    swapped.save(tmp_path / "t.safetensors")
    loaded = attnflow.load(tmp_path / "t.safetensors")
    for a, b in zip(loaded.layers, trace.layers):
        np.testing.assert_array_equal(a.weights, b.weights)


def test_saving_to_bad_places_is_a_clean_error(tmp_path):
    trace = sample_trace()
    with pytest.raises(TraceFileError, match="does not exist"):
        trace.save(tmp_path / "missing" / "t.safetensors")
    with pytest.raises(TraceFileError, match="is a directory"):
        trace.save(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(TraceFileError, match="not a directory"):
        trace.save(tmp_path / "file" / "t.safetensors")
    with pytest.raises(TraceFileError):
        trace.save(tmp_path / ("x" * 5000))
    with pytest.raises(TraceFileError, match="No trace at|Cannot read"):
        attnflow.load(tmp_path / ("x" * 5000))
    with pytest.raises(TraceFileError, match="writes attnflow traces"):
        attnflow.save({"not": "a trace"}, tmp_path / "t.safetensors")


def test_a_trace_cannot_change(tmp_path):
    rng = np.random.default_rng(5)
    weights = [rng.dirichlet(np.ones(SEQ), size=(BATCH, HEADS, SEQ)) for _ in range(LAYERS)]
    mask = np.ones((BATCH, SEQ), bool)
    trace = AttentionTrace.from_arrays(weights, mask=mask)
    before = attnflow.rollout(trace)
    weights[0][:] = 0.3  # the caller's arrays change afterwards
    mask[1, 2:] = False
    np.testing.assert_array_equal(attnflow.rollout(trace), before)
    np.testing.assert_allclose(attnflow.rollout(trace).sum(-1), 1.0)
    with pytest.raises(ValueError):
        trace.layers[0].weights[0, 0, 0, 0] = 1.0
    with pytest.raises(ValueError):
        trace.mask[0, 0] = False
    with pytest.raises(AttributeError, match="replace"):
        trace.model_name = "other"
    with pytest.raises(TypeError):
        trace.metadata["x"] = 1  # type: ignore[index]
    assert trace.replace(model_name="other").model_name == "other" and trace.model_name == ""


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokens": [1, 2]}, "tokens"),
        ({"tokens": 5}, "tokens"),
        ({"tokens": [["a"] * SEQ, ["b"] * (SEQ - 1)]}, r"tokens\[1\] has 4 labels"),
        ({"metadata": [1, 2]}, "metadata must be a mapping"),
        ({"metadata": {"x": object()}}, "JSON values"),
        ({"metadata": {1: "x"}}, "keys must be strings"),
        ({"mask": np.ones((BATCH, SEQ)) * 2}, "0/1"),
        ({"special": np.ones((BATCH, SEQ + 1))}, "special must have shape"),
        ({"causal": "false"}, "causal must be True, False or None"),
        ({"grid": (2, 2)}, "patch grid needs 4"),
        ({"source_dtype": "float128"}, "source_dtype must be one of"),
    ],
)
def test_bad_arguments_are_trace_errors(kwargs, message):
    rng = np.random.default_rng(6)
    weights = [rng.dirichlet(np.ones(SEQ), size=(BATCH, HEADS, SEQ)) for _ in range(LAYERS)]
    with pytest.raises(TraceError, match=message):
        AttentionTrace.from_arrays(weights, **kwargs)


def test_unstorable_and_short_rows_are_refused():
    rng = np.random.default_rng(7)
    w = rng.dirichlet(np.ones(SEQ), size=(BATCH, HEADS, SEQ))
    with pytest.raises(TraceError, match="float16, float32 or float64"):
        AttentionTrace.from_arrays([w.astype(np.longdouble)] if np.dtype(np.longdouble).itemsize > 8
                                   else [w.astype(np.float16).view(np.int16)])
    short = w * 0.9  # rows summing to less than 1 are as wrong as rows summing to more
    with pytest.raises(TraceError, match="sums to 0.9"):
        AttentionTrace.from_arrays([short])
    with pytest.raises(TraceError, match="batch_index"):
        AttentionTrace.from_arrays([w]).select(0.5)  # type: ignore[arg-type]
