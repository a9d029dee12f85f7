"""The attention block of one layer, decomposed by source token: what norm-based methods measure.

For item ``b`` of a layer with value extras (see ``attnflow.adapters._torch._values``), over its real tokens:

* ``f^h(x_j) = v_j^h W_O^h`` (value vector, bias included, times the head's output projection);
* ``Σ_h α^h_ij f^h(x_j)``: what the attention moves from token ``j`` to token ``i`` (Kobayashi et al., 2020);
* ``T_i(x_j)``: token ``j``'s share of token ``i``'s output of the block, the residual included (Kobayashi
  et al., 2021; Ferrando et al., 2022): post-LN, ``T_i(x_j) = L(Σ_h α^h_ij f^h(x_j) + δ_ij x_i) / σ_i`` with
  ``L(z) = (z - mean(z)) ⊙ γ`` and ``σ_i`` the norm's standard deviation of token ``i``; pre-LN, the residual
  stream itself: ``T_i(x_j) = Σ_h α^h_ij f^h(x_j) + δ_ij x_i``. Then ``Σ_j T_i(x_j) + bias terms`` is the
  block's output ``y_i`` (the norm's output, or the residual stream before the second norm).
* "Sandwich" pre-LN (Gemma 2 and 3): the attention output ``a_i = Σ_j Σ_h α^h_ij f^h(x_j) + b_O`` passes an
  RMSNorm before the residual add, ``y_i = x_i + g ⊙ a_i / ρ_i`` with ``ρ_i = sqrt(mean(a_i²) + ε)``. As
  Kobayashi et al. (2021) treat a norm's denominator as a constant of the forward pass, it is linear in the
  terms: ``f^h(x_j)`` becomes ``g ⊙ f^h(x_j) / ρ_i`` (in ``moved``, so ``norm`` measures what reaches the
  residual stream) and ``T_i(x_j) = Σ_h α^h_ij g ⊙ f^h(x_j) / ρ_i + δ_ij x_i``; the bias term ``g ⊙ b_O / ρ_i``.
  Recorded as the extras ``post_norm_input`` (``a``), ``post_norm_weight`` (``g``, the effective scale: Gemma's
  ``1 + weight`` already added) and ``post_norm_eps``.

A cross-attention layer (an encoder-decoder's decoder) mixes the key stream's vectors (the encoder's output
``e_j``) into the query stream's residual ``x_i``: as in ALTI+ (Ferrando et al., 2022b) the residual is one
more source, so its shares are ``T_i(e_j)`` for each key ``j`` (``δ_ij x_i`` left out) followed by
``T_i(x_i)``, the residual's share, as a last column: ``(queries, keys + 1, d_model)``.

The ``(queries, keys, d_model)`` intermediate is built for ``chunk`` query rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from .._errors import MethodError
from ..trace import AttentionTrace, LayerAttention

#: Query rows of the (queries, keys, d_model) intermediate built at a time.
CHUNK = 64


def layout(trace: AttentionTrace) -> str:
    found = trace.metadata.get("values_layout")
    if found not in ("post_ln", "pre_ln"):
        raise MethodError(
            "This trace records value tensors without saying whether its layers normalise after attention (post-LN, "
            "as BERT) or before (pre-LN, as GPT-2 and Llama): metadata['values_layout'] is missing. Capture with "
            "attnflow.capture(model, ..., values=True)."
        )
    return str(found)


def _check(layer: LayerAttention, names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in layer.extras]
    if missing:
        what = "cross-attention layers" if layer.kind == "cross" else f"layer {layer.name!r}"
        raise MethodError(
            f"Norm-based methods need {missing} for {what}, which this trace lacks. Capture with "
            "attnflow.capture(model, ..., values=True) (value tensors are recorded for the self-attention layers "
            "of the families with a value path map (attnflow.adapters.register_value_map), and for the cross-attention layers of those "
            "whose map has a cross part: BART, Marian, mBART and SegFormer's reduced keys; T5 has none yet)."
        )


class Block:
    """One layer's attention block for one item, over its real tokens."""

    def __init__(self, trace: AttentionTrace, index: int, b: int, heads: list[int] | None = None):
        layer = trace.layers[index]
        _check(layer, ("value", "out_weight", "out_bias", "residual"))
        self.layout = layout(trace)
        rows = trace.valid_index(b, layer.query_stream)
        cols = trace.valid_index(b, layer.key_stream)
        chosen = slice(None) if heads is None else list(heads)
        e = layer.extras

        def item(name: str) -> np.ndarray:
            value = e[name]
            return np.asarray(value[b if value.shape[0] > 1 else 0], dtype=np.float64)

        self.rows, self.cols = rows, cols
        self.cross = layer.kind == "cross"
        self.attention = np.asarray(layer.weights[b], np.float64)[chosen][:, rows][:, :, cols]  # (H, q, k)
        value = item("value")[chosen][:, cols]  # (H, k, d_head)
        self.transformed = np.einsum("hkd,hde->hke", value, item("out_weight")[chosen])  # f^h(x_j): (H, k, d)
        self.out_bias = item("out_bias")
        self.residual = item("residual")[rows]  # x_i: (q, d)
        self.same = rows[:, None] == cols[None, :]  # δ_ij over real positions
        if self.layout == "post_ln":
            _check(layer, ("norm_input", "norm_output", "norm_weight", "norm_bias", "norm_eps"))
            z = item("norm_input")[rows]
            self.norm_weight, self.norm_bias = item("norm_weight"), item("norm_bias")
            self.sigma = np.sqrt(z.var(axis=-1) + float(item("norm_eps")))  # σ_i of the norm (biased variance)
            self.output = item("norm_output")[rows]
        else:
            _check(layer, ("block_output",))
            self.output = item("block_output")[rows]
        self.post_scale: np.ndarray | None = None  # g / ρ_i of a sandwich norm: (q, d_model)
        if "post_norm_input" in e:
            _check(layer, ("post_norm_weight", "post_norm_eps"))
            a = item("post_norm_input")[rows]
            rho = np.sqrt((a * a).mean(axis=-1) + float(item("post_norm_eps")))
            self.post_scale = item("post_norm_weight")[None, :] / rho[:, None]

    def moved(self, rows: slice) -> np.ndarray:
        """``Σ_h α^h_ij f^h(x_j)`` for query rows ``rows``: ``(rows, keys, d_model)`` (through a sandwich norm's
        ``g / ρ_i`` where there is one)."""
        moved = np.einsum("hqk,hke->qke", self.attention[:, rows], self.transformed)
        return moved if self.post_scale is None else moved * self.post_scale[rows][:, None, :]

    def shares(self, rows: slice) -> np.ndarray:
        """``T_i(x_j)`` for query rows ``rows``: ``(rows, keys, d_model)``; for a cross-attention layer
        ``(rows, keys + 1, d_model)``, the residual's share last (see the module docstring)."""
        z = self.moved(rows)
        if self.cross:
            z = np.concatenate([z, self.residual[rows][:, None, :]], axis=1)
        else:
            same = self.same[rows]
            z[same] += self.residual[rows][np.nonzero(same)[0]]
        if self.layout == "pre_ln":
            return z
        centred = z - z.mean(axis=-1, keepdims=True)
        return centred * self.norm_weight / self.sigma[rows][:, None, None]

    def bias_terms(self) -> np.ndarray:
        """What the block's output has beside ``Σ_j T_i(x_j)``: ``(queries, d_model)``."""
        if self.layout == "pre_ln":
            if self.post_scale is not None:
                return self.out_bias * self.post_scale
            return np.broadcast_to(self.out_bias, self.output.shape)
        centred = self.out_bias - self.out_bias.mean()
        return centred * self.norm_weight / self.sigma[:, None] + self.norm_bias

    def chunks(self) -> Iterator[slice]:
        count = self.attention.shape[1]
        for start in range(0, count, CHUNK):
            yield slice(start, min(start + CHUNK, count))

    def per_row(self, measure: Callable[[slice], np.ndarray]) -> np.ndarray:
        """``measure(rows)`` -> ``(rows, keys)``, assembled over every chunk of query rows."""
        return np.concatenate([measure(rows) for rows in self.chunks()], axis=0)


