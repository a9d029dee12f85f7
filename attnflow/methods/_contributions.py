"""Methods beyond raw attention: gradient-weighted attention, norm-based contributions, value zeroing and
effective attention. Each is checked in the tests against an implementation written from its paper."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .._errors import MethodError
from ..network._network import EdgeWeights, explained_stream
from ..trace import AttentionTrace, LayerAttention
from ..trace._trace import layer_streams
from ._decompose import Block, alti, layer_matrices, normalise_rows
from ._flow import local_sources
from ._fusion import head_choice, select_layers
from ._options import Options
from ._registry import Method, Scores
from ._rollout import rollout_scores

CHEFER = "Chefer, Gur & Wolf, Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers, ICCV 2021"
KOBAYASHI_2020 = "Kobayashi, Kuribayashi, Yokoi & Inui, Attention is Not Only a Weight: Analyzing Transformers with Vector Norms, EMNLP 2020"
KOBAYASHI_2021 = "Kobayashi, Kuribayashi, Yokoi & Inui, Incorporating Residual and Normalization Layers into Analysis of Masked Language Models, EMNLP 2021"
FERRANDO = "Ferrando, Gállego & Costa-jussà, Measuring the Mixing of Contextual Information in the Transformer, EMNLP 2022"
FERRANDO_PLUS = ("Ferrando, Gállego, Alastruey, Escolano & Costa-jussà, Towards Opening the Black Box of Neural Machine "
                 "Translation: Source and Target Interpretations of the Transformer, EMNLP 2022")
MOHEBBI = "Mohebbi, Zuidema, Chrupała & Alishahi, Quantifying Context Mixing in Transformers, EACL 2023"
BRUNNER = "Brunner, Liu, Pascual, Richter, Ciaramita & Wattenhofer, On Identifiability in Transformers, ICLR 2020"


def per_layer_scores(
    trace: AttentionTrace, options: Options, stream: str, sources: Sequence[int] | None, all_layers: bool,
    matrix: Callable[[int, int], np.ndarray],
) -> Scores:
    """A per-layer view: ``matrix(layer index, item)`` over the real tokens of each selected layer of the
    explained stream, its rows for ``sources``, as input stream -> ``(layers, batch, S, tokens)``."""
    explained = explained_stream(trace, stream)
    chosen = select_layers(trace, options.layers, explained)
    if not all_layers:
        chosen = chosen[-1:]
    plans = [local_sources(trace, explained, b, sources) for b in range(trace.batch_size)]
    rows = trace.streams[explained].length if sources is None else len(sources)
    keys = [name for name in trace.streams if any(trace.layers[i].key_stream == name for i in chosen)]
    result = {name: np.zeros((len(chosen), trace.batch_size, rows, trace.streams[name].length)) for name in keys}
    for d, index in enumerate(chosen):
        layer = trace.layers[index]
        _, key = layer_streams(layer)
        for b, (local, out_rows) in enumerate(plans):
            cols = trace.valid_index(b, key)
            # a cross-attention block's residual column (ALTI+-style decompositions) is not a key token: dropped
            result[key][d, b][np.ix_(np.asarray(out_rows, dtype=np.intp), cols)] = matrix(index, b)[local][:, : cols.size]
    return result


def _gradient_weighted(trace: AttentionTrace, index: int, b: int, heads: list[int] | None) -> np.ndarray:
    """Chefer's Ā of one layer: the mean over heads of ``(∇A ⊙ A)⁺`` (clamped before the mean), real tokens."""
    layer = trace.layers[index]
    if "attn_grad" not in layer.extras:
        raise MethodError(
            f"Layer {layer.name!r} has no attention gradient: capture with attnflow.capture(model, ..., target=...)."
        )
    rows = trace.valid_index(b, layer.query_stream)
    cols = trace.valid_index(b, layer.key_stream)
    chosen = slice(None) if heads is None else list(heads)
    weights = np.asarray(layer.weights[b], np.float64)[chosen][:, rows][:, :, cols]
    grads = np.asarray(layer.extras["attn_grad"][b], np.float64)[chosen][:, rows][:, :, cols]
    return np.maximum(grads * weights, 0.0).mean(axis=0)


