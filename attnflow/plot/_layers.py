"""Layer numbers as every output shows them (docs/format.md, "Layer numbers").

Layers are numbered from 1, counting the explained stream's attention layers in model order (a decoder's
self- and cross-attention layers both count): layer ``l`` of ``L`` is the ``l``-th, and scores "after
layer ``l``" are after it. Python's indices (``Options.layers``, ``Explanation.layer_indices``,
``trace.layers[i]``) stay 0-based: index ``i`` of a stream's layers is layer ``i + 1``. Where one layer is
shown alone, its module name follows.
"""

from __future__ import annotations

from typing import Any

#: One sentence for headers and files: what the layer numbers mean.
NUMBERING = "layers numbered from 1 (layer l = after the l-th attention layer of the explained stream)"


def stream_layer(trace: Any, index: int) -> tuple[int, int, str]:
    """``(number, count, stream)`` of trace layer ``index``: its number from 1 among the layers whose queries
    are its query stream's tokens, how many those are, and that stream."""
    from ..methods._fusion import stream_layer_indices

    index = int(index) % trace.num_layers
    stream = trace.layers[index].query_stream
    own = stream_layer_indices(trace, stream)
    return own.index(index) + 1, len(own), stream


def layer_label(trace: Any, index: int, *, name: bool = True) -> str:
    """``"layer 4 of 4 of the decoder (model.decoder.layers.1.encoder_attn)"`` for trace layer ``index`` (the
    stream is named when the trace has several; the module name with ``name``)."""
    number, count, stream = stream_layer(trace, index)
    text = f"layer {number} of {count}" + (f" of the {stream}" if len(trace.streams) > 1 else "")
    return text + (f" ({trace.layers[int(index) % trace.num_layers].name})" if name else "")


def short_label(trace: Any, index: int) -> str:
    """``"L4"`` (``"decoder L4"`` when the trace has several streams) for trace layer ``index``."""
    number, _, stream = stream_layer(trace, index)
    return (f"{stream} " if len(trace.streams) > 1 else "") + f"L{number}"


def explained_layer_count(explanation: Any) -> int | None:
    """How many layers the explained stream has, where the explanation says (every layer took part), else None."""
    if explanation.options.layers is not None:
        return None
    return max(i for m in explanation.methods for i in explanation.layer_indices(m)) + 1


def after_layer(explanation: Any, index: int) -> str:
    """``"after layer 4 of 6"`` for an index among the explained stream's layers (``"after layer 4"`` when the
    count is unknown: some layers left out with ``Options.layers``)."""
    count = explained_layer_count(explanation)
    return f"after layer {int(index) + 1}" + (f" of {count}" if count is not None else "")
