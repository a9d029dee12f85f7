"""attnflow's own methods, registered through the ``attnflow.methods`` entry points like any plugin."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..network._network import explained_stream
from ..trace import AttentionTrace
from ._flow import flow_scores, local_sources
from ._fusion import discard_lowest, fuse_heads, head_choice, select_layers
from ._options import Options
from ._registry import Method, Scores
from ._rollout import rollout_scores

ABNAR_ZUIDEMA = "Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020"


class Raw(Method):
    """Raw attention of each layer, heads fused (``options.head_fusion``, ``options.heads``): a per-layer
    view; row ``s`` of layer ``l`` is what output token ``s`` attends to in that layer alone."""

    name = "raw"
    row_sum = "one"
    order = 0
    reference = ABNAR_ZUIDEMA + " (the baseline they compare against)"

    def compute(
        self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None, all_layers: bool
    ) -> Scores:
        explained = explained_stream(trace, stream)
        chosen = select_layers(trace, options.layers, explained)
        if not all_layers:
            chosen = chosen[-1:]
        heads = head_choice(trace, options.heads, explained)
        plans = [local_sources(trace, explained, b, sources) for b in range(trace.batch_size)]
        rows = trace.streams[explained].length if sources is None else len(sources)
        keys = [name for name in trace.streams if any(trace.layers[i].key_stream == name for i in chosen)]
        result = {name: np.zeros((len(chosen), trace.batch_size, rows, trace.streams[name].length)) for name in keys}
        for d, index in enumerate(chosen):
            layer = trace.layers[index]
            weights = layer.weights if index not in heads else layer.weights[:, list(heads[index])]
            fused = fuse_heads(weights, options.fusion(trace))
            for b, (local, out_rows) in enumerate(plans):
                q = trace.valid_index(b, layer.query_stream)
                k = trace.valid_index(b, layer.key_stream)
                matrix = fused[b][np.ix_(q, k)]
                if options.discard_ratio:
                    matrix = discard_lowest(matrix, options.discard_ratio)
                result[layer.key_stream][d, b][np.ix_(np.asarray(out_rows, dtype=np.intp), k)] = matrix[local]  # type: ignore[index]
        return result


class Rollout(Method):
    """Attention rollout: proportional routing through the attention network (see [`attnflow.rollout`][attnflow.rollout])."""

    name = "rollout"
    row_sum = "one"
    order = 10
    cumulative = True
    reference = ABNAR_ZUIDEMA

    def compute(
        self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None, all_layers: bool
    ) -> Scores:
        return rollout_scores(trace, options, stream=stream, sources=sources, all_layers=all_layers)


class Flow(Method):
    """Attention flow: max-flow through the attention network (see [`attnflow.flow`][attnflow.flow]). Every layer
    costs about as much as the last, so [`attnflow.explain`][attnflow.explain] computes only the last unless asked."""

    name = "flow"
    order = 20
    cumulative = True
    all_layers_by_default = False
    reference = ABNAR_ZUIDEMA

    def compute(
        self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None, all_layers: bool
    ) -> Scores:
        return flow_scores(trace, options, stream=stream, sources=sources, all_layers=all_layers)
