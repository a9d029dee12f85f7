"""Saving and loading traces: safetensors arrays plus JSON metadata. No pickle anywhere."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import TraceFileError
from ._trace import AttentionTrace, LayerAttention

FORMAT = "attnflow.trace"
FORMAT_VERSION = 1

_file_mode: int | None = None


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 minus the umask, read once, in the main thread
    (``os.umask`` is process-wide, so reading it from a worker thread could race other file creations)."""
    global _file_mode
    if _file_mode is None:
        if threading.current_thread() is not threading.main_thread():
            return 0o644
        umask = os.umask(0o022)
        os.umask(umask)
        _file_mode = 0o666 & ~umask
    return _file_mode


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename onto ``path``: readers see the old file or the whole new one, never part.

    The temporary name is ``.NAME.PID.tmp`` beside ``path``; it is removed if ``write`` fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # safetensors creates files 0600; give them the usual mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"attnflow": json.dumps(header)}))


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
