"""Trace files: an [`AttentionTrace`][attnflow.AttentionTrace] as named arrays plus a typed, checksummed JSON header.

Format 2 (written since streams exist)::

    arrays   streams.{i}.mask, streams.{i}.special        (batch, length) bool, per stream i
             layers.{i}.weights                            (batch, heads, query, key)
             layers.{i}.extras.{name}                      per-layer extras
             links.{i}.weights                             (batch, stream length, source length)
    header   streams: [{name, tokens, causal, grid}], layers: [{name, query_stream, key_stream,
             source_dtype, extras}], links: [{stream, source, depth}], framework, model_name, metadata

Format 1 files (attnflow 0.1: one stream, ``mask`` array, ``tokens``/``causal`` in the header) still load;
their cross-attention layers become layers onto a second stream, ``"memory"``. Every header field is
type-checked on load, so an edited header is an error, not a different trace; the enumerations the methods
read (``source_dtype``, ``metadata["head_fusion"]``, ``metadata["generation"]``) must be known values, a
stream's ``causal`` flag must agree with its weights (no real query puts more than the row-sum tolerance on
later real keys), and a boolean array holding a byte other than 0 or 1 is refused (in memory, a bool array
of such bytes is normalised to 0/1 instead: every nonzero byte is True).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .._errors import TraceError, TraceFileError
from .._tensorfile import read_tensor_file, write_tensor_file
from ._stream import DEFAULT_STREAM, MEMORY_STREAM, Link, Stream
from ._trace import ROW_SUM_TOLERANCE, AttentionTrace, LayerAttention, thaw_metadata

FORMAT = "attnflow.trace"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def trace_arrays(trace: AttentionTrace) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and the header (format 2) that represent ``trace``."""
    tensors: dict[str, np.ndarray] = {}
    streams = []
    for i, stream in enumerate(trace.streams.values()):
        tensors[f"streams.{i}.mask"] = stream.mask  # type: ignore[assignment]
        tensors[f"streams.{i}.special"] = stream.special  # type: ignore[assignment]
        streams.append({
            "name": stream.name, "tokens": [list(item) for item in stream.tokens or ()], "causal": bool(stream.causal),
            "grid": None if stream.grid is None else list(stream.grid),
        })
    layers = []
    for i, layer in enumerate(trace.layers):
        tensors[f"layers.{i}.weights"] = layer.weights
        for key, value in layer.extras.items():
            tensors[f"layers.{i}.extras.{key}"] = value
        layers.append({
            "name": layer.name, "query_stream": layer.query_stream, "key_stream": layer.key_stream,
            "source_dtype": layer.source_dtype, "extras": list(layer.extras),
        })
    links = []
    for i, link in enumerate(trace.links):
        tensors[f"links.{i}.weights"] = link.weights
        links.append({"stream": link.stream, "source": link.source, "depth": link.depth})
    header = {
        "streams": streams, "layers": layers, "links": links, "framework": trace.framework,
        "model_name": trace.model_name, "metadata": thaw_metadata(trace.metadata),
    }
    return tensors, header


def save_trace(trace: AttentionTrace, path: str | os.PathLike[str]) -> None:
    """Write ``trace`` to ``path`` (safetensors, atomic: a crash leaves no partial file)."""
    tensors, header = trace_arrays(trace)
    write_tensor_file(path, tensors, header, format=FORMAT, version=FORMAT_VERSION, what="trace")


def save(obj: AttentionTrace, path: str | os.PathLike[str]) -> None:
    """Save an attnflow object (an [`AttentionTrace`][attnflow.AttentionTrace]) to ``path``; [`load`][attnflow.load] reads it back."""
    if not isinstance(obj, AttentionTrace):
        raise TraceFileError(f"attnflow.save() writes attnflow traces; got {type(obj).__name__}.")
    save_trace(obj, path)


def load(path: str | os.PathLike[str]) -> AttentionTrace:
    """Read a trace written by [`AttentionTrace.save`][attnflow.AttentionTrace.save] (format 2, or format 1 of attnflow 0.1).

    Raises:
        TraceFileError: the file is missing, truncated, corrupted, edited, or not an attnflow trace.
    """
    tensors, header = read_tensor_file(path, format=FORMAT, versions=READABLE_VERSIONS, what="trace")
    return trace_from_arrays(tensors, header, where=f"{str(path)!r} is a damaged attnflow trace")


def trace_from_arrays(tensors: dict[str, np.ndarray], header: dict[str, Any], *, where: str) -> AttentionTrace:
    """Rebuild a trace from `trace_arrays` output (or a format-1 file's arrays and header)."""
    fields = _Fields(header, tensors, where)
    try:
        if header["version"] == 1:
            return _from_version_1(fields)
        return _from_version_2(fields)
    except TraceError as exc:
        raise TraceFileError(f"{where}: {exc}") from exc


