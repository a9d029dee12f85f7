"""The worker side of a batch run: one loaded model per Dask worker, and the task that explains a batch.

The task does no file I/O in the output directory (workers need no shared filesystem): it returns each
example's explanation file as bytes, which the driver writes.
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._errors import AdapterError
from .._explanation import explain
from ..methods._registry import ALL, Method
from ..recording._adapter import load_model
from ..recording._capture import capture
from ..recording._registry import get_adapter
from ..trace import AttentionTrace
from ._inputs import Example
from ._settings import Settings
from ._store import example_metadata

#: The worker's reply when the model is an encoder-decoder and no input line has a target.
NO_TARGETS = "no-targets"


class ModelCache:
    """One worker's loaded model: ``get`` loads it on first use, and again only for another model."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple[str, str | None] | None = None
        self.value: tuple[Any, Any, Any] | None = None
        self.loads: dict[tuple[str, str | None], int] = {}

    def get(self, adapter_name: str, location: str | None, trust_remote_code: bool = False) -> tuple[Any, Any, Any]:
        """``(adapter, model, tokenizer)``, loaded by the adapter (``location`` None: the packaged MiniLM)."""
        key = (adapter_name, location)
        # _LOAD_LOCK: in-process workers (threads) must not import and load concurrently; frameworks' lazy
        # imports are not thread-safe, and two loads at once gain nothing.
        with self.lock, _LOAD_LOCK:
            if self.key != key or self.value is None:
                self.key, self.value = None, None  # free the previous model before loading another
                from .._models import packaged_model_dir

                adapter = get_adapter(adapter_name)
                model, tokenizer = load_model(
                    adapter, location if location is not None else packaged_model_dir(),
                    trust_remote_code=trust_remote_code,
                )
                self.key, self.value = key, (adapter, model, tokenizer)
                self.loads[key] = self.loads.get(key, 0) + 1
            return self.value


_LOAD_LOCK = threading.Lock()
# One capture at a time per process: capturing installs hooks on the model, and worker threads of one process
# share the adapter instance (and, with threads_per_worker > 1, the model). The methods run outside it.
_CAPTURE_LOCK = threading.Lock()
# Keyed by the dask Worker object: in-process workers (processes=False) each get their own cache, and a
# closed worker's model is freed with it. Outside a worker (a plain function call) one process-wide cache.
_CACHES: weakref.WeakKeyDictionary[Any, ModelCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()
_PROCESS_CACHE = ModelCache()


def worker_cache() -> tuple[ModelCache, str]:
    """This worker's model cache and its address (``pid:N`` outside a Dask worker)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not running inside a dask worker
        return _PROCESS_CACHE, f"pid:{os.getpid()}"
    with _CACHES_LOCK:
        cache = _CACHES.get(worker)
        if cache is None:
            cache = _CACHES[worker] = ModelCache()
    return cache, str(worker.address)


def explain_batch(
    examples: Sequence[Example], settings: Settings, methods: Sequence[Method], has_targets: bool
) -> dict[str, Any]:
    """The Dask task: explain ``examples`` and return, per example, its explanation file's bytes or an error.

    Args:
        methods: the registered methods of ``settings.methods``, resolved by the driver (so that a method
            registered there in-process reaches worker processes too).
        has_targets: whether any line of the run's input has a target.

    Returns:
        ``{"worker", "pid", "loads", "results": [{"id", "file" | "error"}...]}``; instead of results,
        ``"fatal"`` (the model cannot be loaded) or ``"refused": NO_TARGETS`` (an encoder-decoder model
        and an input without any target), which end the run.
    """
    cache, worker = worker_cache()
    reply: dict[str, Any] = {"worker": worker, "pid": os.getpid(), "results": []}
    try:
        adapter, model, tokenizer = cache.get(settings.adapter, settings.model, settings.trust_remote_code)
    except Exception as exc:  # a wrong model path, a missing framework: no example of the run can succeed
        reply["fatal"] = f"{type(exc).__name__}: {exc}"
        return reply
    reply["loads"] = cache.loads[(settings.adapter, settings.model)]
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if seq2seq and not has_targets:
        reply["refused"] = NO_TARGETS
        return reply
    results: dict[str, dict[str, Any]] = {}
    ready = []
    for example in examples:
        problem = _target_problem(example, seq2seq)
        if problem is None:
            ready.append(example)
        else:
            results[example.id] = {"id": example.id, "error": problem}
    digest = settings.digest()
    for example, (trace, error) in zip(ready, _capture_items(adapter, model, tokenizer, ready, settings)):
        result: dict[str, Any] = {"id": example.id}
        if trace is not None:  # (trace, None), or (None, error) when the capture failed
            try:
                result["file"] = _explanation_file(trace, example, settings, methods, digest)
            except Exception as exc:  # one example's failure (e.g. flow too large) must not stop the batch
                error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            result["error"] = error
        results[example.id] = result
    reply["results"] = [results[example.id] for example in examples]
    return reply


def _target_problem(example: Example, seq2seq: bool) -> str | None:
    if seq2seq and example.target is None:
        return (
            f"line {example.line} has no \"target\", and the model is an encoder-decoder whose decoder needs a "
            "text: add \"target\": \"...\" (the translation or summary whose tokens you want explained)"
        )
    if not seq2seq and example.target is not None:
        return (
            f"line {example.line} has a \"target\", but the model is not an encoder-decoder (there is no decoder "
            "to give it to): remove \"target\", or use an encoder-decoder model"
        )
    return None


def _capture_items(
    adapter: Any, model: Any, tokenizer: Any, examples: Sequence[Example], settings: Settings
) -> list[tuple[AttentionTrace | None, str | None]]:
    """Per example, its own trace cropped to its real tokens (every stream), or the error. A failing batch
    is retried one example at a time so that only the culprit fails."""
    if not examples:
        return []
    texts = [e.text for e in examples]
    targets = [e.target for e in examples] if examples[0].target is not None else None
    try:
        with _CAPTURE_LOCK:
            # targets only when there are some: an adapter's encode() written before targets existed still works
            extra = {} if targets is None else {"targets": targets}
            inputs = adapter.encode(tokenizer, texts, max_length=settings.max_length, **extra)
            trace = capture(model, adapter=adapter, tokens=tokenizer, **settings.capture_options(), **inputs)
        if trace.batch_size != len(texts):
            raise AdapterError(f"the adapter returned a batch of {trace.batch_size} for {len(texts)} texts")
        return [(trace.select(b, crop=True), None) for b in range(len(texts))]
    except Exception as exc:
        if len(examples) == 1:
            return [(None, f"{type(exc).__name__}: {exc}")]
        return [pair for e in examples for pair in _capture_items(adapter, model, tokenizer, [e], settings)]


def _explanation_file(
    trace: AttentionTrace, example: Example, settings: Settings, methods: Sequence[Method], digest: str
) -> bytes:
    """The bytes of the example's explanation file ([`Explanation.save`][attnflow.Explanation.save], every checksum included)."""
    trace = trace.replace(metadata={**trace.metadata, "batch": example_metadata(example, digest)})
    # "all": the methods this model serves; the others are in the explanation's skipped, with the reason
    explanation = explain(
        trace, ALL if settings.everything else list(methods),
        sources=None if settings.sources is None else list(settings.sources),
        options=settings.options, all_layers=settings.all_layers,
    )
    with tempfile.TemporaryDirectory(prefix="attnflow-batch-") as folder:
        path = Path(folder) / "example.safetensors"
        explanation.save(path)
        return path.read_bytes()