class AttnGrad(Method):
    """Gradient-weighted attention of each layer, ``mean_h (∇A ⊙ A)⁺`` (Chefer et al., 2021, their ablation);
    a per-layer view. Needs ``capture(..., target=...)``."""

    name = "attn_grad"
    needs = ("weights", "attn_grad")
    reference = CHEFER
    order = 30

    def compute(self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None,
                all_layers: bool) -> Scores:
        heads = head_choice(trace, options.heads, stream)
        return per_layer_scores(trace, options, stream, sources, all_layers,
                                lambda i, b: _gradient_weighted(trace, i, b, heads.get(i)))

    def edge_weights(self, trace: AttentionTrace, options: Options) -> EdgeWeights:
        heads = head_choice(trace, options.heads)
        return lambda i, b: normalise_rows(_gradient_weighted(trace, i, b, heads.get(i)))


class GradRollout(Method):
    """Chefer et al. (2021), gradient-weighted rollout: ``R = I``; per layer ``R ← R + Ā R`` with
    ``Ā = mean_h (∇A ⊙ A)⁺``; the explained tokens' rows, unnormalised, the token itself included, 0 on
    padding. Encoder-decoders follow the paper's rules: the decoder's self-attention updates ``R_qq`` and
    ``R_qi``, each cross-attention adds ``R̄_qqᵀ Ā_qi R̄_ii`` with ``R̄ = (R - I)/rowsum + I``. Needs
    ``capture(..., target=...)``. The scores are relevances, not shares: rows do not sum to 1."""

    name = "grad_rollout"
    needs = ("weights", "attn_grad")
    cumulative = True
    reference = CHEFER
    order = 31

    def compute(self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None,
                all_layers: bool) -> Scores:
        explained = explained_stream(trace, stream)
        if trace.links:
            raise MethodError("grad_rollout follows self- and cross-attention only; this trace has linked streams.")
        chosen = set(select_layers(trace, options.layers, explained))
        heads = head_choice(trace, options.heads, explained)
        inputs = trace.input_streams(explained)
        depths = len(chosen) if all_layers else 1
        rows = trace.streams[explained].length if sources is None else len(sources)
        result = {name: np.zeros((depths, trace.batch_size, rows, trace.streams[name].length)) for name in inputs}
        for b in range(trace.batch_size):
            local, out_rows = local_sources(trace, explained, b, sources)
            snapshots = self._item(trace, b, explained, chosen, heads)
            kept = snapshots if all_layers else snapshots[-1:]
            for d, relevance in enumerate(kept):
                for name in inputs:
                    cols = trace.valid_index(b, name)
                    result[name][d, b][np.ix_(np.asarray(out_rows, dtype=np.intp), cols)] = relevance[name][local]
        return result

    @staticmethod
    def _item(trace: AttentionTrace, b: int, explained: str, chosen: set[int],
              heads: dict[int, list[int]]) -> list[dict[str, np.ndarray]]:
        sizes = {name: trace.valid_index(b, name).size for name in trace.streams}
        own = {name: np.eye(size) for name, size in sizes.items()}  # R_ss of every stream
        cross: dict[str, np.ndarray] = {}  # R_qi of the explained stream, per key stream
        snapshots = []
        for index, layer in enumerate(trace.layers):
            query, key = layer_streams(layer)
            if query == explained and index not in chosen:
                continue
            weighted = _gradient_weighted(trace, index, b, heads.get(index))
            if layer.kind == "self":
                update = weighted @ own[query]
                if query == explained:
                    for name in cross:
                        cross[name] = cross[name] + weighted @ cross[name]
                own[query] = own[query] + update
            elif query == explained:
                addition = _normalised(own[query]).T @ (weighted @ _normalised(own[key]))
                cross[key] = cross.get(key, np.zeros((sizes[query], sizes[key]))) + addition
            else:
                raise MethodError(f"grad_rollout: cross-attention of stream {query!r} is not part of its rules.")
            if query == explained:
                snapshots.append({explained: own[explained].copy(), **{k: v.copy() for k, v in cross.items()}})
        inputs = trace.input_streams(explained)
        return [{name: snap.get(name, np.zeros((sizes[explained], sizes[name]))) for name in inputs} for snap in snapshots]


