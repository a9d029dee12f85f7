"""The Recorder: what adapters hand attention to, one forward pass at a time.

An adapter says a pass begins ([`Recorder.start_call`][attnflow.recording.Recorder.start_call]), hands over each attention layer as it runs
([`Recorder.record`][attnflow.recording.Recorder.record]), says what it learns about the token streams ([`Recorder.describe_stream`][attnflow.recording.Recorder.describe_stream],
[`Recorder.link`][attnflow.recording.Recorder.link]), and says the pass ended ([`Recorder.end_call`][attnflow.recording.Recorder.end_call]) or failed
([`Recorder.abort_call`][attnflow.recording.Recorder.abort_call]). The recorder buffers the pass, names repeated layers by one rule, labels
tokens, and builds one validated [`AttentionTrace`][attnflow.AttentionTrace] per pass. Users read [`Recorder.trace`][attnflow.recording.Recorder.trace] (the
last pass) or [`Recorder.traces`][attnflow.recording.Recorder.traces].
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._errors import AdapterError, OptionError, TraceError
from .._kinds import KINDS
from ..methods._registry import SKIPPED
from ..trace import AttentionTrace, LayerAttention, Link, Stream
from ..trace._arrays import adopt
from ..trace._stream import DEFAULT_STREAM, MEMORY_STREAM
from ._generation import GenerationStep, StepLayer
from ._generation import stitch as stitch_layers

_STREAM_FIELDS = ("mask", "input_ids", "tokens", "special", "causal", "grid")
#: Storage dtypes capture(dtype=...) takes.
STORAGE_DTYPES = ("float16", "float32", "bfloat16")

#: ``target`` when no gradient is asked for (``None`` means "each item's argmax").
NO_TARGET: Any = type("NoTarget", (), {"__repr__": lambda self: "NO_TARGET"})()
"""The ``target`` of a capture that asks for no gradient (``None`` means "each item's argmax")."""


@dataclasses.dataclass(frozen=True)
class CaptureRequest:
    """What a capture records beside the attention weights; adapters read it from ``recorder.request``.

    Attributes:
        target: the score whose gradient is recorded per layer as extra ``"attn_grad"``: an int (an index
            of the last axis of the model's logits), None (each item's argmax), a callable
            ``target(output) -> per-item scores``; `NO_TARGET` (the default) records no gradients.
        target_position: where along the sequence the logits are read (default: the classification token for
            classifiers, each item's last real token for decoders).
        values: record the value-side tensors norm-based methods need (value vectors, output projection,
            residual input, the norm's parameters and statistics).
        value_zeroing: compute value-zeroing scores per layer (re-runs each layer once per token).
        head_fusion: fuse each layer's heads as it is recorded (``"mean"``, ``"max"``, ``"min"``): the trace
            holds one ``(batch, 1, q, k)`` map per layer, ``L·n²`` values instead of ``L·H·n²``.
        dtype: store the weights as ``"float16"`` (half the memory), ``"float32"``, or ``"bfloat16"`` (rounded
            to bfloat16, kept as float32 since numpy has no bfloat16 arithmetic).
        generation: how a ``generate()`` call becomes one trace: ``"stitch"`` its cached steps, or
            ``"rerun"`` one teacher-forced forward pass over the finished sequences; None: stitch, where the
            adapter can (an explicit choice needs the adapter's ``"generation"`` capability).
        skipped: ``(method, reason)`` pairs of a ``methods="all"`` capture that this capture cannot serve;
            stored in every trace's metadata (``"skipped_methods"``).
    """

    target: Any = NO_TARGET
    target_position: int | None = None
    values: bool = False
    value_zeroing: bool = False
    generation: str | None = None
    head_fusion: str | None = None
    dtype: str | None = None
    skipped: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.generation not in (None, "stitch", "rerun"):
            raise OptionError(f"generation must be 'stitch' or 'rerun', got {self.generation!r}.")
        if self.head_fusion not in (None, "mean", "max", "min"):
            raise OptionError(f"head_fusion must be 'mean', 'max', 'min' or None, got {self.head_fusion!r}.")
        if self.dtype not in (None, *STORAGE_DTYPES):
            raise OptionError(f"dtype must be one of {list(STORAGE_DTYPES)} or None, got {self.dtype!r}.")
        if self.head_fusion and (self.gradients or self.values):
            raise OptionError(
                f"head_fusion={self.head_fusion!r} keeps one fused map per layer, but target= and values= serve "
                "methods that need every head (grad_rollout, norm, alti); capture without head_fusion for them."
            )

    @property
    def generation_mode(self) -> str:
        """How a ``generate()`` capture is recorded: the ``generation`` setting, default ``"stitch"``."""
        return self.generation or "stitch"

    @property
    def gradients(self) -> bool:
        """Whether the capture asks for gradients (a ``target`` was given)."""
        return self.target is not NO_TARGET

    def needs(self) -> set[str]:
        """The adapter capabilities this request needs (rows of the capture-kinds table, and ``"generation"``)."""
        needed = {"weights"}
        for kind in KINDS.values():
            if kind.keyword == "target":
                on = self.gradients
            else:
                on = kind.keyword is not None and bool(getattr(self, kind.keyword, False))
            if on:
                needed.add(kind.name)
        if self.generation is not None:
            needed.add("generation")
        return needed


@dataclasses.dataclass
class _Layer:
    name: str
    weights: np.ndarray
    kind: str | None
    source_dtype: str
    extras: dict[str, np.ndarray]
    query_stream: str | None
    key_stream: str | None
    repeat_prefix: str | None
    training: bool


class _Pass:
    def __init__(self) -> None:
        self.layers: list[_Layer] = []
        self.streams: dict[str | None, dict[str, Any]] = {}
        self.links: list[Link] = []
        self.metadata: dict[str, Any] = {}
        self.depth = 0
        self.implicit = False  # opened by a layer recorded outside any pass the adapter announced


class Recorder:
    """Collects attention while hooks are live; one [`AttentionTrace`][attnflow.AttentionTrace] per forward pass.

    Args:
        framework: the array library the model computes in (stored as ``trace.framework``).
        model_name: stored as ``trace.model_name``.
        tokens: token labels, or a tokenizer (anything with ``convert_ids_to_tokens``, as Hugging Face's; or
            with ``decode``, as gemma's and other SentencePiece tokenizers: each id labelled ``decode([id])``, or
            ``<id>`` where that is empty),
            or a dict from stream name to either: how token ids become labels.
        adapter: the adapter's name, stored in the trace's metadata.
    """

    def __init__(
        self, *, framework: str, model_name: str = "", tokens: Any = None, adapter: str = "",
        request: CaptureRequest | None = None,
    ):
        self.framework = framework
        self.request = request or CaptureRequest()
        self.model_name = model_name
        self.adapter = adapter
        self._labels = tokens
        self._traces: list[AttentionTrace] = []
        self._pass: _Pass | None = None
        self._generation: list[_Pass] | None = None  # the passes of the generate() call under way
        self._steps: list[GenerationStep] = []
        self._lock = threading.RLock()

    # -- adapter side -------------------------------------------------------------------------------
    def start_call(
        self, *, mask: Any = None, input_ids: Any = None, causal: bool | None = None,
        metadata: Mapping[str, Any] | None = None, streams: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Begin a forward pass. A call while a pass is open (the model calling itself) joins that pass.

        Args:
            mask: ``(batch, seq)`` real-token mask of the model's only stream (single-stream models).
            input_ids: ``(batch, seq)`` token ids of that stream.
            causal: the causal flag of that stream.
            metadata: JSON-like values stored in the trace's metadata.
            streams: per stream name, what is known of it already: ``mask``, ``input_ids``, ``tokens``
                (labels), ``special`` (``(batch, length)`` bool), ``causal``, ``grid`` (patch rows, columns).
        """
        with self._lock:
            if self._pass is not None and self._pass.implicit and self._generation is not None:
                self._finish_step(self._pass)  # e.g. generate() ran the encoder before the decoder's passes
                self._pass = None
            if self._pass is not None:
                self._pass.depth += 1
                return
            self._pass = _Pass()
            self._pass.depth = 1
            self._pass.metadata = dict(metadata or {})
            if mask is not None or input_ids is not None or causal is not None:
                self._describe(None, {"mask": mask, "input_ids": input_ids, "causal": causal}, overwrite=True)
            for name, info in (streams or {}).items():
                self._describe(name, dict(info), overwrite=True)

    def record(
        self, name: str, weights: np.ndarray, *, kind: str | None = None, source_dtype: str = "",
        extras: Mapping[str, np.ndarray] | None = None, query_stream: str | None = None,
        key_stream: str | None = None, repeat_prefix: str | None = None, training: bool = False,
    ) -> int:
        """Record one layer's ``(batch, heads, query, key)`` attention probabilities (a numpy array); returns
        the layer's index in the pass (for [`add_extras`][attnflow.recording.Recorder.add_extras]).

        Args:
            name: the module path; a path recorded several times in one pass (a shared module, a scanned
                layer) is numbered by layer: the index is inserted after ``repeat_prefix`` (the path of the
                repeated block, e.g. ``"layers"`` for ``"layers/attn"`` gives ``"layers/0/attn"``), or
                appended (``"shared.attn.0"``) when None.
            kind: ``"self"``/``"cross"``; needed only for cross layers of a model without named streams.
            source_dtype: the dtype the model computed in (``"bfloat16"`` for weights upcast to float32).
            extras: per-layer arrays to keep beside the weights.
            query_stream: the stream of the queries (None: the only stream).
            key_stream: the stream of the keys (None: the query stream, or the only stream).
            training: the module ran in training mode (dropout makes rows invalid: the error says eval()).
        """
        array, source_dtype = self._stored(np.asarray(weights), source_dtype)
        with self._lock:
            implicit = self._pass is None  # attention outside a pass the adapter saw begin: a pass of its own
            if implicit:
                self.start_call()
            current = assert_open(self._pass)
            if implicit:
                current.implicit = True
            current.layers.append(_Layer(
                name=name, weights=array, kind=kind, source_dtype=source_dtype or str(array.dtype),
                extras=dict(extras or {}), query_stream=query_stream, key_stream=key_stream,
                repeat_prefix=repeat_prefix, training=training,
            ))
            return len(current.layers) - 1

    def _stored(self, given: np.ndarray, source_dtype: str) -> tuple[np.ndarray, str]:
        """The weights as the request keeps them: heads fused, in the storage dtype (adapters may do both
        on the device first; doing them again here is then a no-op). An array made here is the trace's to keep
        (`adopt`): it is not copied again."""
        request, array = self.request, given
        if request.head_fusion and array.ndim == 4 and array.shape[1] > 1:
            fused = getattr(array.astype(np.float32, copy=False), request.head_fusion)(axis=1, keepdims=True)
            array = fused.astype(array.dtype, copy=False)
        if request.dtype == "bfloat16":
            if array.dtype.name != "bfloat16" and source_dtype != "bfloat16":
                import ml_dtypes  # a dependency of attnflow for exactly this

                array = array.astype(ml_dtypes.bfloat16)
            array, source_dtype = array.astype(np.float32), "bfloat16"
        elif request.dtype and array.dtype.name != request.dtype:
            array = array.astype(request.dtype)
        if array is not given and array.flags.owndata and array.flags.c_contiguous:
            adopt(array)
        return array, source_dtype

    def add_extras(self, index: int, **arrays: np.ndarray) -> None:
        """Add per-layer arrays to layer ``index`` of the open pass (what is known only after the forward,
        such as attention gradients); each has the batch (or 1, for what every item shares) as first axis."""
        with self._lock:
            current = assert_open(self._pass)
            current.layers[index].extras.update({k: np.asarray(v) for k, v in arrays.items()})

    @property
    def pass_layers(self) -> int:
        """How many layers the open pass has recorded so far (0 when none is open)."""
        return 0 if self._pass is None else len(self._pass.layers)

    def describe_stream(self, stream: str | None = None, *, overwrite: bool = False, **info: Any) -> None:
        """What the adapter learned about a stream during the pass (``mask``, ``input_ids``, ``tokens``,
        ``special``, ``causal``, ``grid``). Values already known are kept unless ``overwrite``."""
        unknown = sorted(set(info) - set(_STREAM_FIELDS))
        if unknown:
            raise TypeError(f"describe_stream() got unknown fields {unknown}; it takes {list(_STREAM_FIELDS)}.")
        with self._lock:
            if self._pass is None:
                return
            self._describe(stream, info, overwrite=overwrite)

    def link(self, stream: str, source: str, depth: int, weights: np.ndarray) -> None:
        """Fixed edges feeding ``stream``'s input tokens from ``source`` at ``depth`` (see [`Link`][attnflow.Link])."""
        with self._lock:
            if self._pass is not None:
                self._pass.links.append(Link(stream=stream, source=source, depth=depth, weights=np.asarray(weights)))

    def end_call(self) -> None:
        """Finish the forward pass: validate what was recorded and keep it as a trace."""
        with self._lock:
            current = self._pass
            if current is None:
                return
            current.depth -= 1
            if current.depth > 0:
                return
            self._pass = None
            if self._generation is not None:
                self._finish_step(current)
                return
            if not current.layers:
                raise AdapterError(
                    f"The forward pass ran, but adapter {self.adapter!r} recorded no attention. The model's "
                    "attention modules were not recognised or did not run; pass adapter=... or select the "
                    "attention modules with the adapter's modules= option."
                )
            self._traces.append(self._build(current))

    def abort_call(self) -> None:
        """The forward pass raised: forget it (nothing half-recorded becomes a trace)."""
        with self._lock:
            self._pass = None

    @property
    def in_call(self) -> bool:
        """Whether a forward pass is open."""
        return self._pass is not None

    # -- generation ---------------------------------------------------------------------------------
    def start_generation(self) -> None:
        """A ``generate()`` call begins: until [`end_generation`][attnflow.recording.Recorder.end_generation], each pass is a step to stitch, not a
        trace of its own (a one-query step of a cached decoder is not a valid trace)."""
        with self._lock:
            if self._pass is not None and self._pass.implicit:
                self._pass = None
            self._generation = []

    def end_generation(
        self, *, streams: Mapping[str | None, Mapping[str, Any]] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AttentionTrace:
        """Stitch the steps of the ``generate()`` call into one trace (kept in [`traces`][attnflow.recording.Recorder.traces]) and return it.

        Args:
            streams: per stream (None: the only stream) what the stitched trace should say of it:
                ``mask``, ``input_ids``, ``tokens``... over the stitched positions (e.g. the prompt's mask
                followed by the generated tokens up to each item's end of sequence, see
                [`attnflow.recording.generated_mask`][attnflow.recording.generated_mask]).
            metadata: stored in the trace's metadata (e.g. ``{"generation": {...}}``).
        """
        with self._lock:
            steps = self._generation
            if steps is None:
                raise AdapterError("attnflow internal error: end_generation() without start_generation().")
            if self._pass is not None and self._pass.implicit:
                self._finish_step(self._pass)
                self._pass = None
            self._generation = None
            steps = [step for step in steps if step.layers]
            if not steps:
                raise AdapterError(
                    f"generate() ran, but adapter {self.adapter!r} recorded no attention in any of its steps."
                )
            stitched = _Pass()
            stitched.layers = stitch_layers(steps)
            for step in steps:
                for name, info in step.streams.items():
                    known = stitched.streams.setdefault(name, {})
                    for key, value in info.items():
                        if key in ("causal", "grid", "special") and known.get(key) is None:
                            known[key] = value
                stitched.links = stitched.links or step.links
                for key, value in step.metadata.items():
                    stitched.metadata.setdefault(key, value)
            for name, given in (streams or {}).items():
                known = stitched.streams.setdefault(name, {})
                known.update({k: v for k, v in given.items() if v is not None})
                if name is None and any(layer.query_stream for layer in stitched.layers):
                    raise AdapterError("attnflow internal error: stream None given for a trace with named streams.")
            stitched.metadata.update(metadata or {})
            generation = stitched.metadata.get("generation")
            if isinstance(generation, Mapping) and generation.get("stream", DEFAULT_STREAM) is None:
                stitched.metadata["generation"] = {**generation, "stream": DEFAULT_STREAM}
            generation = stitched.metadata.get("generation")
            if isinstance(generation, Mapping) and generation.get("generated_ids") is not None:
                # the last generated token is read by no forward pass, so no stream labels it: label them here
                labeler = self._labels.get(generation.get("stream")) if isinstance(self._labels, Mapping) else self._labels
                to_labels = _id_labeler(labeler)
                if to_labels is not None and "generated_tokens" not in generation:
                    stitched.metadata["generation"] = {
                        **generation, "generated_tokens": [to_labels([int(t) for t in row])
                                                           for row in generation["generated_ids"]],
                    }
            trace = self._build(stitched)
            self._traces.append(trace)
            return trace

    def abort_generation(self) -> None:
        """The ``generate()`` call raised: forget its steps."""
        with self._lock:
            self._generation = None
            self._pass = None

    @property
    def generating(self) -> bool:
        """Whether a ``generate()`` call is being recorded."""
        return self._generation is not None

    @property
    def steps(self) -> list[GenerationStep]:
        """The raw steps of the last stitched ``generate()`` call: its prefill (and encoder) pass, then one pass
        per new token, each layer as the model computed it (one query against the cached keys)."""
        with self._lock:
            return list(self._steps)

    def _finish_step(self, current: _Pass) -> None:
        if self._generation is None:
            return
        self._generation.append(current)
        if len(self._generation) == 1:
            self._steps = []
        self._steps.append(GenerationStep(len(self._steps), tuple(
            StepLayer(layer.name, layer.weights, layer.kind, layer.query_stream, layer.key_stream)
            for layer in current.layers
        )))

    # -- user side ----------------------------------------------------------------------------------
    @property
    def traces(self) -> list[AttentionTrace]:
        """Every finished forward pass, oldest first."""
        with self._lock:
            if self._pass is not None and self._pass.layers and self._pass.depth <= 1 and self._generation is None:
                # a pass whose end the adapter could not see (e.g. the user stopped early)
                self._pass.depth = 1
                self.end_call()
            return list(self._traces)

    @property
    def trace(self) -> AttentionTrace:
        """The attention of the last forward pass run while attached."""
        traces = self.traces
        if not traces:
            raise AdapterError(
                "No forward pass ran while attached: call the model inside the `with attnflow.attach(model)` block."
            )
        return traces[-1]

    # -- building -----------------------------------------------------------------------------------
    def _describe(self, stream: str | None, info: dict[str, Any], *, overwrite: bool) -> None:
        known = assert_open(self._pass).streams.setdefault(stream, {})
        for key, value in info.items():
            if value is None:
                continue
            if overwrite or known.get(key) is None:
                known[key] = value

    def _build(self, current: _Pass) -> AttentionTrace:
        layers = _numbered(current.layers)
        named = any(layer.query_stream or layer.key_stream for layer in layers)
        metadata = {"adapter": self.adapter, **current.metadata}
        if self.request.head_fusion:
            metadata["head_fusion"] = self.request.head_fusion
        if self.request.skipped:
            metadata[SKIPPED] = dict(self.request.skipped)
        built = []
        for layer in layers:
            built.append(LayerAttention(
                weights=layer.weights, name=layer.name, kind=layer.kind, source_dtype=layer.source_dtype,
                extras=layer.extras, query_stream=layer.query_stream, key_stream=layer.key_stream,
            ))
        common = {"framework": self.framework, "model_name": self.model_name, "metadata": metadata}
        try:
            if not named and not current.links:
                info = current.streams.get(None) or current.streams.get(DEFAULT_STREAM) or {}
                length, batch = _query_length(layers, None), layers[0].weights.shape[0]
                fields = self._stream_fields(DEFAULT_STREAM, info, batch, length)
                memory = current.streams.get(MEMORY_STREAM)
                if memory is None:
                    return AttentionTrace(built, **fields, **common)  # type: ignore[arg-type]
                streams = [Stream(DEFAULT_STREAM, **fields)]
                return self._with_memory(built, streams, memory, layers, common)
            return self._multi_stream(current, built, layers, common)
        except TraceError as exc:
            if any(layer.training for layer in layers):
                raise AdapterError(
                    f"The captured attention is not a valid trace ({exc}) and the model is in training mode, where "
                    "attention dropout rescales the weights. Call model.eval() before capturing."
                ) from exc
            raise

    def _with_memory(self, built, streams, memory, layers, common) -> AttentionTrace:
        batch = layers[0].weights.shape[0]
        keys = next((layer.weights.shape[3] for layer in layers if layer.kind == "cross"), None)
        if keys is None:  # described, but no layer attends to it
            return AttentionTrace(built, streams=streams, **common)
        streams.append(Stream(MEMORY_STREAM, **self._stream_fields(MEMORY_STREAM, memory, batch, keys)))
        built = [
            dataclasses.replace(
                layer, query_stream=DEFAULT_STREAM,
                key_stream=MEMORY_STREAM if layer.kind == "cross" else DEFAULT_STREAM,
            )
            for layer in built
        ]
        return AttentionTrace(built, streams=streams, **common)

    def _multi_stream(self, current: _Pass, built, layers, common) -> AttentionTrace:
        names: list[str] = []
        for layer in layers:
            for name in (layer.query_stream, layer.key_stream):
                if name is not None and name not in names:
                    names.append(name)
        for link in current.links:
            for name in (link.source, link.stream):
                if name not in names:
                    names.append(name)
        if not names:
            names = [DEFAULT_STREAM]
        default = names[0] if len(names) == 1 else None
        resolved = []
        for layer in built:
            query = layer.query_stream or default
            key = layer.key_stream or (query if layer.kind != "cross" else None)
            resolved.append(dataclasses.replace(layer, query_stream=query, key_stream=key))
        batch = layers[0].weights.shape[0]
        streams = []
        for name in names:
            info = current.streams.get(name) or (current.streams.get(None, {}) if name == default else {})
            length = _stream_length(resolved, name)
            streams.append(Stream(name, **self._stream_fields(name, info, batch, length)))
        return AttentionTrace(resolved, streams=streams, links=current.links, **common)

    def _stream_fields(self, name: str, info: Mapping[str, Any], batch: int, length: int | None) -> dict[str, Any]:
        """Stream constructor arguments: the mask, labels and special tokens that fit the stream's shape."""
        shape = None if length is None else (batch, length)
        mask = _fitting(info.get("mask"), shape)
        if mask is None and info.get("mask") is not None:
            raise AdapterError(_unfitting_mask(name, np.shape(info["mask"]), shape, self.adapter))
        ids = _fitting(info.get("input_ids"), shape)
        tokens = info.get("tokens")
        labeler = self._labels.get(name) if isinstance(self._labels, Mapping) else self._labels
        if tokens is None:
            tokens = self._token_labels(labeler, ids, shape)
        special = _fitting(info.get("special"), shape)
        if special is None and ids is not None and labeler is not None and hasattr(labeler, "all_special_ids"):
            special = np.isin(ids, list(labeler.all_special_ids or ()))
        return {
            "mask": None if mask is None else mask.astype(bool), "tokens": tokens, "special": special,
            "causal": info.get("causal"), "grid": info.get("grid"),
        }

    @staticmethod
    def _token_labels(labels: Any, ids: np.ndarray | None, shape: tuple[int, int] | None) -> list[list[str]] | None:
        if labels is None:
            if ids is None:
                return None
            return [[str(int(t)) for t in row] for row in ids]
        to_labels = _id_labeler(labels)
        if to_labels is not None:
            if ids is None:
                if shape is None:
                    return None
                raise AdapterError(
                    "A tokenizer was given for labels, but the adapter saw no token ids of this stream's shape "
                    f"{shape}; pass labels with tokens=[...] instead."
                )
            return [to_labels([int(t) for t in row]) for row in ids]
        labels = list(labels)
        if labels and isinstance(labels[0], str):
            return [labels]
        return [list(row) for row in labels]


def _id_labeler(labels: Any) -> Callable[[list[int]], list[str]] | None:
    """How a tokenizer labels a row of token ids: Hugging Face's ``convert_ids_to_tokens``, else one
    ``decode([id])`` per token (gemma's and other SentencePiece tokenizers; tiktoken), ``<id>`` where that is
    empty (a whitespace or control token); None: not a tokenizer."""
    if hasattr(labels, "convert_ids_to_tokens"):
        return lambda row: [str(token) for token in labels.convert_ids_to_tokens(row)]
    if callable(getattr(labels, "decode", None)) and not isinstance(labels, (str, bytes, Mapping)):
        return lambda row: [str(labels.decode([token])) or f"<{token}>" for token in row]
    return None


def assert_open(current: _Pass | None) -> _Pass:
    """``current``, the open pass (guarded by the callers; a clear error if that ever changes)."""
    if current is None:
        raise AdapterError("attnflow internal error: no forward pass is open in the recorder.")
    return current


def _numbered(layers: list[_Layer]) -> list[_Layer]:
    """The one naming rule: a path recorded k > 1 times in one pass is numbered by layer, 0..k-1."""
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for layer in layers:
        if counts[layer.name] == 1:
            out.append(layer)
            continue
        k = seen.get(layer.name, 0)
        seen[layer.name] = k + 1
        out.append(dataclasses.replace(layer, name=numbered_name(layer.name, k, layer.repeat_prefix)))
    return out


def numbered_name(name: str, index: int, prefix: str | None = None) -> str:
    """``name`` with the layer index after ``prefix`` (``"layers/attn"``, 2, ``"layers"`` -> ``"layers/2/attn"``),
    or at the end (``"shared.attn"`` -> ``"shared.attn.2"``), in the name's own separator."""
    separator = "/" if "/" in name else "."
    if prefix and name.startswith(prefix) and (len(name) == len(prefix) or name[len(prefix)] in "./"):
        rest = name[len(prefix):]
        return f"{prefix}{separator}{index}{rest}"
    return f"{name}{separator}{index}"


def _fitting(value: Any, shape: tuple[int, int] | None) -> np.ndarray | None:
    """``value`` as a ``(batch, length)`` array when it fits ``shape`` (transposed if it is sequence-first)."""
    if value is None:
        return None
    array = np.asarray(value)
    if shape is None or array.shape == shape:
        return array if array.ndim == 2 else None
    if array.ndim == 2 and array.T.shape == shape:
        return array.T
    return None


def _unfitting_mask(name: str, given: tuple[int, ...], shape: tuple[int, int] | None, adapter: str) -> str:
    """Why a stream's mask cannot be used: attnflow never drops a mask and marks every position real."""
    where = "its positions" if shape is None else f"its {shape[1]} positions (batch {shape[0]})"
    return (
        f"The padding mask of stream {name!r} has shape {tuple(given)}, but the attention runs over {where}, so "
        "attnflow cannot tell which positions are padding (it never drops a mask and marks every position real). "
        "The model maps its inputs onto other positions (an audio model's convolutional feature extractor turns "
        f"samples into frames, a pooled or merged sequence...), and adapter {adapter!r} does not derive the mask "
        "the model uses for them. Capture the items one at a time without padding, or describe the stream's mask "
        "over its own positions (recorder.describe_stream(stream, mask=..., overwrite=True) in the adapter)."
    )


def _query_length(layers: Sequence[_Layer], stream: str | None) -> int:
    for layer in layers:
        if layer.kind != "cross" and layer.query_stream == stream:
            return int(layer.weights.shape[2])
    return int(layers[0].weights.shape[2])


def _stream_length(layers: Sequence[LayerAttention], name: str) -> int | None:
    for layer in layers:
        if layer.query_stream == name:
            return int(layer.weights.shape[2])
        if layer.key_stream == name:
            return int(layer.weights.shape[3])
    return None
