"""The data an interactive page needs, packed small: explanation scores as 16-bit logarithmic codes (about
3.5 significant digits), per-head attention as 8 bits per weight scaled to each row's largest weight, all
in one zlib-compressed, base64-encoded block; tokens and settings as JSON.

Encodings (little-endian), as the page's script decodes them:

* ``log16`` (scores): ``uint16`` codes; 0 is 0; ``1..32767`` is ``+exp(lo + (c - 1) * step)`` and
  ``32769..65535`` is ``-exp(lo + (c - 32769) * step)``. ``step`` is at most ``30 / 32766``, so a value is
  within 0.05% of the original; values below ``e^-30`` of an array's largest are stored as 0.
* ``u8row`` (per-head weights): ``uint8`` codes ``q`` with ``w = q / 255 * row_max``, the row maxima in a
  ``float32`` array beside them: each weight within 0.2% of its row's largest weight.
"""

from __future__ import annotations

import base64
import math
import zlib
from typing import Any

import numpy as np

from .._errors import OptionError
from ..plot._scores import METHOD_TITLES

#: The widest range of natural-log magnitudes a log16 array keeps below its largest value.
LOG_RANGE = 30.0
FORMAT_VERSION = 1


class _Blob:
    """Arrays appended to one byte buffer; each gets a JSON descriptor with its offset."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> int:
        offset = self.size
        self.parts.append(data)
        self.size += len(data)
        return offset

    def log16(self, values: np.ndarray) -> dict[str, Any]:
        codes, lo, step = encode_log16(values)
        return {"enc": "log16", "shape": list(values.shape), "offset": self.add(codes.astype("<u2").tobytes()),
                "lo": lo, "step": step}

    def u8row(self, values: np.ndarray) -> dict[str, Any]:
        codes, maxima = encode_u8row(values)
        offset = self.add(codes.tobytes())
        return {"enc": "u8row", "shape": list(values.shape), "offset": offset,
                "max_offset": self.add(maxima.astype("<f4").tobytes())}

    def packed(self) -> str:
        return base64.b64encode(zlib.compress(b"".join(self.parts), 9)).decode("ascii")


def encode_log16(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``(codes, lo, step)`` of the log16 encoding (see the module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    magnitude = np.abs(values)
    positive = magnitude[magnitude > 0]
    if not positive.size:
        return np.zeros(values.shape, np.uint16), 0.0, 1.0
    hi = math.log(float(positive.max()))
    lo = max(math.log(float(positive.min())), hi - LOG_RANGE)
    step = (hi - lo) / 32766 if hi > lo else 1.0
    with np.errstate(divide="ignore"):
        logs = np.log(np.where(magnitude > 0, magnitude, 1.0))
    index = np.clip(np.rint((logs - lo) / step), 0, 32766).astype(np.int64)
    keep = magnitude >= math.exp(lo) * (1 - 1e-12)
    codes = np.where(keep, index + np.where(values < 0, 32769, 1), 0)
    return codes.astype(np.uint16), float(lo), float(step)


def decode_log16(codes: np.ndarray, lo: float, step: float) -> np.ndarray:
    """The inverse of `encode_log16` (what the page computes)."""
    codes = np.asarray(codes, dtype=np.int64)
    negative = codes >= 32769
    index = np.where(negative, codes - 32769, codes - 1)
    values = np.exp(lo + index * step) * np.where(negative, -1.0, 1.0)
    return np.where(codes == 0, 0.0, values)


def encode_u8row(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(codes uint8, row maxima float32)`` of non-negative ``(..., rows, columns)`` weights."""
    values = np.asarray(values, dtype=np.float64)
    maxima = values.max(axis=-1).astype(np.float32)
    scale = np.where(maxima > 0, maxima, 1.0).astype(np.float64)[..., None]
    codes = np.clip(np.rint(values / scale * 255), 0, 255).astype(np.uint8)
    return codes, maxima


