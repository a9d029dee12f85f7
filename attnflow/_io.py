"""Saving and loading traces: safetensors arrays plus JSON metadata. No pickle anywhere."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import TraceFileError
from ._trace import AttentionTrace, LayerAttention

FORMAT = "attnflow.trace"
FORMAT_VERSION = 1


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def save_trace(trace: AttentionTrace, path: str | os.PathLike[str]) -> None:
    """Write ``trace`` to ``path`` (safetensors). The write is atomic: a crash leaves no partial file."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {"mask": trace.mask}
    layers_meta: list[dict[str, Any]] = []
    for i, layer in enumerate(trace.layers):
        tensors[f"layers.{i}.weights"] = np.ascontiguousarray(layer.weights)
        for key, value in layer.extras.items():
            tensors[f"layers.{i}.extras.{key}"] = np.ascontiguousarray(value)
        layers_meta.append(
            {"name": layer.name, "kind": layer.kind, "source_dtype": layer.source_dtype, "extras": list(layer.extras)}
        )
    try:
        user_meta = json.dumps(trace.metadata)
    except TypeError as exc:
        raise TraceFileError(f"trace.metadata must be JSON-serialisable to be saved: {exc}") from exc
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layers": layers_meta,
        "tokens": trace.tokens,
        "causal": trace.causal,
        "framework": trace.framework,
        "model_name": trace.model_name,
        "metadata": json.loads(user_meta),
        "sha256": {key: _digest(value) for key, value in tensors.items()},
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"attnflow": json.dumps(header)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # a normal file, as open() would make it
    os.replace(tmp, path)


def load(path: str | os.PathLike[str]) -> AttentionTrace:
    """Read a trace written by :meth:`AttentionTrace.save`.

    Raises:
        TraceFileError: the file is missing, truncated, corrupted, or not an attnflow trace.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TraceFileError(f"No trace file at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="np") as handle:
            raw = (handle.metadata() or {}).get("attnflow")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated/garbled files
        raise TraceFileError(
            f"{str(path)!r} is not a readable safetensors file ({type(exc).__name__}: {exc}). It may be "
            "truncated or corrupted; save the trace again."
        ) from exc
    if raw is None:
        raise TraceFileError(f"{str(path)!r} is a safetensors file but not an attnflow trace (no 'attnflow' metadata).")
    try:
        header = json.loads(raw)
        if header.get("format") != FORMAT:
            raise ValueError(f"format is {header.get('format')!r}")
        if header.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"format version {header.get('version')} is not {FORMAT_VERSION}; upgrade attnflow to read it"
            )
        digests = header["sha256"]
        if set(digests) != set(tensors):
            raise ValueError(f"arrays {sorted(set(digests) ^ set(tensors))} are missing or unexpected")
        for key, value in tensors.items():
            if _digest(value) != digests[key]:
                raise ValueError(f"array {key!r} does not match its checksum")
        layers = [
            LayerAttention(
                weights=tensors[f"layers.{i}.weights"],
                name=meta["name"],
                kind=meta["kind"],
                source_dtype=meta["source_dtype"],
                extras={key: tensors[f"layers.{i}.extras.{key}"] for key in meta["extras"]},
            )
            for i, meta in enumerate(header["layers"])
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise TraceFileError(f"{str(path)!r} is a damaged attnflow trace: {exc}.") from exc
    return AttentionTrace(
        layers,
        mask=tensors["mask"],
        tokens=header["tokens"],
        causal=header["causal"],
        framework=header["framework"],
        model_name=header["model_name"],
        metadata=header["metadata"],
    )