class _Fields:
    """Typed access to a header and its arrays; every mismatch is a TraceFileError naming the field."""

    def __init__(self, header: dict[str, Any], tensors: dict[str, np.ndarray], where: str):
        self.header, self.tensors, self.where = header, tensors, where
        self.used: set[str] = set()

    def fail(self, text: str) -> TraceFileError:
        return TraceFileError(f"{self.where}: {text}.")

    def get(self, obj: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str,
            check: Callable[[Any], bool] | None = None) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise self.fail(f"header field {path} is missing")
        value = obj[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _as_tuple(kind))
        if not ok or (check is not None and not check(value)):
            raise self.fail(f"header field {path} has the wrong type or value ({_short(value)})")
        return value

    def array(self, key: str) -> np.ndarray:
        if key not in self.tensors:
            raise self.fail(f"array {key!r} is missing")
        self.used.add(key)
        return self.tensors[key]

    def labels(self, value: Any, path: str) -> list[list[str]]:
        if not isinstance(value, list) or not all(
            isinstance(item, list) and all(isinstance(t, str) for t in item) for item in value
        ):
            raise self.fail(f"header field {path} must be a list of lists of strings")
        return value

    def finish(self) -> None:
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            raise self.fail(f"arrays {extra} belong to nothing in the header")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _dtype_name(value: str) -> str | None:
    """The dtype's name (``"float32"`` for ``">f4"``, which traces of big-endian arrays once stored)."""
    if value in ROW_SUM_TOLERANCE:
        return value
    try:
        return np.dtype(value).name
    except (TypeError, ValueError):
        return None


def _source_dtype(f: _Fields, meta: dict[str, Any], i: int) -> str:
    value = f.get(meta, "source_dtype", str, f"layers[{i}].source_dtype", lambda v: _dtype_name(v) in ROW_SUM_TOLERANCE)
    return _dtype_name(value)  # type: ignore[return-value]


def _common(f: _Fields) -> dict[str, Any]:
    h = f.header
    metadata = f.get(h, "metadata", dict, "metadata")
    return {
        "framework": f.get(h, "framework", str, "framework"),
        "model_name": f.get(h, "model_name", str, "model_name"),
        "metadata": metadata,
    }


def _extras(f: _Fields, meta: dict[str, Any], i: int) -> dict[str, np.ndarray]:
    names = f.get(meta, "extras", list, f"layers[{i}].extras", lambda v: all(_is_name(x) for x in v))
    return {name: f.array(f"layers.{i}.extras.{name}") for name in names}


def _from_version_2(f: _Fields) -> AttentionTrace:
    h = f.header
    stream_meta = f.get(h, "streams", list, "streams", lambda v: len(v) > 0)
    streams = []
    for i, meta in enumerate(stream_meta):
        grid = f.get(meta, "grid", (list, type(None)), f"streams[{i}].grid")
        streams.append(Stream(
            name=f.get(meta, "name", str, f"streams[{i}].name", _is_name),
            mask=f.array(f"streams.{i}.mask"),
            special=f.array(f"streams.{i}.special"),
            tokens=f.labels(f.get(meta, "tokens", list, f"streams[{i}].tokens"), f"streams[{i}].tokens"),
            causal=f.get(meta, "causal", bool, f"streams[{i}].causal"),
            grid=None if grid is None else tuple(grid),
        ))
    for stream in streams:
        if stream.mask is not None and stream.mask.dtype != np.bool_:
            raise f.fail(f"the mask of stream {stream.name!r} is not boolean")
    layers = []
    for i, meta in enumerate(f.get(h, "layers", list, "layers", lambda v: len(v) > 0)):
        layers.append(LayerAttention(
            weights=f.array(f"layers.{i}.weights"),
            name=f.get(meta, "name", str, f"layers[{i}].name"),
            source_dtype=_source_dtype(f, meta, i),
            query_stream=f.get(meta, "query_stream", str, f"layers[{i}].query_stream", _is_name),
            key_stream=f.get(meta, "key_stream", str, f"layers[{i}].key_stream", _is_name),
            extras=_extras(f, meta, i),
        ))
    links = []
    for i, meta in enumerate(f.get(h, "links", list, "links")):
        links.append(Link(
            stream=f.get(meta, "stream", str, f"links[{i}].stream", _is_name),
            source=f.get(meta, "source", str, f"links[{i}].source", _is_name),
            depth=f.get(meta, "depth", int, f"links[{i}].depth"),
            weights=f.array(f"links.{i}.weights"),
        ))
    f.finish()
    return AttentionTrace(layers, streams=streams, links=links, **_common(f))


def _from_version_1(f: _Fields) -> AttentionTrace:
    h = f.header
    layers = []
    for i, meta in enumerate(f.get(h, "layers", list, "layers", lambda v: len(v) > 0)):
        kind = f.get(meta, "kind", str, f"layers[{i}].kind", lambda v: v in ("self", "cross"))
        layers.append(LayerAttention(
            weights=f.array(f"layers.{i}.weights"),
            name=f.get(meta, "name", str, f"layers[{i}].name"),
            kind=kind,
            source_dtype=_source_dtype(f, meta, i),
            query_stream=DEFAULT_STREAM,
            key_stream=DEFAULT_STREAM if kind == "self" else MEMORY_STREAM,
            extras=_extras(f, meta, i),
        ))
    mask = f.array("mask")
    if mask.dtype != np.bool_:
        raise f.fail("the mask is not boolean")
    tokens = f.labels(f.get(h, "tokens", list, "tokens"), "tokens")
    causal = f.get(h, "causal", bool, "causal")
    f.finish()
    streams = [Stream(DEFAULT_STREAM, mask=mask, tokens=tokens, causal=causal)]
    if any(layer.key_stream == MEMORY_STREAM for layer in layers):
        streams.append(Stream(MEMORY_STREAM))
    return AttentionTrace(layers, streams=streams, **_common(f))
