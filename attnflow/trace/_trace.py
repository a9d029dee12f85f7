"""The common format: AttentionTrace, what adapters produce and every method consumes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

import numpy as np

from .._errors import TraceError
from .._kinds import EXTRA_TOKEN_AXES as EXTRA_TOKEN_AXES
from .._kinds import SHARED_EXTRAS as _SHARED_EXTRAS
from ._arrays import frozen, is_int
from ._stream import DEFAULT_STREAM, MEMORY_STREAM, Link, Stream, check_name, complete_stream

#: How far a valid attention row may stray from summing to 1, by the dtype the model produced.
ROW_SUM_TOLERANCE = {"float16": 1e-2, "bfloat16": 2e-2, "float32": 1e-4, "float64": 1e-6}
_DEFAULT_ROW_TOL = 1e-4
KINDS = ("self", "cross")
#: How a trace's heads may have been fused at capture (``metadata["head_fusion"]``).
HEAD_FUSIONS = ("mean", "max", "min")
#: How a generate() call became the trace (``metadata["generation"]["mode"]``).
GENERATION_MODES = ("stitch", "rerun")
_WEIGHT_DTYPES = ("float16", "float32", "float64")
#: By item size, the bits of +inf of float16/32/64 read as an unsigned integer.
_INF_BITS = {2: 0x7C00, 4: 0x7F800000, 8: 0x7FF0000000000000}


@dataclasses.dataclass(frozen=True, eq=False)
class LayerAttention:
    """One attention layer's probabilities.

    Attributes:
        weights: ``(batch, heads, query, key)`` attention probabilities, as the model produced them
            (float16/float32/float64; bfloat16 is stored upcast to float32 with ``source_dtype="bfloat16"``).
        name: the module path in the model, e.g. ``"encoder.layer.3.attention.self"``.
        kind: ``"self"`` (queries and keys from the same stream) or ``"cross"``; in a trace it always
            agrees with the streams. When building, it may be left out.
        source_dtype: the dtype the model computed in (``"bfloat16"`` when the weights were upcast).
        extras: named per-layer arrays kept beside the weights (attention gradients, value vectors,
            output projections...), each with the batch as first axis; saved and loaded with the trace.
        query_stream: the stream the queries (rows) belong to.
        key_stream: the stream the keys (columns) belong to; the same as ``query_stream`` for self-attention.
    """

    weights: np.ndarray
    name: str
    kind: str | None = None
    source_dtype: str = ""
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    query_stream: str | None = None
    key_stream: str | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The weights' shape, ``(batch, heads, query, key)``."""
        return tuple(self.weights.shape)

    def __repr__(self) -> str:
        streams = "" if self.query_stream is None else (
            f", {self.query_stream}" if self.key_stream == self.query_stream else f", {self.query_stream}->{self.key_stream}")
        extras = "" if not self.extras else ", extras={" + ", ".join(
            f"{name}: {array_summary(value)}" for name, value in self.extras.items()) + "}"
        return f"LayerAttention({self.name!r}, {self.kind or '?'}{streams}, {array_summary(self.weights)}{extras})"


def layer_streams(layer: LayerAttention) -> tuple[str, str]:
    """``(query stream, key stream)`` of a layer of a trace, where both are always set."""
    if layer.query_stream is None or layer.key_stream is None:
        raise TraceError(f"Layer {layer.name!r} is not part of a trace yet; its streams are set once it is.")
    return layer.query_stream, layer.key_stream


