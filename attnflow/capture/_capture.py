"""capture() and attach(): run a model with an adapter's hooks and collect its attention."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..trace import AttentionTrace
from ._adapter import Adapter, Recorder, check_adapter_options
from ._registry import find_adapter


@contextmanager
def attach(
    model: Any, *, adapter: str | Adapter | None = None, tokens: Any = None, **options: Any
) -> Iterator[Recorder]:
    """Record attention of every forward pass run inside the block.

    Args:
        model: the model (a ``torch.nn.Module``, a transformers model, a Flax module...).
        adapter: an adapter name or instance; default: the first registered adapter that claims ``model``.
        tokens: token labels (per batch item) or a tokenizer with ``convert_ids_to_tokens`` or ``decode``.
        **options: adapter options (e.g. module selectors for the generic PyTorch adapter).

    Yields:
        A :class:`Recorder`; after the pass, ``rec.trace`` is an :class:`AttentionTrace`. The hooks are
        removed (and any switched attention implementation restored) when the block exits, also on error.
    """
    chosen = find_adapter(model, adapter, options)
    options = check_adapter_options(chosen, options)
    recorder = Recorder(
        framework=chosen.array_library or chosen.framework, model_name=chosen.model_name(model), tokens=tokens,
        adapter=chosen.name,
    )
    with chosen.hooks(model, recorder, **options):
        yield recorder


def capture(
    model: Any,
    *args: Any,
    adapter: str | Adapter | None = None,
    tokens: Any = None,
    adapter_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> AttentionTrace:
    """Run ``model`` once on ``*args, **kwargs`` and return its attention as an :class:`AttentionTrace`.

    ``adapter``, ``tokens`` and ``adapter_options`` are attnflow's; everything else goes to the model
    (for Flax linen, ``capture(model, variables, x)`` runs ``model.apply(variables, x)``).

    Returns:
        The trace: per layer ``(batch, heads, query, key)`` probabilities plus mask and labels.
    """
    chosen = find_adapter(model, adapter, adapter_options)
    with attach(model, adapter=chosen, tokens=tokens, **dict(adapter_options or {})) as recorder:
        chosen.run(model, *args, **kwargs)
    return recorder.trace