def _normalised(relevance: np.ndarray) -> np.ndarray:
    """Chefer's eq. 8-9: ``(R - I) / rowsum + I``; a row with nothing off the diagonal stays the identity row."""
    off = relevance - np.eye(relevance.shape[0])
    return normalise_rows(off) + np.eye(relevance.shape[0])


class _Decomposed(Method):
    """A method computed on each layer's attention block decomposed by source token."""

    needs = ("weights", "values")
    @staticmethod
    def measure(block: Block) -> np.ndarray:
        """``(q, k)`` contributions of one decomposed block (each subclass names its measure)."""
        raise NotImplementedError

    def check(self, trace: AttentionTrace) -> None:
        if not any("value" in layer.extras for layer in trace.layers):
            raise MethodError(
                f"Method {self.name!r} needs the value-side tensors of each layer, which this trace lacks. Capture "
                "with attnflow.capture(model, ..., values=True)."
            )

    def _weights(self, trace: AttentionTrace, options: Options, stream: str | None = None) -> EdgeWeights:
        heads = head_choice(trace, options.heads, stream)
        return layer_matrices(trace, list(range(trace.num_layers)), type(self).measure, heads)

    def edge_weights(self, trace: AttentionTrace, options: Options) -> EdgeWeights:
        raw = self._weights(trace, options)
        return lambda i, b: normalise_rows(raw(i, b))


class _PerLayer(_Decomposed):
    def compute(self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None,
                all_layers: bool) -> Scores:
        return per_layer_scores(trace, options, stream, sources, all_layers, self._weights(trace, options, stream))


class _Cumulative(_Decomposed):
    cumulative = True

    def compute(self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None,
                all_layers: bool) -> Scores:
        return rollout_scores(trace, options.replace(weights=self.name), stream=stream, sources=sources,
                              all_layers=all_layers)


def _norm(block: Block) -> np.ndarray:
    return block.per_row(lambda rows: np.linalg.norm(block.moved(rows), axis=-1))


def _norm_residual(block: Block) -> np.ndarray:
    return block.per_row(lambda rows: np.linalg.norm(block.shares(rows), axis=-1))


class Norm(_PerLayer):
    """Kobayashi et al. (2020): ``‖Σ_h α^h_ij f^h(x_j)‖`` with ``f^h(x) = (x W_V^h + b_V^h) W_O^h``, per layer
    (one head's ``‖α^h_ij f^h(x_j)‖`` with ``Options(heads=[h])``). A per-layer view of how much each token's
    transformed vector moves; not a share (rows do not sum to 1). Needs ``capture(..., values=True)``."""

    name = "norm"
    reference = KOBAYASHI_2020
    measure = staticmethod(_norm)
    order = 40


class NormResidual(_PerLayer):
    """Kobayashi et al. (2021): ``‖T_i(x_j)‖``, the norm of token ``j``'s share of token ``i``'s output with the
    residual connection and the layer norm included (post-LN), or of the residual stream (pre-LN). A
    per-layer view. On a cross-attention layer the encoder tokens' shares are shown (the residual's, the
    query's own vector, is not a key token); routed as edge weights it carries the residual's share as ALTI+
    does. Needs ``capture(..., values=True)``."""

    name = "norm_residual"
    reference = KOBAYASHI_2021
    measure = staticmethod(_norm_residual)
    edge_residual = 0.0
    order = 41