class AttentionTrace:
    """Per-layer attention of one forward pass over one or more token streams.

    Build one with [`from_arrays`][attnflow.AttentionTrace.from_arrays] (no model needed) or get one from [`attnflow.capture`][attnflow.recording.capture].
    Construction validates everything and copies the arrays (read-only afterwards): a trace that exists
    is well-formed and cannot change. (A capture hands over, without a copy, the arrays nothing else can
    reach: its own conversions, and the model's attention tensors once the model has dropped them.)

    Attributes:
        layers: tuple of [`LayerAttention`][attnflow.LayerAttention], in the order the model ran them.
        streams: read-only mapping, in execution order, from stream name to [`Stream`][attnflow.Stream]. A
            single-stream trace has one stream, ``"tokens"``.
        links: fixed links between streams ([`Link`][attnflow.Link]), e.g. vision patches feeding image tokens.
        framework: ``"torch"``, ``"jax"``, ``"numpy"``...
        model_name: free text naming the model.
        metadata: read-only JSON-like mapping of anything else.

    On a single-stream trace, ``mask``, ``tokens``, ``causal``, ``special`` and ``seq_len`` describe that
    stream (as in attnflow 0.1); on a multi-stream trace they raise [`TraceError`][attnflow.TraceError]: use
    ``trace.streams[name]``.
    """

    __slots__ = ("_layers", "_streams", "_links", "_framework", "_model_name", "_metadata")

    def __init__(
        self,
        layers: Sequence[LayerAttention],
        *,
        streams: Mapping[str, Stream | Mapping[str, Any]] | Sequence[Stream] | None = None,
        links: Sequence[Link] = (),
        mask: np.ndarray | None = None,
        tokens: Sequence[Sequence[str]] | None = None,
        causal: bool | None = None,
        special: np.ndarray | None = None,
        grid: tuple[int, int] | None = None,
        framework: str = "numpy",
        model_name: str = "",
        metadata: Mapping[str, Any] | None = None,
        check_rows: bool = True,
    ):
        layers = _layer_list(layers)
        weights = [_checked_weights(index, layer) for index, layer in enumerate(layers)]
        if streams is None:
            declared = [Stream(DEFAULT_STREAM, mask=mask, tokens=tokens, causal=causal, special=special, grid=grid)]
            layers = _default_layer_streams(layers)
            if any(layer.key_stream == MEMORY_STREAM for layer in layers):
                declared.append(Stream(MEMORY_STREAM))
        else:
            given = {"mask": mask, "tokens": tokens, "causal": causal, "special": special, "grid": grid}
            stray = [key for key, value in given.items() if value is not None]
            if stray:
                raise TraceError(
                    f"With streams=, give {stray} inside each Stream (e.g. Stream('decoder', mask=..., "
                    "tokens=...)), not as trace arguments."
                )
            declared = _stream_list(streams)
            layers = _named_layer_streams(layers, declared)
        names = [s.name for s in declared]
        batch = int(weights[0].shape[0])
        lengths: dict[str, int] = {}
        for index, (layer, w) in enumerate(zip(layers, weights)):
            b, _, q, k = w.shape
            if b != batch:
                raise TraceError(
                    f"Layer {index} ({layer.name!r}) has batch size {b}, but layer 0 has {batch}; every layer of a "
                    "trace must come from the same forward pass."
                )
            for stream_name, size, axis in ((layer.query_stream, q, "query"), (layer.key_stream, k, "key")):
                if stream_name not in names:
                    raise TraceError(
                        f"Layer {index} ({layer.name!r}) names {axis} stream {stream_name!r}, but the trace's streams "
                        f"are {names}."
                    )
                known = lengths.setdefault(stream_name, size)
                if known != size:
                    raise TraceError(_length_message(index, layer, axis, stream_name, size, known, len(declared) == 1))
        links = _link_list(links)
        order = _execution_order(layers, links, names)
        by_name = {s.name: s for s in declared}
        completed: dict[str, Stream] = {}
        for name in order:
            stream = by_name[name]
            length = _stream_length(stream, lengths.get(name), batch)
            if stream.causal is None:
                mask_for_detection = complete_stream(stream, batch, length, False)._completed()
                detected = _detect_causal(name, layers, weights, mask_for_detection)
            else:
                detected = bool(stream.causal)
            completed[name] = complete_stream(stream, batch, length, detected)
        resolved = []
        for layer, w in zip(layers, weights):
            extras = {key: frozen(value) for key, value in layer.extras.items()}
            resolved.append(dataclasses.replace(
                layer, weights=frozen(w), kind="self" if layer.query_stream == layer.key_stream else "cross",
                extras=MappingProxyType(extras),
            ))
        self._layers: tuple[LayerAttention, ...] = tuple(resolved)
        self._streams: Mapping[str, Stream] = MappingProxyType(completed)
        self._links: tuple[Link, ...] = tuple(_checked_link(i, link, completed, self._layers) for i, link in enumerate(links))
        if not isinstance(framework, str) or not isinstance(model_name, str):
            raise TraceError(f"framework and model_name must be strings; got {framework!r} and {model_name!r}.")
        self._framework = framework
        self._model_name = model_name
        self._metadata = freeze_metadata(metadata)
        fusion = self._metadata.get("head_fusion")
        if fusion is not None and fusion not in HEAD_FUSIONS:
            raise TraceError(f"metadata['head_fusion'] must be one of {HEAD_FUSIONS} (or absent), got {fusion!r}.")
        _check_generation(self._metadata.get("generation"), completed, batch)
        # heads fused by max or min at capture: rows need not sum to 1 (rollout renormalises them, as it does
        # when it fuses heads itself); they still put nothing on padding or, if causal, on later tokens
        sums = fusion not in ("max", "min")
        forbidden: dict[Any, np.ndarray] = {}
        for index, layer in enumerate(self._layers):
            _check_extras(index, layer)
            if check_rows:
                query, key = layer_streams(layer)
                _check_rows(index, layer, completed[query]._completed(), completed[key]._completed(),
                            causal=query == key and bool(completed[query].causal), sums=sums, forbidden=forbidden)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        weights: Sequence[np.ndarray] | np.ndarray,
        *,
        tokens: Sequence[Sequence[str]] | Sequence[str] | None = None,
        mask: np.ndarray | None = None,
        causal: bool | None = None,
        special: np.ndarray | None = None,
        grid: tuple[int, int] | None = None,
        names: Sequence[str] | None = None,
        kinds: Sequence[str] | None = None,
        streams: Mapping[str, Stream | Mapping[str, Any]] | Sequence[Stream] | None = None,
        layer_streams: Sequence[str | tuple[str, str]] | None = None,
        links: Sequence[Link] = (),
        source_dtype: str | None = None,
        framework: str = "numpy",
        model_name: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> AttentionTrace:
        """Build a trace from per-layer arrays, no model needed.

        Args:
            weights: a sequence of ``(batch, heads, query, key)`` arrays, one per layer, or one stacked
                ``(layers, batch, heads, query, key)`` array. ``(heads, query, key)`` arrays are taken as
                batch 1. bfloat16 arrays (``ml_dtypes``) are stored as float32 with ``source_dtype="bfloat16"``.
            tokens: the single stream's labels (per item, or one list for batch 1). With ``streams=``, give
                this and the next four per stream instead.
            mask: ``(batch, seq)`` real-token mask (default all real).
            causal: causal flag (default: detected).
            special: ``(batch, seq)`` special-token mask.
            grid: the patch grid ``(rows, columns)`` of an image stream.
            names: module path of each layer; default ``"layer.{i}"``.
            kinds: ``"self"``/``"cross"`` per layer, for a trace without ``streams``: cross layers then
                attend to a second stream, ``"memory"`` (default all ``"self"``).
            streams: the token streams, as [`Stream`][attnflow.Stream] objects or a mapping from name to a Stream or to
                its keyword arguments (``{"encoder": {"tokens": [...], "mask": m}, "decoder": {}}``).
            layer_streams: per layer, the query stream name (self-attention) or a ``(query, key)`` pair
                (cross-attention), e.g. ``["encoder", "decoder", ("decoder", "encoder")]``.
            links: fixed links between streams ([`Link`][attnflow.Link]).
            source_dtype: the dtype the model computed in, when the arrays were converted from it (e.g.
                ``"bfloat16"`` for weights upcast to float32, which widens the row-sum tolerance).

        Returns:
            A validated [`AttentionTrace`][attnflow.AttentionTrace].

        Examples:
            Two layers, one head, two tokens (a causal pattern, so the trace is marked causal):

            >>> import numpy as np
            >>> import attnflow
            >>> w = np.array([[[[1.0, 0.0], [0.5, 0.5]]]])  # (batch, heads, query, key)
            >>> trace = attnflow.AttentionTrace.from_arrays([w, w], tokens=["a", "b"])
            >>> trace
            AttentionTrace(layers=2, batch=1, heads=1, seq=2, causal=True, framework='numpy', model='')
            >>> trace.tokens
            [['a', 'b']]
        """
        if causal is not None and not isinstance(causal, (bool, np.bool_)):
            raise TraceError(f"causal must be True, False or None (detect it), got {causal!r}.")
        arrays = _as_layer_list(weights)
        for label, values in (("names", names), ("kinds", kinds), ("layer_streams", layer_streams)):
            if values is not None and (isinstance(values, (str, bytes)) or not hasattr(values, "__len__")):
                raise TraceError(f"{label} must be a list with one entry per layer ({len(arrays)}), got {values!r}.")
            if values is not None and len(values) != len(arrays):
                count = f"{len(values)} {label}"
                raise TraceError(f"Got {count} for {len(arrays)} layers; give one entry of {label} per layer.")
        if source_dtype is not None and source_dtype not in (*ROW_SUM_TOLERANCE,):
            raise TraceError(f"source_dtype must be one of {sorted(ROW_SUM_TOLERANCE)}, got {source_dtype!r}.")
        layers = []
        for i, array in enumerate(arrays):
            query = key = None
            if layer_streams is not None:
                entry = layer_streams[i]
                if isinstance(entry, str):
                    query = key = entry
                elif isinstance(entry, (tuple, list)) and len(entry) == 2:
                    query, key = entry
                else:
                    raise TraceError(
                        f"layer_streams[{i}] must be a stream name or a (query, key) pair of names, got {entry!r}."
                    )
            layers.append(LayerAttention(
                weights=array,
                name=names[i] if names is not None else f"layer.{i}",
                kind=kinds[i] if kinds is not None else None,
                source_dtype=source_dtype or "",
                query_stream=query,
                key_stream=key,
            ))
        if tokens is not None and not isinstance(tokens, (str, bytes)) and isinstance(tokens, Iterable):
            tokens = list(tokens)
            if tokens and isinstance(tokens[0], str):
                tokens = [cast("list[str]", tokens)]  # one sequence of labels: batch of one
        return cls(
            layers, streams=streams, links=links, mask=mask, tokens=tokens, causal=causal, special=special,
            grid=grid, framework=framework, model_name=model_name, metadata=metadata,
        )

    def replace(self, **changes: Any) -> AttentionTrace:
        """A new trace with some constructor arguments changed, e.g. ``trace.replace(metadata={...})``."""
        allowed = {"layers", "streams", "links", "framework", "model_name", "metadata"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise TraceError(f"replace() takes {sorted(allowed)}; got {unknown}.")
        arguments: dict[str, Any] = {
            "layers": self._layers, "streams": list(self._streams.values()), "links": self._links,
            "framework": self._framework, "model_name": self._model_name, "metadata": self._metadata,
        }
        arguments.update(changes)
        layers = arguments.pop("layers")
        # the rows' tolerance depends on the head fusion the metadata records: a change there re-checks them
        fusion_changed = "metadata" in changes and (changes["metadata"] or {}).get("head_fusion") != \
            self._metadata.get("head_fusion")
        return AttentionTrace(layers, check_rows="layers" in changes or "streams" in changes or fusion_changed,
                              **arguments)

    # -- what it holds ------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[LayerAttention, ...]:
        """The captured layers in model order, one [`LayerAttention`][attnflow.LayerAttention] each."""
        return self._layers

    @property
    def streams(self) -> Mapping[str, Stream]:
        """The token streams by name (``{"tokens": ...}`` for a single-stream trace), as [`Stream`][attnflow.Stream] objects."""
        return self._streams

    @property
    def links(self) -> tuple[Link, ...]:
        """The fixed links between streams ([`Link`][attnflow.Link]); empty for most models."""
        return self._links

    @property
    def framework(self) -> str:
        """The framework the trace was captured from (``"torch"``, ``"jax"``, ``"numpy"`` for hand-made traces)."""
        return self._framework

    @property
    def model_name(self) -> str:
        """The captured model's name or path (``""`` when unknown)."""
        return self._model_name

    @property
    def metadata(self) -> Mapping[str, Any]:
        """Free-form JSON-able facts about the capture (adapter, settings, skipped methods, ...), read-only."""
        return self._metadata

    def __setattr__(self, name: str, value: Any) -> None:
        if name in AttentionTrace.__slots__ and not hasattr(self, "_metadata"):
            object.__setattr__(self, name, value)
            return
        raise AttributeError(
            f"An AttentionTrace cannot be changed (setting {name!r}); make a new one with trace.replace(...)."
        )

    # -- single-stream view (attnflow 0.1 API) ------------------------------------------------------
    def _single(self, attribute: str) -> Stream:
        if len(self._streams) != 1:
            raise TraceError(
                f"trace.{attribute} exists only for single-stream traces; this trace has the streams "
                f"{list(self._streams)}. Read each from trace.streams[name] (e.g. "
                f"trace.streams[{next(iter(self._streams))!r}].mask), and pass stream= to rollout, flow and raw."
            )
        return next(iter(self._streams.values()))

    @property
    def mask(self) -> np.ndarray:
        """``(batch, seq)`` bool, True where the token is real (single-stream traces)."""
        return self._single("mask").mask  # type: ignore[return-value]

    @property
    def tokens(self) -> list[list[str]]:
        """Per batch item, the token labels (single-stream traces)."""
        return [list(item) for item in (self._single("tokens").tokens or ())]

    @property
    def causal(self) -> bool:
        """Whether every query attends only to itself and earlier keys (single-stream traces)."""
        return bool(self._single("causal").causal)

    @property
    def special(self) -> np.ndarray:
        """``(batch, seq)`` bool, True on special tokens (single-stream traces)."""
        return self._single("special").special  # type: ignore[return-value]

    @property
    def seq_len(self) -> int:
        """Positions per batch item, padding included (single-stream traces)."""
        return self._single("seq_len").length

    def lengths(self, stream: str | None = None) -> np.ndarray:
        """``(batch,)`` number of real tokens per batch item (of ``stream``; default the only stream)."""
        return self.stream(stream, "lengths()").lengths()

    def valid_index(self, batch_index: int, stream: str | None = None) -> np.ndarray:
        """Positions of the real tokens of one batch item, ``(n_valid,)`` int."""
        return self.stream(stream, "valid_index()").valid_index(batch_index)

    def stream(self, name: str | None = None, what: str = "stream()") -> Stream:
        """The stream called ``name``; with None, the only stream of a single-stream trace."""
        if name is None:
            return self._single(what)
        if name not in self._streams:
            raise TraceError(f"The trace has no stream {name!r}; its streams are {list(self._streams)}.")
        return self._streams[name]

    # -- shape --------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """The number of captured layers."""
        return len(self._layers)

    @property
    def batch_size(self) -> int:
        """The number of batch items."""
        return int(self._layers[0].weights.shape[0])

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Heads per layer."""
        return tuple(int(layer.weights.shape[1]) for layer in self._layers)

    @property
    def layer_names(self) -> list[str]:
        """The module path of each layer, in model order."""
        return [layer.name for layer in self._layers]

    def self_layers(self) -> list[LayerAttention]:
        """The self-attention layers, in model order."""
        return [layer for layer in self._layers if layer.kind == "self"]

    def stream_layers(self, stream: str) -> list[int]:
        """Indices of the layers whose queries are ``stream``'s tokens, in execution order."""
        self.stream(stream)
        return [i for i, layer in enumerate(self._layers) if layer.query_stream == stream]

    def inputs_of(self, stream: str) -> list[str]:
        """The streams whose input tokens ``stream``'s output draws on (through cross layers and links),
        itself included, in execution order."""
        self.stream(stream)
        found = {stream}
        changed = True
        while changed:
            changed = False
            for layer in self._layers:
                if layer.query_stream in found and layer.key_stream not in found:
                    found.add(layer.key_stream)  # type: ignore[arg-type]
                    changed = True
            for link in self._links:
                if link.stream in found and link.source not in found:
                    found.add(link.source)
                    changed = True
        return [name for name in self._streams if name in found]

    def input_streams(self, stream: str) -> list[str]:
        """The streams whose input tokens ``stream``'s output draws on: [`inputs_of`][attnflow.AttentionTrace.inputs_of], less the streams
        whose every real token is fed by a link (e.g. a later Swin stage), which have no inputs of their own."""
        fed: dict[str, np.ndarray] = {}
        for link in self._links:
            covered = link.weights.sum(axis=-1) > 0
            fed[link.stream] = fed.get(link.stream, np.zeros_like(covered)) | covered
        return [
            name for name in self.inputs_of(stream)
            if name not in fed or (self._streams[name].mask & ~fed[name]).any()
        ]

    def default_stream(self) -> str:
        """The stream rollout and flow explain by default: the one no other stream draws on (the decoder of
        an encoder-decoder, the language model of a LLaVA-style model, the only stream of a single-stream
        trace). Raises [`TraceError`][attnflow.TraceError] where several qualify (e.g. CLIP's two towers)."""
        drawn = {layer.key_stream for layer in self._layers if layer.kind == "cross"}
        drawn |= {link.source for link in self._links if not self._own_keys(link)}
        candidates = [name for name in self._streams if name not in drawn]
        if len(candidates) != 1:
            raise TraceError(
                f"This trace has the streams {list(self._streams)} and {'none' if not candidates else 'several'} of "
                f"them is the output ({candidates}); say which one to explain with stream=, e.g. "
                f"stream={(candidates or list(self._streams))[0]!r}."
            )
        return candidates[0]

    def _own_keys(self, link: Link) -> bool:
        """Whether ``link`` feeds keys that only its own source attends to (SegFormer's spatial reduction pools a
        stage's patches into keys for that stage's queries): such a source is not drawn on by another stream."""
        readers = {layer.query_stream for layer in self._layers if layer.key_stream == link.stream}
        return readers == {link.source} and all(layer.query_stream != link.stream for layer in self._layers)

    def stack(self, dtype: Any = np.float64) -> np.ndarray:
        """Self-attention weights of a single-stream trace: ``(layers, batch, heads, seq, seq)``; needs equal
        head counts."""
        self._single("stack()")
        layers = self.self_layers()
        heads = {layer.weights.shape[1] for layer in layers}
        if len(heads) > 1:
            raise TraceError(
                f"Layers have different head counts {sorted(heads)}; fuse heads per layer instead of stacking."
            )
        return np.stack([np.asarray(layer.weights, dtype=dtype) for layer in layers])

    def select(self, batch_index: int, *, crop: bool = False) -> AttentionTrace:
        """A trace of one batch item (batch size 1), same layers, streams and metadata.

        With ``crop=True`` every stream keeps only the item's real tokens (what capturing that item alone
        gives); per-layer extras are cropped along their token axes where attnflow knows them
        (`EXTRA_TOKEN_AXES`), kept whole where shared by the batch, and left out otherwise.
        """
        if not is_int(batch_index) or not -self.batch_size <= batch_index < self.batch_size:
            raise TraceError(f"batch_index {batch_index!r} is out of range for a batch of {self.batch_size}.")
        b = int(batch_index) % self.batch_size
        if not isinstance(crop, (bool, np.bool_)):
            raise TraceError(f"crop must be True or False, got {crop!r}.")
        if crop:
            return self._cropped(b)
        keep = slice(b, b + 1)
        layers = [
            dataclasses.replace(layer, weights=layer.weights[keep], extras={
                k: v if v.shape[0] == 1 and self.batch_size > 1 else v[keep] for k, v in layer.extras.items()
            })
            for layer in self._layers
        ]
        streams = [
            dataclasses.replace(s, mask=s.mask[keep], special=s.special[keep], tokens=[s.tokens[b]])  # type: ignore[index]
            for s in self._streams.values()
        ]
        links = [dataclasses.replace(link, weights=link.weights[keep]) for link in self._links]
        return AttentionTrace(
            layers, streams=streams, links=links, framework=self._framework, model_name=self._model_name,
            metadata=self._item_metadata(b), check_rows=False,
        )

    def _cropped(self, b: int) -> AttentionTrace:
        valid = {name: s.valid_index(b) for name, s in self._streams.items()}
        layers = []
        for layer in self._layers:
            axes = {"q": valid[layer.query_stream], "k": valid[layer.key_stream]}  # type: ignore[index]
            extras = {}
            for key, value in layer.extras.items():
                if value.shape[0] == 1 and self.batch_size > 1 or key in _SHARED_EXTRAS:
                    extras[key] = value
                elif key in EXTRA_TOKEN_AXES:
                    item = value[b]
                    for axis, which in enumerate(EXTRA_TOKEN_AXES[key]):
                        if which:
                            item = np.take(item, axes[which], axis=axis)
                    extras[key] = item[None]
            layers.append(dataclasses.replace(
                layer, extras=extras, weights=layer.weights[b][:, axes["q"]][:, :, axes["k"]][None],
            ))
        streams = []
        for name, s in self._streams.items():
            keep = valid[name]
            streams.append(Stream(
                name, tokens=[[s.tokens[b][p] for p in keep]], special=s.special[b][keep][None],  # type: ignore[index]
                causal=s.causal, grid=s.grid if keep.size == s.length else None,
            ))
        links = [
            dataclasses.replace(link, weights=link.weights[b][valid[link.stream]][:, valid[link.source]][None])
            for link in self._links
        ]
        generation = self._metadata.get("generation")
        first = None
        if isinstance(generation, Mapping) and generation.get("stream") in valid:
            # positions move when padding goes: the first generated token is after the item's real prompt
            first = int(np.sum(valid[generation["stream"]] < int(generation["first_generated"])))
        return AttentionTrace(
            layers, streams=streams, links=links, framework=self._framework, model_name=self._model_name,
            metadata=self._item_metadata(b, first), check_rows=False,
        )

    def _item_metadata(self, b: int, first_generated: int | None = None) -> Mapping[str, Any]:
        """The metadata of item ``b`` alone: a generation's per-item entries are cut to the item's."""
        generation = self._metadata.get("generation")
        if not isinstance(generation, Mapping):
            return self._metadata
        item = thaw_metadata(generation)
        for key in ("generated_ids", "lengths"):
            if isinstance(item.get(key), list) and len(item[key]) == self.batch_size:
                item[key] = [item[key][b]]
        if first_generated is not None:
            item["first_generated"] = first_generated
        return {**thaw_metadata(self._metadata), "generation": item}

    # -- files --------------------------------------------------------------------------------------
    def save(self, path: Any) -> None:
        """Write the trace to ``path`` as safetensors (arrays) with a checksummed JSON header; no pickle."""
        from ._file import save_trace

        save_trace(self, path)

    def _repr_html_(self) -> str:
        """Jupyter: the streams and layers as a table, with a heat strip per layer."""
        return trace_html(self)

    def __repr__(self) -> str:
        heads = sorted(set(self.num_heads))
        head_text = heads[0] if len(heads) == 1 else heads
        if len(self._streams) == 1:
            stream = next(iter(self._streams.values()))
            tokens = f"seq={stream.length}, causal={stream.causal}"
        else:
            tokens = "streams={" + ", ".join(f"{n!r}: {s.length}" for n, s in self._streams.items()) + "}"
        return (
            f"AttentionTrace(layers={self.num_layers}, batch={self.batch_size}, heads={head_text}, {tokens}, "
            f"framework={self._framework!r}, model={self._model_name!r})"
        )


# -- metadata ------------------------------------------------------------------------------------------


def freeze_metadata(metadata: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only deep copy of JSON-like metadata (mappings with string keys, lists, str, numbers, bools,
    None); anything else is a [`TraceError`][attnflow.TraceError]."""
    if metadata is None:
        return MappingProxyType({})
    if not isinstance(metadata, Mapping):
        raise TraceError(f"metadata must be a mapping (a dict of JSON values), got {type(metadata).__name__}.")
    return _freeze(metadata, "metadata", 0)


def _freeze(value: Any, where: str, depth: int) -> Any:
    if depth > 32:
        raise TraceError(f"{where} is nested too deeply (more than 32 levels).")
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TraceError(f"{where} keys must be strings, got {key!r}.")
            out[key] = _freeze(item, f"{where}[{key!r}]", depth + 1)
        return MappingProxyType(out)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    raise TraceError(
        f"{where} is a {type(value).__name__}; metadata holds JSON values only (dicts with string keys, lists, "
        "strings, numbers, booleans, None)."
    )


def thaw_metadata(value: Any) -> Any:
    """Plain dicts and lists of frozen metadata, for JSON."""
    if isinstance(value, Mapping):
        return {key: thaw_metadata(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [thaw_metadata(item) for item in value]
    return value


# -- construction helpers ------------------------------------------------------------------------------
def _layer_list(layers: Any) -> list[LayerAttention]:
    if isinstance(layers, (str, bytes, np.ndarray)) or not isinstance(layers, Iterable):
        raise TraceError(
            f"layers must be a sequence of LayerAttention; got {type(layers).__name__}. To build a trace from "
            "arrays, use AttentionTrace.from_arrays(weights)."
        )
    layers = list(layers)
    if not layers:
        raise TraceError(
            "The trace has no attention layers. If it came from capture()/attach(), the forward pass ran no "
            "attention module the adapter recognised; check the adapter's module selection."
        )
    for index, layer in enumerate(layers):
        if not isinstance(layer, LayerAttention):
            raise TraceError(f"Layer {index} is a {type(layer).__name__}, not an attnflow.LayerAttention.")
        if not isinstance(layer.name, str):
            raise TraceError(f"Layer {index}: name must be a string, got {layer.name!r}.")
        if layer.kind is not None and layer.kind not in KINDS:
            raise TraceError(f"Layer {index} ({layer.name!r}): kind must be one of {KINDS}, got {layer.kind!r}.")
        if not isinstance(layer.source_dtype, str):
            raise TraceError(f"Layer {index} ({layer.name!r}): source_dtype must be a string, got {layer.source_dtype!r}.")
        if not isinstance(layer.extras, Mapping):
            raise TraceError(f"Layer {index} ({layer.name!r}): extras must be a mapping of name to array.")
    return layers


def _checked_weights(index: int, layer: LayerAttention) -> np.ndarray:
    """The layer's weights as a float16/32/64 array, after the value checks (bfloat16 upcast to float32)."""
    where = f"Layer {index} ({layer.name!r})"
    w = layer.weights
    if not isinstance(w, np.ndarray):
        raise TraceError(f"{where}: weights must be a numpy array, got {type(w).__name__}.")
    if w.ndim != 4:
        raise TraceError(f"{where}: weights must have 4 axes (batch, heads, query, key); got shape {w.shape}.")
    if min(w.shape) == 0:
        raise TraceError(f"{where}: weights have an empty axis, shape {w.shape}.")
    if w.dtype.name == "bfloat16":
        w = w.astype(np.float32)
    elif not np.issubdtype(w.dtype, np.floating):
        raise TraceError(
            f"{where}: weights must be floating point, got {w.dtype}. Pass attention probabilities, not scores."
        )
    elif w.dtype.name not in _WEIGHT_DTYPES:
        raise TraceError(f"{where}: weights of dtype {w.dtype} cannot be stored; pass float16, float32 or float64.")
    # one pass, without a temporary of the weights' size, over the values' bits read as unsigned integers: a
    # non-negative finite value (sign bit clear, exponent not all ones) is below the bits of +inf, and NaN, ±inf
    # and negative values (and -0.0, which is allowed) are not. The values are looked at only when one is not.
    if w.view(w.dtype.str.replace("f", "u")).max() < _INF_BITS[w.dtype.itemsize]:
        return w
    finite = np.isfinite(w)
    if not finite.all():
        pos = tuple(int(x) for x in np.argwhere(~finite)[0])
        raise TraceError(
            f"{where}: weights contain NaN or Inf (first at batch, head, query, key = {pos}). "
            "The model's forward pass overflowed or a mask row was fully masked."
        )
    if (w < 0).any():
        pos = tuple(int(x) for x in np.argwhere(w < 0)[0])
        raise TraceError(
            f"{where}: weights contain negative values (first {float(w[pos]):.3g} at batch, head, query, "
            f"key = {pos}). Attention probabilities are softmax outputs; pass them, not raw scores."
        )
    return w


def _source_dtype(layer: LayerAttention) -> str:
    return layer.source_dtype or layer.weights.dtype.name  # the name: "float32" for big-endian ">f4" too


def _default_layer_streams(layers: list[LayerAttention]) -> list[LayerAttention]:
    """Without streams=: every layer's queries are the one stream; cross layers' keys are ``"memory"``."""
    out = []
    for index, layer in enumerate(layers):
        query = layer.query_stream or DEFAULT_STREAM
        key = layer.key_stream
        if key is None:
            key = MEMORY_STREAM if layer.kind == "cross" else query
        _check_kind(index, layer, query, key)
        for stream in (query, key):
            if stream not in (DEFAULT_STREAM, MEMORY_STREAM):
                raise TraceError(
                    f"Layer {index} ({layer.name!r}) names stream {stream!r}; declare the streams with streams=[...]."
                )
        out.append(dataclasses.replace(layer, query_stream=query, key_stream=key, source_dtype=_source_dtype(layer)))
    return out


def _check_generation(info: Any, streams: Mapping[str, Stream], batch: int) -> None:
    """``metadata["generation"]``, where present, as the methods read it: the generated stream, the position
    of the first generated token in it, the mode, per-item lengths."""
    if info is None:
        return
    where = "metadata['generation']"
    if not isinstance(info, Mapping):
        raise TraceError(f"{where} must be a mapping, got {type(info).__name__}.")
    if info.get("mode", "stitch") not in GENERATION_MODES:
        raise TraceError(f"{where}['mode'] must be one of {GENERATION_MODES}, got {info.get('mode')!r}.")
    stream = info.get("stream")
    if not isinstance(stream, str) or stream not in streams:
        raise TraceError(f"{where}['stream'] must name a stream of the trace {list(streams)}, got {stream!r}.")
    first, length = info.get("first_generated"), streams[stream].length
    if not is_int(first) or not 0 <= int(first) <= length:  # type: ignore[arg-type]
        raise TraceError(f"{where}['first_generated'] must be a position in [0, {length}], got {first!r}.")
    lengths = info.get("lengths")
    if lengths is not None and not (
        isinstance(lengths, (list, tuple)) and len(lengths) == batch and all(is_int(n) and n >= 0 for n in lengths)
    ):
        raise TraceError(f"{where}['lengths'] must hold one non-negative int per item ({batch}), got {lengths!r}.")


def _check_kind(index: int, layer: LayerAttention, query: Any, key: Any) -> None:
    """A layer's given kind agrees with its streams: self-attention within one, cross between two."""
    if layer.kind == "self" and key != query:
        raise TraceError(
            f"Layer {index} ({layer.name!r}) is kind='self' but its query and key streams differ ({query!r}, {key!r})."
        )
    if layer.kind == "cross" and key == query:
        raise TraceError(
            f"Layer {index} ({layer.name!r}) is kind='cross' but its queries and keys are both stream {query!r}."
        )


def _stream_list(streams: Any) -> list[Stream]:
    if isinstance(streams, Mapping):
        items = []
        for name, value in streams.items():
            if isinstance(value, Stream):
                if value.name != name:
                    raise TraceError(f"streams[{name!r}] is a Stream named {value.name!r}; the names must agree.")
                items.append(value)
            elif isinstance(value, Mapping):
                unknown = sorted(set(value) - {"mask", "tokens", "causal", "special", "grid"})
                if unknown:
                    raise TraceError(
                        f"streams[{name!r}] has unknown fields {unknown}; a stream takes mask, tokens, causal, special, grid."
                    )
                items.append(Stream(check_name(name), **value))
            else:
                raise TraceError(f"streams[{name!r}] must be a Stream or a dict of its fields, got {type(value).__name__}.")
    elif isinstance(streams, (str, bytes)) or not isinstance(streams, Iterable):
        raise TraceError(f"streams must be a list of Stream or a dict name -> fields; got {type(streams).__name__}.")
    else:
        items = list(streams)
        for item in items:
            if not isinstance(item, Stream):
                raise TraceError(f"streams must hold attnflow.Stream objects, got {type(item).__name__}.")
    if not items:
        raise TraceError("streams= is empty; a trace needs at least one stream.")
    seen: set[str] = set()
    for stream in items:
        check_name(stream.name)
        if stream.name in seen:
            raise TraceError(f"Two streams are named {stream.name!r}; stream names must be distinct.")
        seen.add(stream.name)
    return items


def _named_layer_streams(layers: list[LayerAttention], streams: list[Stream]) -> list[LayerAttention]:
    only = streams[0].name if len(streams) == 1 else None
    out = []
    for index, layer in enumerate(layers):
        query = layer.query_stream or only
        if query is None:
            raise TraceError(
                f"Layer {index} ({layer.name!r}) names no query stream, and the trace has several "
                f"{[s.name for s in streams]}; set query_stream (from_arrays: layer_streams=[...])."
            )
        key = layer.key_stream or (query if layer.kind != "cross" else None)
        if key is None:
            raise TraceError(f"Layer {index} ({layer.name!r}) is kind='cross' but names no key_stream.")
        _check_kind(index, layer, query, key)
        for stream in (query, key):
            if not isinstance(stream, str):
                raise TraceError(f"Layer {index} ({layer.name!r}): stream names must be strings, got {stream!r}.")
        out.append(dataclasses.replace(layer, query_stream=query, key_stream=key, source_dtype=_source_dtype(layer)))
    return out


def _length_message(index: int, layer: LayerAttention, axis: str, stream: str, size: int, known: int, single: bool) -> str:
    text = (
        f"Layer {index} ({layer.name!r}) has {size} {axis} positions, but stream {stream!r} has {known} tokens in "
        "other layers; every layer of a stream must cover the same tokens."
    )
    if single and layer.kind != "cross":
        text += (
            " If this model has several token streams (encoder-decoder, text and vision), capture it with "
            "attnflow.capture (the adapters name the streams) or build the trace with streams= and layer_streams=."
        )
    return text


def _stream_length(stream: Stream, from_layers: int | None, batch: int) -> int:
    if from_layers is not None:
        return from_layers
    for value in (stream.mask, stream.special):
        if value is not None and np.ndim(value) == 2:
            return int(np.shape(value)[1])
    if stream.tokens is not None and len(stream.tokens):
        return len(stream.tokens[0])
    raise TraceError(f"Stream {stream.name!r} is used by no layer and its length is unknown; give it a mask.")


def _execution_order(layers: list[LayerAttention], links: list[Link], names: list[str]) -> list[str]:
    order: list[str] = []
    for layer in layers:
        for stream in (layer.key_stream, layer.query_stream):
            if stream not in order:
                order.append(stream)  # type: ignore[arg-type]
    for link in links:
        for stream in (link.source, link.stream):
            if stream not in names:
                raise TraceError(f"{link!r} names stream {stream!r}, but the trace's streams are {names}.")
    unused = [name for name in names if name not in order]
    if unused:
        raise TraceError(f"Streams {unused} are used by no layer; every stream needs at least one layer.")
    return order


def _detect_causal(stream: str, layers: list[LayerAttention], weights: list[np.ndarray], mask: np.ndarray) -> bool:
    own = [w for layer, w in zip(layers, weights) if layer.query_stream == stream and layer.key_stream == stream]
    return bool(own) and all(_is_causal(w, mask) for w in own)


def _is_causal(w: np.ndarray, mask: np.ndarray) -> bool:
    """No real query attends to a later real key (padding rows, e.g. of left-padded decoders, don't count).

    One pass without a temporary of the weights' size: the weights are finite and non-negative (checked
    before), so the mass each row puts on later real keys is exactly 0 where no such weight is."""
    q, k = w.shape[-2:]
    if q != k or q < 2:
        return False
    later = _later_keys(q)[None] & mask[:, None, :]  # (batch, query, key)
    mass = _row_mass(w, later)
    return not mass[np.broadcast_to(mask[:, None, :], mass.shape)].any()


def _later_keys(n: int) -> np.ndarray:
    """``(n, n)`` bool: True where the key comes after the query."""
    return np.triu(np.ones((n, n), bool), k=1)


def _row_mass(w: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``(batch, heads, query)``: per row, the sum of the weights at the ``(batch, query, key)`` positions
    ``where`` marks, in one pass over the weights (no product array of their size)."""
    indicator = where.astype(np.promote_types(w.dtype, np.float32))
    return _per_row(w, lambda block, items: np.einsum("bhqk,bqk->bhq", block, indicator[items]))


#: float16 weights are checked in float32 blocks of at most this many values: numpy's float16 reductions and
#: einsum run 10-40 times slower than float32's (a block holds one batch item and a run of its heads).
_FLOAT16_BLOCK = 1 << 22
_FLOAT16_TABLE: list[np.ndarray] = []  # every float16 bit pattern's float32 value, made on first use


def _float32(block: np.ndarray) -> np.ndarray:
    """float16 values as float32, exactly, by table (numpy's own cast is several times slower, and slower still on
    the subnormal values small attention weights often are)."""
    if not _FLOAT16_TABLE:
        _FLOAT16_TABLE.append(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32))
    return np.take(_FLOAT16_TABLE[0], block.view(block.dtype.str.replace("f", "u")))


def _per_row(w: np.ndarray, compute: Callable[[np.ndarray, slice], np.ndarray]) -> np.ndarray:
    """``(batch, heads, query)``: ``compute(block, items)`` of the weights, where ``block`` is ``w[items]`` (float32
    or float64), or for float16 weights a float32 copy of one item's run of heads, a block at a time."""
    if w.dtype != np.float16:
        return compute(w, slice(None))
    batch, heads, n_q, n_k = w.shape
    run = max(1, _FLOAT16_BLOCK // (n_q * n_k))
    out = np.empty((batch, heads, n_q), np.float32)
    for b in range(batch):
        for h in range(0, heads, run):
            out[b:b + 1, h:h + run] = compute(_float32(w[b:b + 1, h:h + run]), slice(b, b + 1))
    return out


def _check_rows(
    index: int, layer: LayerAttention, query_mask: np.ndarray, key_mask: np.ndarray, *, causal: bool, sums: bool,
    forbidden: dict[Any, np.ndarray],
) -> None:
    """Rows sum to 1 (``sums``; not for heads fused by max or min), put no more than the tolerance on keys the
    mask marks as padding and, in a ``causal`` self-attention layer, on later real keys.
    At most two passes over the weights, neither with a temporary of their size: the row sums, and the mass on
    forbidden keys (padding and, if causal, the future; skipped where no key is forbidden). ``forbidden`` caches
    the keys' indicator between the layers of one trace.

    Both passes run in float32 (float64 for float64 weights) over non-negative values (checked before), so each
    row's result is within ``n·2⁻²⁴`` of its exact value, relatively (the row sums, along the contiguous key
    axis, are summed pairwise by numpy: within ``(16 + log2 n)·2⁻²⁴``); a row is passed only with a margin of
    half the tolerance, and the few rows outside it are summed again exactly, in float64, before one is refused."""
    w = layer.weights
    tol = max(ROW_SUM_TOLERANCE.get(layer.source_dtype, _DEFAULT_ROW_TOL),
              ROW_SUM_TOLERANCE.get(str(w.dtype), _DEFAULT_ROW_TOL))
    valid_q = query_mask[:, None, :]
    accumulate = np.promote_types(w.dtype, np.float32)
    if sums:
        approx = _per_row(w, lambda block, _: np.add.reduce(block, axis=-1, dtype=accumulate))  # (batch, heads, query)
        suspect = np.argwhere(~(np.abs(approx - 1.0) <= tol / 2) & valid_q)
        if suspect.size:
            row_sums = np.asarray(w[suspect[:, 0], suspect[:, 1], suspect[:, 2]], dtype=np.float64).sum(-1)
            over = np.flatnonzero(~(np.abs(row_sums - 1.0) <= tol))
            if over.size:
                b, h, q = (int(x) for x in suspect[over[0]])
                raise TraceError(
                    f"Layer {index} ({layer.name!r}): attention row (batch={b}, head={h}, query={q}) sums to "
                    f"{row_sums[over[0]]:.6g}, not 1 (tolerance {tol:g} for {layer.source_dtype}). Pass softmax "
                    "probabilities over keys (last axis); if the axes are swapped, transpose to (batch, heads, "
                    "query, key). Weights converted from bfloat16 or float16 need from_arrays(..., "
                    "source_dtype='bfloat16')."
                )
    n_q, n_k = w.shape[-2:]
    padded = not key_mask.all()
    if not padded and not causal:
        return  # no key is forbidden
    cached = (id(key_mask), causal, n_q, accumulate)
    if cached not in forbidden:
        keys = ~key_mask[:, None, :]  # (batch, 1, key): padding
        if causal:
            keys = keys | (_later_keys(n_q)[None] & key_mask[:, None, :])  # (batch, query, key)
        forbidden[cached] = keys.astype(accumulate)
    indicator = forbidden[cached]
    if indicator.shape[1] == 1:
        mass = _per_row(w, lambda block, items: np.einsum("bhqk,bk->bhq", block, indicator[items, 0]))
    else:
        mass = _per_row(w, lambda block, items: np.einsum("bhqk,bqk->bhq", block, indicator[items]))
    suspect = np.argwhere((mass > tol / 2) & valid_q)
    if not suspect.size:
        return
    # the few rows over the margin, again, in float64, each part alone (a row may have a little of both)
    padding = np.broadcast_to(~key_mask[:, None, :], (w.shape[0], n_q, n_k))
    later = _later_keys(n_q)[None] & key_mask[:, None, :] if causal else None
    rows = np.asarray(w[suspect[:, 0], suspect[:, 1], suspect[:, 2]], dtype=np.float64)  # (rows, key)
    leaked = (rows * padding[suspect[:, 0], suspect[:, 2]]).sum(-1)
    ahead = np.zeros_like(leaked) if later is None else (rows * later[suspect[:, 0], suspect[:, 2]]).sum(-1)
    over = np.flatnonzero((leaked > tol) | (ahead > tol))
    if not over.size:
        return
    r = int(over[0])
    b, h, q = (int(x) for x in suspect[r])
    if leaked[r] > tol:
        raise TraceError(
            f"Layer {index} ({layer.name!r}): query {q} of batch item {b} (head {h}) puts {leaked[r]:.3g} of "
            f"its attention on positions the mask of stream {layer.key_stream!r} marks as padding. The mask does "
            "not match the one the model used; pass the model's attention_mask."
        )
    k = int(np.flatnonzero(rows[r] * later[b, q])[0])  # type: ignore[index]
    raise TraceError(
        f"Layer {index} ({layer.name!r}): stream {layer.query_stream!r} is causal, but query {q} of batch item {b} "
        f"(head {h}) puts {ahead[r]:.3g} of its attention on later tokens (first on key {k}; tolerance {tol:g}). "
        "Leave causal unset to detect it from the weights, or set causal=False."
    )


def _check_extras(index: int, layer: LayerAttention) -> None:
    batch = layer.weights.shape[0]
    for key, value in layer.extras.items():
        if not isinstance(key, str) or not key.replace("_", "a").replace(".", "a").isalnum():
            raise TraceError(f"Layer {index} ({layer.name!r}): extra names must be plain words, got {key!r}.")
        if value.ndim == 0 or value.shape[0] not in (batch, 1):
            raise TraceError(
                f"Layer {index} ({layer.name!r}): extra {key!r} must be an array whose first axis is the batch ({batch}), "
                "or 1 for what every item shares (e.g. a layer's parameters)."
            )


def _link_list(links: Any) -> list[Link]:
    if isinstance(links, (str, bytes, Link)) or not isinstance(links, Iterable):
        raise TraceError(f"links must be a sequence of attnflow.Link, got {type(links).__name__}.")
    items = list(links)
    for item in items:
        if not isinstance(item, Link):
            raise TraceError(f"links must hold attnflow.Link objects, got {type(item).__name__}.")
    return items


def _checked_link(index: int, link: Link, streams: Mapping[str, Stream], layers: tuple[LayerAttention, ...]) -> Link:
    where = f"Link {index} ({link.stream!r} <- {link.source!r})"
    if link.stream == link.source:
        raise TraceError(f"{where}: a link joins two different streams.")
    target, source = streams[link.stream], streams[link.source]
    depth_max = sum(1 for layer in layers if layer.query_stream == link.source)
    if not is_int(link.depth) or not 0 <= link.depth <= depth_max:
        raise TraceError(
            f"{where}: depth must be an int in [0, {depth_max}] (the number of {link.source!r} layers applied), "
            f"got {link.depth!r}."
        )
    try:
        w = np.asarray(link.weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TraceError(f"{where}: weights must be a numeric array.") from exc
    shape = (target.batch_size, target.length, source.length)
    if w.shape != shape:
        raise TraceError(f"{where}: weights must have shape (batch, {link.stream} length, {link.source} length) = {shape}; got {w.shape}.")
    if not np.isfinite(w).all() or (w < 0).any():
        raise TraceError(f"{where}: weights must be finite and non-negative.")
    sums = w.sum(axis=-1)
    fed = sums > 0
    if (np.abs(sums[fed] - 1.0) > 1e-6).any():
        raise TraceError(f"{where}: each fed token's row must sum to 1 (rows of tokens not fed are all 0).")
    if (w * ~source._completed()[:, None, :]).any():
        raise TraceError(f"{where}: weights point at padding of stream {link.source!r}.")
    first_layer = next((i for i, layer in enumerate(layers) if layer.query_stream == link.stream), None)
    source_layers = [i for i, layer in enumerate(layers) if layer.query_stream == link.source]
    if first_layer is not None and link.depth and source_layers[link.depth - 1] > first_layer:
        raise TraceError(
            f"{where}: {link.source!r} reaches depth {link.depth} only after {link.stream!r}'s first layer ran; a "
            "link feeds a stream's inputs from what was computed before."
        )
    return Link(stream=link.stream, source=link.source, depth=int(link.depth), weights=frozen(w))


def _as_layer_list(weights: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    if isinstance(weights, np.ndarray) and weights.ndim == 5:
        return [w for w in weights]
    if isinstance(weights, np.ndarray) and weights.ndim in (3, 4):
        raise TraceError(
            f"Got one array of shape {weights.shape}; pass a list of per-layer (batch, heads, query, key) "
            "arrays, or one stacked (layers, batch, heads, query, key) array."
        )
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise TraceError(f"weights must be a list of arrays, got {type(weights).__name__}.")
    arrays = []
    for i, w in enumerate(weights):
        try:
            w = np.asarray(w)
        except Exception as exc:  # a framework tensor that refuses conversion (e.g. one requiring grad)
            raise TraceError(
                f"Layer {i}: cannot convert {type(w).__name__} to a numpy array ({exc}). Convert it first, "
                "e.g. tensor.detach().float().cpu().numpy()."
            ) from exc
        arrays.append(w[None] if w.ndim == 3 else w)
    return arrays


_SHORT_DTYPES = {"float16": "f16", "float32": "f32", "float64": "f64", "bool": "bool", "int64": "i64", "int32": "i32"}


def array_summary(array: Any) -> str:
    """``f32[1,12,128,128]``: an array's dtype and shape, as equinox prints them (never its values)."""
    shape = getattr(array, "shape", None)
    if shape is None:
        return type(array).__name__
    dtype = str(getattr(array, "dtype", "?"))
    return f"{_SHORT_DTYPES.get(dtype, dtype)}[{','.join(str(n) for n in shape)}]"


def trace_html(trace: AttentionTrace, *, strip: int = 48) -> str:
    """A small HTML table of a trace for notebooks: its streams, and per layer its kind, streams, weights'
    dtype and shape and a heat strip of the attention each key receives (item 0, mean over heads and real
    queries; at most ``strip`` keys; darker = more)."""
    import html

    rows = []
    for name, stream in trace.streams.items():
        rows.append(f"<tr><td>stream</td><td>{html.escape(name)}</td><td colspan=2>length {stream.length}"
                    f"{', causal' if stream.causal else ''}{'' if stream.grid is None else f', grid {stream.grid}'}</td>"
                    "<td></td></tr>")
    for layer in trace.layers:
        real = trace.valid_index(0, layer.query_stream)
        keys = trace.valid_index(0, layer.key_stream)[:strip]
        received = np.asarray(layer.weights[0], dtype=np.float64)[:, real][:, :, keys].mean(axis=(0, 1)) if real.size \
            else np.zeros(keys.size)
        top = float(received.max()) if received.size else 0.0
        cells = "".join(
            f'<span title="{html.escape(str(_label(trace, layer.key_stream, int(k))))}: {v:.3f}" style="display:inline-block;'
            f'width:6px;height:12px;background:rgba(31,119,180,{(v / top if top > 0 else 0):.2f})"></span>'
            for k, v in zip(keys, received))
        flow = layer.query_stream if layer.query_stream == layer.key_stream else f"{layer.query_stream} → {layer.key_stream}"
        rows.append(f"<tr><td>{html.escape(layer.kind or '')}</td><td>{html.escape(layer.name)}</td>"
                    f"<td>{html.escape(str(flow))}</td><td><code>{array_summary(layer.weights)}</code>"
                    f"{' +' + ','.join(sorted(layer.extras)) if layer.extras else ''}</td><td>{cells}</td></tr>")
    head = html.escape(repr(trace))
    return (f"<div><p><b>{head}</b></p><table><tr><th></th><th>name</th><th>streams</th><th>weights</th>"
            f"<th>attention received (item 0)</th></tr>{''.join(rows)}</table></div>")


def _label(trace: AttentionTrace, stream: str | None, position: int) -> str:
    tokens = trace.streams[stream].tokens if stream is not None and stream in trace.streams else None
    return str(tokens[0][position]) if tokens else str(position)