def layer_matrices(
    trace: AttentionTrace, indices: list[int], measure: Callable[[Block], np.ndarray], heads: dict[int, list[int]]
) -> Callable[[int, int], np.ndarray]:
    """``weights(layer index, item)``: ``measure(Block(...))`` over real tokens, computed once per (layer, item)."""
    cache: dict[tuple[int, int], np.ndarray] = {}

    def weights(index: int, b: int) -> np.ndarray:
        key = (index, b)
        if key not in cache:
            cache[key] = measure(Block(trace, index, b, heads.get(index)))
        return cache[key]

    return weights


def alti(block: Block) -> np.ndarray:
    """Ferrando et al. (2022): ``max(0, ‖y_i‖₁ - ‖y_i - T_i(x_j)‖₁)``, rows normalised to sum 1; for a
    cross-attention layer (ALTI+, Ferrando et al., 2022b) ``(queries, keys + 1)``, the residual's share last."""
    output = block.output
    norms = np.abs(output).sum(axis=-1)

    def measure(rows: slice) -> np.ndarray:
        distance = np.abs(output[rows][:, None, :] - block.shares(rows)).sum(axis=-1)
        return np.maximum(0.0, norms[rows][:, None] - distance)

    return normalise_rows(block.per_row(measure))


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    sums = matrix.sum(axis=-1, keepdims=True)
    return np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0)