class Alti(_Cumulative):
    """ALTI, Ferrando et al. (2022): per layer, contributions ``max(0, ‖y_i‖₁ - ‖y_i - T_i(x_j)‖₁)`` normalised
    per row (``T_i`` through the first layer norm for post-LN models, the residual stream for pre-LN ones),
    rolled out across layers by plain matrix products. Needs ``capture(..., values=True)``. ALTI measures
    the attention block only (the feed-forward sublayer and the second norm are left out, as in the paper).

    Encoder-decoders get ALTI+ (Ferrando, Gállego, Alastruey, Escolano & Costa-jussà, 2022b): the encoder's
    self-attention layers are ALTI rolled out (``C_enc``); in each decoder layer the self-attention block gives
    ``C_self`` over the decoder's tokens, and the cross-attention block is decomposed over the encoder's output
    tokens plus its residual (the self-attention block's output) as one more source, giving ``C_cross``
    (``(decoder, encoder)``) and the residual's share ``r_i``, each row summing to 1 together. The layer's
    contributions are ``[C_cross C_enc, diag(r) C_self]`` on top of what the layer input drew on, so the
    decoder's rows come as ``{"encoder": ..., "decoder": ...}`` and sum to 1 together. Caveats: the encoder's
    output is reached through ``C_enc`` alone (its final norm, where the model has one, is left out like every
    feed-forward sublayer); the decoder's per-layer results (``all_layers``) come after each sublayer, self-
    and cross-attention alike. Cross-attention value tensors are recorded for BART, Marian and mBART; T5 (and
    other families whose path map has no cross part) is refused."""

    name = "alti"
    row_sum = "one"
    reference = f"{FERRANDO}; ALTI+: {FERRANDO_PLUS}"
    measure = staticmethod(alti)
    edge_residual = 0.0
    order = 42

    def check(self, trace: AttentionTrace) -> None:
        super().check(trace)
        bare = [layer.name for layer in trace.layers if layer.kind == "cross" and "value" not in layer.extras]
        if bare:
            raise MethodError(
                f"alti on an encoder-decoder (ALTI+) needs the value-side tensors of the cross-attention layers too, "
                f"and {bare[0]!r} has none. Capture with attnflow.capture(model, ..., values=True) on a family whose "
                "path map has a cross part (BART, Marian, mBART; others: attnflow.adapters.register_value_map with "
                "ValueMap(cross=...)); T5 has no map yet (RMSNorm pre-LN), so use grad_rollout or rollout/flow there."
            )

    def edge_weights(self, trace: AttentionTrace, options: Options) -> EdgeWeights:
        return self._weights(trace, options)  # already rows summing to 1 (cross-attention: the residual's last)


class ValueZeroing(Method):
    """Value zeroing, Mohebbi, Zuidema, Chrupała & Alishahi (EACL 2023): for each layer and token ``j``, the
    layer (the whole block: attention, feed-forward, norms) is re-run on its original input with ``j``'s value
    vectors zeroed in every head, the attention weights unchanged; ``[i, j]`` is the cosine distance between
    token ``i``'s original output and this one (in float64), rows normalised to sum to 1, then rolled out
    across layers by plain matrix products (no residual added, as in the paper's code). Padding is 0, and
    so are a causal stream's future tokens (``j > i``).

    Encoder-decoders (BART, Marian, mBART): a decoder layer is re-run with a decoder token's values zeroed in
    its self-attention (``d_self``) and with an encoder token's values zeroed in its cross-attention
    (``d_cross``, the distances of the same layer output); each decoder row is normalised over both together,
    ``[d_cross, d_self] / (Σ d_cross + Σ d_self)``. Routed as ALTI+ is: the self-attention layer's edges are
    ``d_self`` normalised, the cross-attention layer's ``[d_cross, Σ_j d_self]`` normalised, the residual's share
    last, so the decoder's rows come as ``{"encoder": ..., "decoder": ...}`` and sum to 1 together (per layer,
    ``all_layers``, the decoder comes after each sublayer, self- and cross-attention alike).

    The adapter computes the per-layer distances at capture time, ``capture(..., value_zeroing=True)``: about
    one forward pass of each layer per token (per token of each stream a layer reads), for every item."""

    name = "value_zeroing"
    row_sum = "one"
    needs = ("weights", "value_zeroing")
    cumulative = True
    reference = MOHEBBI
    edge_residual = 0.0
    order = 43

    def check(self, trace: AttentionTrace) -> None:
        bare = [layer.name for layer in trace.layers if layer.kind == "cross" and "value_zeroing" not in layer.extras]
        if bare and any("value_zeroing" in layer.extras for layer in trace.layers):
            raise MethodError(
                f"value_zeroing on an encoder-decoder needs the cross-attention layers zeroed too, and {bare[0]!r} "
                "has no scores: this trace was captured with self-attention zeroed only (by an older attnflow, or "
                "built by hand). Capture it again with attnflow.capture(model, ..., value_zeroing=True), which zeroes "
                "the cross-attention of the families whose path map (attnflow.adapters.register_value_map) has a "
                "cross part (BART, Marian, mBART)."
            )
        super().check(trace)

    def compute(self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None,
                all_layers: bool) -> Scores:
        return rollout_scores(trace, options.replace(weights=self.name), stream=stream, sources=sources,
                              all_layers=all_layers)

    def edge_weights(self, trace: AttentionTrace, options: Options) -> EdgeWeights:
        def weights(index: int, b: int) -> np.ndarray:
            layer = trace.layers[index]
            own = _zeroing_distances(trace, index, b)
            if layer.kind != "cross" or _pooled(trace, layer):
                return normalise_rows(own)
            partner = _self_partner(trace, index)
            residual = _zeroing_distances(trace, partner, b).sum(axis=-1, keepdims=True)
            return normalise_rows(np.concatenate([own, residual], axis=1))  # the residual's share last, as ALTI+

        return weights


