"""References the project trusts, written from the papers' definitions (not from attnflow's code).

* [`paper_rollout`][attnflow.testing.paper_rollout]: Abnar & Zuidema's released ``compute_joint_attention`` (numpy).
* [`paper_flow`][attnflow.testing.paper_flow]: their networkx max-flow per (output, input) pair.
* [`numpy_attention`][attnflow.testing.numpy_attention]: multi-head scaled dot-product attention probabilities in float64.
* [`eager_attention`][attnflow.testing.eager_attention]: what a Hugging Face model itself returns with ``output_attentions=True`` under
  eager attention, in the order the layers run (the conformance kit's default reference).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import numpy as np


def paper_rollout(att_mat: np.ndarray) -> np.ndarray:
    """``(layers, heads, n, n)`` of one item -> ``(layers, n, n)`` joint attention: heads averaged, ``+ I``,
    rows renormalised, multiplied layer by layer (``joint[l] = aug[l] @ joint[l - 1]``)."""
    att = att_mat.sum(axis=1) / att_mat.shape[1]
    aug = att + np.eye(att.shape[1])[None, ...]
    aug = aug / aug.sum(axis=-1)[..., None]
    joint = np.zeros(aug.shape)
    joint[0] = aug[0]
    for i in range(1, aug.shape[0]):
        joint[i] = aug[i].dot(joint[i - 1])
    return joint


def paper_flow(att_mat: np.ndarray, normalize: bool = True) -> np.ndarray:
    """``(layers, heads, n, n)`` of one item -> ``(n, n)`` flows from the last layer, by networkx
    Edmonds-Karp per pair on the paper's layered graph (``networkx`` must be installed)."""
    import networkx as nx

    att = att_mat.sum(axis=1) / att_mat.shape[1]
    aug = att + np.eye(att.shape[1])[None, ...]
    aug = aug / aug.sum(axis=-1)[..., None]
    layers, n, _ = aug.shape
    graph = nx.DiGraph()
    for i in range(1, layers + 1):
        for a in range(n):
            for b in range(n):
                if aug[i - 1][a][b] > 0:
                    graph.add_edge(i * n + a, (i - 1) * n + b, capacity=aug[i - 1][a][b])
    flows = np.zeros((n, n))
    for out in range(n):
        for inp in range(n):
            if layers * n + out in graph and inp in graph:
                flows[out, inp] = nx.maximum_flow_value(
                    graph, layers * n + out, inp, flow_func=nx.algorithms.flow.edmonds_karp
                )
        if normalize and flows[out].sum() > 0:
            flows[out] /= flows[out].sum()
    return flows


def numpy_attention(q: np.ndarray, k: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Probabilities ``softmax(q k^T / sqrt(d))`` of ``(batch, heads, q, d)`` and ``(batch, heads, k, d)``;
    ``mask`` (broadcastable to ``(batch, heads, q, k)``) is False where attention is not allowed."""
    scores = np.einsum("bhqd,bhkd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64)) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(np.asarray(mask, bool), scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=-1, keepdims=True)


def eager_attention(model: Any, inputs: tuple[tuple, dict]) -> list[tuple[str | None, str | None, Any]] | None:
    """A Hugging Face model's own attention (a copy switched to eager, ``output_attentions=True``), per layer
    in execution order: ``encoder_attentions``, then each decoder layer's self- and cross-attention; or
    ``attentions``. None for other models."""
    transformers = sys.modules.get("transformers")
    torch = sys.modules.get("torch")
    if transformers is None or torch is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    args, kwargs = inputs
    with torch.no_grad():
        out = reference(*args, **kwargs, output_attentions=True)
    if getattr(out, "encoder_attentions", None):
        layers: list[tuple[str | None, str | None, Any]] = [("encoder", None, a) for a in out.encoder_attentions]
        for self_attention, cross in zip(out.decoder_attentions, out.cross_attentions):
            layers += [("decoder", None, self_attention), ("decoder", "encoder", cross)]
        return layers
    found = getattr(out, "attentions", None)
    return None if not found else [(None, None, a) for a in found]
