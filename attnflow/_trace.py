"""The common format: AttentionTrace, what adapters produce and every method consumes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._errors import TraceError

#: How far a valid attention row may stray from summing to 1, by the dtype the model produced.
ROW_SUM_TOLERANCE = {"float16": 1e-2, "bfloat16": 2e-2, "float32": 1e-4, "float64": 1e-6}
_DEFAULT_ROW_TOL = 1e-4
KINDS = ("self", "cross")


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """One attention layer's probabilities.

    Attributes:
        weights: ``(batch, heads, query, key)`` attention probabilities, as the model produced them
            (float16/float32/float64; bfloat16 arrives upcast to float32 with ``source_dtype="bfloat16"``).
        name: the module path in the model, e.g. ``"encoder.layer.3.attention.self"``.
        kind: ``"self"`` or ``"cross"``.
        source_dtype: the dtype the model computed in (``"bfloat16"`` when the weights were upcast).
        extras: named per-layer arrays kept beside the weights (reserved for attention gradients,
            value vectors and output projections); each is saved and loaded with the trace.
    """

    weights: np.ndarray
    name: str
    kind: str = "self"
    source_dtype: str = ""
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.weights.shape)  # type: ignore[return-value]


class AttentionTrace:
    """Per-layer attention of one forward pass, with token labels and masks.

    Build one with :meth:`from_arrays` (no model needed) or get one from :func:`attnflow.capture`.
    Construction validates everything; a trace that exists is well-formed.

    Attributes:
        layers: tuple of :class:`LayerAttention`, in the order the model runs them.
        mask: ``(batch, seq)`` bool, True where the token is real (not padding).
        tokens: per batch item, a list of ``seq`` token labels.
        causal: True when queries attend only to themselves and earlier keys.
        framework: ``"torch"``, ``"jax"``, ``"numpy"``...
        model_name: free text naming the model.
        metadata: JSON-serialisable dict of anything else.
    """

    def __init__(
        self,
        layers: Sequence[LayerAttention],
        *,
        mask: np.ndarray | None = None,
        tokens: Sequence[Sequence[str]] | None = None,
        causal: bool | None = None,
        framework: str = "numpy",
        model_name: str = "",
        metadata: Mapping[str, Any] | None = None,
        check_rows: bool = True,
    ):
        self.layers = tuple(layers)
        if not self.layers:
            raise TraceError(
                "The trace has no attention layers. If it came from capture()/attach(), the forward pass "
                "ran no attention module the adapter recognised; check the adapter's module selection."
            )
        first = self.layers[0]
        for index, layer in enumerate(self.layers):
            _check_layer(index, layer)
        batch = first.weights.shape[0]
        self_layers = [layer for layer in self.layers if layer.kind == "self"]
        seq = (self_layers[0] if self_layers else first).weights.shape[2]
        for index, layer in enumerate(self.layers):
            b, _, q, k = layer.weights.shape
            if b != batch:
                raise TraceError(
                    f"Layer {index} ({layer.name!r}) has batch size {b}, but layer 0 has {batch}; every "
                    "layer of a trace must come from the same forward pass."
                )
            if layer.kind == "self" and (q != seq or k != seq):
                raise TraceError(
                    f"Layer {index} ({layer.name!r}) is self-attention of shape (query={q}, key={k}), but the "
                    f"trace has {seq} tokens: self-attention must be square and the same in every layer. "
                    "Capture layers of one forward pass only, or mark encoder-decoder layers kind='cross'."
                )
        self.mask = _check_mask(mask, batch, seq)
        self.tokens = _check_tokens(tokens, batch, seq)
        if causal is None:
            causal = bool(self_layers) and all(_is_causal(layer.weights, self.mask) for layer in self_layers)
        self.causal = bool(causal)
        self.framework = str(framework)
        self.model_name = str(model_name)
        self.metadata = dict(metadata or {})
        if check_rows:
            for index, layer in enumerate(self.layers):
                if layer.kind == "self":
                    _check_rows(index, layer, self.mask)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        weights: Sequence[np.ndarray] | np.ndarray,
        *,
        tokens: Sequence[Sequence[str]] | Sequence[str] | None = None,
        mask: np.ndarray | None = None,
        causal: bool | None = None,
        names: Sequence[str] | None = None,
        kinds: Sequence[str] | None = None,
        framework: str = "numpy",
        model_name: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> AttentionTrace:
        """Build a trace from per-layer arrays, no model needed.

        Args:
            weights: a sequence of ``(batch, heads, query, key)`` arrays, one per layer, or one stacked
                ``(layers, batch, heads, query, key)`` array. ``(heads, query, key)`` arrays are taken as
                batch 1.
            tokens: token labels, per batch item (``[[...], [...]]``) or one list for batch 1.
            mask: ``(batch, seq)`` key-validity mask (True/1 = real token); default all valid.
            causal: force the causal flag; by default it is detected (no weight above the diagonal).
            names: module path of each layer; default ``"layer.{i}"``.
            kinds: ``"self"``/``"cross"`` per layer; default all ``"self"``.

        Returns:
            A validated :class:`AttentionTrace`.
        """
        arrays = _as_layer_list(weights)
        if names is not None and len(names) != len(arrays):
            raise TraceError(f"Got {len(names)} names for {len(arrays)} layers; give one name per layer.")
        if kinds is not None and len(kinds) != len(arrays):
            raise TraceError(f"Got {len(kinds)} kinds for {len(arrays)} layers; give one kind per layer.")
        layers = [
            LayerAttention(
                weights=array,
                name=names[i] if names is not None else f"layer.{i}",
                kind=kinds[i] if kinds is not None else "self",
                source_dtype=str(array.dtype),
            )
            for i, array in enumerate(arrays)
        ]
        if tokens is not None and len(tokens) > 0 and isinstance(tokens[0], str):
            tokens = [list(tokens)]  # one sequence of labels: batch of one
        return cls(
            layers, mask=mask, tokens=tokens, causal=causal, framework=framework,
            model_name=model_name, metadata=metadata,
        )

    # -- shape --------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        return int(self.layers[0].weights.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.mask.shape[1])

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Heads per layer."""
        return tuple(int(layer.weights.shape[1]) for layer in self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def lengths(self) -> np.ndarray:
        """``(batch,)`` number of valid tokens per batch item."""
        return self.mask.sum(axis=1)

    def valid_index(self, batch_index: int) -> np.ndarray:
        """Positions of the real tokens of one batch item, ``(n_valid,)`` int."""
        if not -self.batch_size <= batch_index < self.batch_size:
            raise TraceError(f"batch_index {batch_index} is out of range for a batch of {self.batch_size}.")
        return np.flatnonzero(self.mask[batch_index])

    def self_layers(self) -> list[LayerAttention]:
        """The self-attention layers, in model order (rollout and flow use these)."""
        return [layer for layer in self.layers if layer.kind == "self"]

    def stack(self, dtype: Any = np.float64) -> np.ndarray:
        """Self-attention weights stacked: ``(layers, batch, heads, seq, seq)``; needs equal head counts."""
        layers = self.self_layers()
        heads = {layer.weights.shape[1] for layer in layers}
        if len(heads) > 1:
            raise TraceError(
                f"Layers have different head counts {sorted(heads)}; fuse heads per layer instead of stacking."
            )
        return np.stack([np.asarray(layer.weights, dtype=dtype) for layer in layers])

    def select(self, batch_index: int) -> AttentionTrace:
        """A trace of one batch item (batch size 1), same layers and metadata."""
        self.valid_index(batch_index)
        b = batch_index % self.batch_size
        layers = [
            dataclasses.replace(
                layer,
                weights=layer.weights[b : b + 1],
                extras={k: v[b : b + 1] for k, v in layer.extras.items()},
            )
            for layer in self.layers
        ]
        return AttentionTrace(
            layers, mask=self.mask[b : b + 1], tokens=[self.tokens[b]], causal=self.causal,
            framework=self.framework, model_name=self.model_name, metadata=self.metadata, check_rows=False,
        )

    # -- files --------------------------------------------------------------------------------------
    def save(self, path: str | Any) -> None:
        """Write the trace to ``path`` as safetensors (arrays) with JSON metadata; no pickle."""
        from ._io import save_trace

        save_trace(self, path)

    def __repr__(self) -> str:
        heads = sorted(set(self.num_heads))
        head_text = heads[0] if len(heads) == 1 else heads
        return (
            f"AttentionTrace(layers={self.num_layers}, batch={self.batch_size}, heads={head_text}, "
            f"seq={self.seq_len}, causal={self.causal}, framework={self.framework!r}, "
            f"model={self.model_name!r})"
        )


def _as_layer_list(weights: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    if isinstance(weights, np.ndarray) and weights.ndim == 5:
        return [np.asarray(w) for w in weights]
    if isinstance(weights, np.ndarray) and weights.ndim in (3, 4):
        raise TraceError(
            f"Got one array of shape {weights.shape}; pass a list of per-layer (batch, heads, query, key) "
            "arrays, or one stacked (layers, batch, heads, query, key) array."
        )
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


def _check_layer(index: int, layer: LayerAttention) -> None:
    w = layer.weights
    where = f"Layer {index} ({layer.name!r})"
    if not isinstance(w, np.ndarray):
        raise TraceError(f"{where}: weights must be a numpy array, got {type(w).__name__}.")
    if w.ndim != 4:
        raise TraceError(
            f"{where}: weights must have 4 axes (batch, heads, query, key); got shape {w.shape}."
        )
    if min(w.shape) == 0:
        raise TraceError(f"{where}: weights have an empty axis, shape {w.shape}.")
    if w.dtype.name == "bfloat16":
        raise TraceError(f"{where}: numpy cannot compute in bfloat16; pass weights.astype(np.float32).")
    if not np.issubdtype(w.dtype, np.floating):
        raise TraceError(
            f"{where}: weights must be floating point, got {w.dtype}. Pass attention probabilities, not scores."
        )
    if layer.kind not in KINDS:
        raise TraceError(f"{where}: kind must be one of {KINDS}, got {layer.kind!r}.")
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
    for key, value in layer.extras.items():
        if not isinstance(value, np.ndarray) or value.shape[:1] != w.shape[:1]:
            raise TraceError(
                f"{where}: extra {key!r} must be a numpy array whose first axis is the batch ({w.shape[0]})."
            )


def _check_mask(mask: np.ndarray | None, batch: int, seq: int) -> np.ndarray:
    if mask is None:
        return np.ones((batch, seq), dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != (batch, seq):
        raise TraceError(
            f"mask must have shape (batch, seq) = ({batch}, {seq}); got {mask.shape}. It marks the real "
            "(non-padding) tokens, like a tokenizer's attention_mask."
        )
    if not (np.issubdtype(mask.dtype, np.bool_) or np.isin(mask, (0, 1)).all()):
        raise TraceError("mask must hold only 0/1 or booleans (True = real token).")
    mask = mask.astype(bool)
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise TraceError(f"mask marks no real token in batch item {int(empty[0])}; every item needs one.")
    return mask


def _check_tokens(tokens: Sequence[Sequence[str]] | None, batch: int, seq: int) -> list[list[str]]:
    if tokens is None:
        return [[f"#{i}" for i in range(seq)] for _ in range(batch)]
    tokens = [list(map(str, item)) for item in tokens]
    if len(tokens) != batch:
        raise TraceError(f"tokens has {len(tokens)} items but the batch has {batch}; give labels per item.")
    for b, item in enumerate(tokens):
        if len(item) != seq:
            raise TraceError(
                f"tokens[{b}] has {len(item)} labels but the attention covers {seq} tokens; pad the labels "
                "to the sequence length (padding positions are ignored)."
            )
    return tokens


def _is_causal(w: np.ndarray, mask: np.ndarray) -> bool:
    """No real query attends to a later real key (padding rows, e.g. of left-padded decoders, don't count)."""
    q, k = w.shape[-2:]
    if q != k or q < 2:
        return False
    real = mask[:, None, :, None] & mask[:, None, None, :]
    return not np.triu(w * real, k=1).any()


def _check_rows(index: int, layer: LayerAttention, mask: np.ndarray) -> None:
    w = layer.weights
    tol = ROW_SUM_TOLERANCE.get(layer.source_dtype or str(w.dtype), _DEFAULT_ROW_TOL)
    tol = max(tol, ROW_SUM_TOLERANCE.get(str(w.dtype), _DEFAULT_ROW_TOL))
    sums = w.sum(axis=-1, dtype=np.float64)  # (batch, heads, query)
    valid_q = mask[:, None, :]
    bad = (np.abs(sums - 1.0) > tol) & valid_q
    if bad.any():
        b, h, q = (int(x) for x in np.argwhere(bad)[0])
        raise TraceError(
            f"Layer {index} ({layer.name!r}): attention row (batch={b}, head={h}, query={q}) sums to "
            f"{sums[b, h, q]:.6g}, not 1 (tolerance {tol:g} for {layer.source_dtype or w.dtype}). Pass softmax "
            "probabilities over keys (last axis); if the axes are swapped, transpose to (batch, heads, query, key)."
        )
    leaked = (w * (~mask)[:, None, None, :]).sum(axis=-1, dtype=np.float64)
    bad = (leaked > tol) & valid_q
    if bad.any():
        b, h, q = (int(x) for x in np.argwhere(bad)[0])
        raise TraceError(
            f"Layer {index} ({layer.name!r}): query {q} of batch item {b} (head {h}) puts {leaked[b, h, q]:.3g} of "
            "its attention on positions the mask marks as padding. The mask does not match the one the model "
            "used; pass the model's attention_mask."
        )
