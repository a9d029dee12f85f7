"""The method author's kit: base classes for the two shapes a method takes, with sources, padding and layer
selection handled for the author.

- [`LayerMethod`][attnflow.LayerMethod]: a per-layer view. Implement [`LayerMethod.layer_scores`][attnflow.LayerMethod.layer_scores], one ``(queries, keys)``
  matrix over the real tokens of one layer and item; the kit selects the layers (``Options.layers``), picks
  the explained rows, places them in the padded ``(layers, batch, sources, tokens)`` result and leaves
  padding at 0.
- [`RoutedMethod`][attnflow.RoutedMethod]: a method routed through the trace's network like rollout. Implement
  [`RoutedMethod.edge_scores`][attnflow.RoutedMethod.edge_scores], the weights of one layer's edges over real tokens (the kit normalises
  each row to sum to 1 and mixes in the residual ``edge_residual``, default ``Options.residual``); the
  result is the proportional routing of those edges from the explained tokens to the inputs, across streams,
  and ``rollout``/``flow`` with ``Options(weights=NAME)`` route through the same edges.

A new method is then a few lines; [`attnflow.testing.check_method`][attnflow.testing.check_method] holds it to the invariants every
method keeps. See ``docs/methods.md``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

from .._errors import MethodError
from ..network._network import EdgeWeights
from ..trace import AttentionTrace
from ._decompose import normalise_rows
from ._options import Options
from ._registry import Method, Scores


class LayerMethod(Method):
    """Base class of per-layer methods (like raw attention): one matrix per layer, no routing.

    Subclasses set ``name`` (and ``needs``, ``reference``, ``row_sum`` as they apply) and implement
    [`layer_scores`][attnflow.LayerMethod.layer_scores].
    """

    cumulative = False

    @abc.abstractmethod
    def layer_scores(self, trace: AttentionTrace, layer: int, item: int, options: Options) -> np.ndarray:
        """``(q, k)`` scores of layer ``layer`` (an index into ``trace.layers``) for batch item ``item``, over
        the real tokens only: ``q`` = ``trace.valid_index(item, layer's query stream).size``, ``k`` the same for
        its key stream (``trace.layers[layer].extras`` holds what ``needs`` asked the capture for)."""

    def compute(self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None,
                all_layers: bool) -> Scores:
        """Scores of ``stream``'s output tokens ``sources`` from [`layer_scores`][attnflow.LayerMethod.layer_scores],
        layer by layer: input stream -> ``(layers, batch, sources, input length)`` (``layers`` is 1 unless
        ``all_layers``)."""
        from ._contributions import per_layer_scores

        return per_layer_scores(trace, options, stream, sources, all_layers, lambda i, b: self._checked(
            trace, i, b, self.layer_scores(trace, i, b, options)))

    def _checked(self, trace: AttentionTrace, index: int, item: int, matrix: np.ndarray) -> np.ndarray:
        layer = trace.layers[index]
        expected = (trace.valid_index(item, layer.query_stream).size, trace.valid_index(item, layer.key_stream).size)
        out = np.asarray(matrix, dtype=np.float64)
        if out.shape != expected:
            raise MethodError(
                f"Method {self.name!r} returned {out.shape} scores for layer {layer.name!r}, item {item}; expected "
                f"{expected} (the real query tokens x the real key tokens)."
            )
        return out


class RoutedMethod(Method):
    """Base class of methods routed through the network (like rollout): edge weights per layer, routed
    proportionally from the explained tokens down to the input tokens, across streams.

    Subclasses set ``name`` (and ``needs``, ``reference``) and implement [`edge_scores`][attnflow.RoutedMethod.edge_scores]; set
    ``edge_residual`` to 0 when the scores already account for the residual connection.
    """

    cumulative = True
    row_sum = "one"

    @abc.abstractmethod
    def edge_scores(self, trace: AttentionTrace, layer: int, item: int, options: Options) -> np.ndarray:
        """``(q, k)`` non-negative weights of layer ``layer``'s edges for item ``item`` over the real tokens
        (``q`` real query tokens, ``k`` real key tokens); each row is normalised to sum to 1 by the kit."""

    def edge_weights(self, trace: AttentionTrace, options: Options) -> EdgeWeights:
        """A function ``(layer index, item) -> (q, k)`` float64 matrix of the normalised
        [`edge_scores`][attnflow.RoutedMethod.edge_scores] over the real tokens, checked (shape, finite,
        non-negative) and each row summing to 1."""
        def weights(index: int, item: int) -> np.ndarray:
            layer = trace.layers[index]
            expected = (trace.valid_index(item, layer.query_stream).size,
                        trace.valid_index(item, layer.key_stream).size)
            out = np.asarray(self.edge_scores(trace, index, item, options), dtype=np.float64)
            if out.shape != expected or not np.isfinite(out).all() or (out < 0).any():
                raise MethodError(
                    f"Method {self.name!r} returned edge scores of shape {out.shape} for layer {layer.name!r}, item "
                    f"{item}; expected finite non-negative weights of shape {expected} (real queries x real keys)."
                )
            return normalise_rows(out)

        return weights

    def compute(self, trace: AttentionTrace, options: Options, *, stream: str, sources: Sequence[int] | None,
                all_layers: bool) -> Scores:
        """Scores of ``stream``'s output tokens ``sources``: rollout through the
        [`edge_weights`][attnflow.RoutedMethod.edge_weights]; input stream ->
        ``(layers, batch, sources, input length)`` (``layers`` is 1 unless ``all_layers``)."""
        from ._rollout import rollout_scores

        return rollout_scores(trace, options, stream=stream, sources=sources, all_layers=all_layers, method=self)