def _pooled(trace: AttentionTrace, layer: LayerAttention) -> bool:
    """Whether a cross-attention layer reads keys pooled from its own queries (SegFormer's spatial reduction: the key
    stream is linked from the query stream), so that its block has no self-attention partner to share rows with."""
    return any(link.stream == layer.key_stream and link.source == layer.query_stream for link in trace.links)


def _zeroing_distances(trace: AttentionTrace, index: int, b: int) -> np.ndarray:
    """One layer's value-zeroing distances over the real tokens of item ``b``, future keys of a causal
    self-attention layer set to 0."""
    layer = trace.layers[index]
    query, key = layer_streams(layer)
    rows, cols = trace.valid_index(b, query), trace.valid_index(b, key)
    scores = np.asarray(layer.extras["value_zeroing"][b], np.float64)[np.ix_(rows, cols)]
    if layer.kind == "self" and trace.streams[query].causal:
        scores = np.where(rows[:, None] >= cols[None, :], scores, 0.0)
    return scores


def _self_partner(trace: AttentionTrace, index: int) -> int:
    """The self-attention layer of the same block as cross-attention layer ``index``: the last self-attention
    layer of its query stream before it (its output is what the cross-attention block adds to)."""
    query = trace.layers[index].query_stream
    for earlier in range(index - 1, -1, -1):
        layer = trace.layers[earlier]
        if layer.kind == "self" and layer.query_stream == query:
            return earlier
    raise MethodError(
        f"value_zeroing: cross-attention layer {trace.layers[index].name!r} has no self-attention layer of stream "
        f"{query!r} before it, whose distances its rows are normalised with."
    )


def _effective(trace: AttentionTrace, index: int, b: int, heads: list[int] | None, fusion: str) -> np.ndarray:
    block = Block(trace, index, b, heads)
    out = []
    for attention, transformed in zip(block.attention, block.transformed):  # per head: (q, k), (k, d)
        u, s, _ = np.linalg.svd(transformed, full_matrices=False)
        rank = int((s > s.max(initial=0.0) * max(transformed.shape) * np.finfo(np.float64).eps).sum())
        basis = u[:, :rank]  # the column space of T = V W_O; its complement is T's left null space
        out.append(attention @ basis @ basis.T)
    return getattr(np.stack(out), fusion)(axis=0)


class EffectiveAttention(Method):
    """Effective attention, Brunner et al. (2020): each head's attention with the part in the left null space
    of ``T = V^h W_O^h`` removed (that part changes nothing in the output); it differs from the attention only
    where there are more tokens than ``T``'s rank (the head size). Heads fused by ``options.head_fusion``. A
    per-layer view; its values can be negative, so it is never routed through the network as capacities.
    Needs ``capture(..., values=True)``."""

    name = "effective_attention"
    needs = ("weights", "values")
    reference = BRUNNER
    order = 44

    def check(self, trace: AttentionTrace) -> None:
        _Decomposed.check(self, trace)  # type: ignore[arg-type]

    def compute(self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None,
                all_layers: bool) -> Scores:
        heads = head_choice(trace, options.heads, stream)
        return per_layer_scores(trace, options, stream, sources, all_layers,
                                lambda i, b: _effective(trace, i, b, heads.get(i), options.fusion(trace)))


def decomposition_identity(trace: AttentionTrace, index: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ_j T_i(x_j) + bias terms, the block's recorded output)`` of one layer and item: equal when the
    decomposition holds (a check the tests make)."""
    block = Block(trace, index, b)
    total = np.concatenate([block.shares(rows).sum(axis=1) for rows in block.chunks()], axis=0)
    return total + block.bias_terms(), block.output