def build_payload(explanation: Any, trace: Any | None, *, title: str | None = None,
                  prompt_length: int | None = None) -> dict[str, Any]:
    """Everything the page shows, as one JSON-ready dict (arrays inside ``blob``)."""
    if trace is not None:
        _check_trace(explanation, trace)
    blob = _Blob()
    explained = explanation.stream
    names = [explained] + [s for s in explanation.input_streams if s != explained]
    items = []
    for b in range(explanation.batch_size):
        streams = {}
        for name in names:
            stream = explanation.streams[name]
            valid = stream.valid_index(b)
            streams[name] = {
                "tokens": [stream.tokens[b][p] for p in valid], "positions": valid.tolist(),
                "special": [bool(x) for x in stream.special[b][valid]],
            }
        positions = np.asarray(explanation.sources[b])
        real = np.flatnonzero(np.asarray(explanation.streams[explained].mask[b])[positions])
        where = {p: i for i, p in enumerate(streams[explained]["positions"])}
        scores: dict[str, dict[str, Any]] = {}
        for method in explanation.methods:
            full = explanation.layers(method)
            by_stream = full if isinstance(full, dict) else {explanation.input_streams[0]: full}
            scores[method] = {}
            for name, array in by_stream.items():
                valid = explanation.streams[name].valid_index(b)
                part = np.asarray(array)[:, b][:, real][:, :, valid]
                scores[method][name] = blob.log16(part)
        items.append({
            "streams": streams, "sources": [where[int(p)] for p in positions[real]],
            "source_labels": [explanation.source_tokens(b)[i] for i in real], "scores": scores,
            "heads": _heads(trace, explanation, b, blob) if trace is not None else None,
        })
    methods = [{"name": m, "title": METHOD_TITLES.get(m, m), "layers": list(explanation.layer_indices(m)),
                "inputs": list(explanation.layers(m)) if isinstance(explanation.layers(m), dict)
                else [explanation.input_streams[0]]} for m in explanation.methods]
    stream_layers = None
    layers = None
    if trace is not None:
        stream_layers = [i for i, layer in enumerate(trace.layers) if layer.query_stream == explained]
        from ..plot._layers import stream_layer

        # "number" of "count": the layer's number from 1 among its query stream's layers, as every output shows it
        layers = [{"index": i, "number": stream_layer(trace, i)[0], "count": stream_layer(trace, i)[1],
                   "name": layer.name, "kind": layer.kind, "query": layer.query_stream,
                   "key": layer.key_stream, "heads": int(layer.weights.shape[1])}
                  for i, layer in enumerate(trace.layers) if _shown_layer(layer, explanation)]
    if prompt_length is None:
        prompt_length = explanation.metadata.get("prompt_length")
    return {
        "format": "attnflow.html", "version": FORMAT_VERSION,
        "title": title or f"{explanation.model_name or 'model'}: {', '.join(explanation.methods)}",
        "model": explanation.model_name, "framework": explanation.framework, "explained": explained,
        "causal": bool(explanation.streams[explained].causal), "streams": names,
        "options": explanation.options.describe(), "methods": methods, "items": items,
        "layers": layers, "stream_layers": stream_layers,
        "prompt_length": None if prompt_length is None else int(prompt_length),
        "blob": blob.packed(), "blob_size": blob.size,
    }


def _shown_layer(layer: Any, explanation: Any) -> bool:
    return layer.query_stream in explanation.streams and layer.key_stream in explanation.streams


def _heads(trace: Any, explanation: Any, b: int, blob: _Blob) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for layer in trace.layers:
        if not _shown_layer(layer, explanation):
            continue
        rows = trace.streams[layer.query_stream].valid_index(b)
        cols = trace.streams[layer.key_stream].valid_index(b)
        weights = np.asarray(layer.weights[b], dtype=np.float64)[:, rows][:, :, cols]
        out.append(blob.u8row(weights))
    return out


def _check_trace(explanation: Any, trace: Any) -> None:
    """The trace must be the one the explanation was computed from (same items and tokens)."""
    from ..trace import AttentionTrace

    if not isinstance(trace, AttentionTrace):
        raise OptionError(f"trace must be an attnflow.AttentionTrace, got {type(trace).__name__}.")
    problem = None
    if trace.batch_size != explanation.batch_size:
        problem = f"it has {trace.batch_size} items, the explanation {explanation.batch_size}"
    else:
        for name, stream in explanation.streams.items():
            other = trace.streams.get(name)
            if other is None:
                problem = f"it has no stream {name!r}"
            elif other.length != stream.length or _labels(other) != _labels(stream):
                problem = f"its {name!r} tokens differ (an explanation.aggregate() result has words, the trace tokens)"
            if problem:
                break
    if problem:
        raise OptionError(
            f"This trace does not belong to the explanation ({problem}); pass the trace the explanation was "
            "computed from, or leave trace= out (the page then has no per-head view)."
        )


def _labels(stream: Any) -> list[list[str]]:
    """A trace stream's token labels as lists (in a trace every stream has its labels)."""
    return list(map(list, stream.tokens))
