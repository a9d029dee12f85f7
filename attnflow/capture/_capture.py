"""capture() and attach(): run a model with an adapter's hooks and collect its attention."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .._errors import AdapterError
from ..trace import AttentionTrace
from ._adapter import Adapter, check_adapter_options
from ._recorder import NO_TARGET, CaptureRequest, Recorder
from ._registry import find_adapter, list_adapters


@contextmanager
def attach(
    model: Any, *, adapter: str | Adapter | None = None, tokens: Any = None, target: Any = NO_TARGET,
    target_position: int | None = None, values: bool = False, value_zeroing: bool = False,
    generation: str | None = None, head_fusion: str | None = None, dtype: str | None = None, **options: Any
) -> Iterator[Recorder]:
    """Record attention of every forward pass run inside the block.

    Args:
        model: the model (a ``torch.nn.Module``, a transformers model, a Flax module...).
        adapter: an adapter name or instance; default: the first registered adapter that claims ``model``.
        tokens: token labels (per batch item) or a tokenizer with ``convert_ids_to_tokens`` or ``decode``.
        target: also record, per layer, the gradient of a target score with respect to the attention
            probabilities (extra ``"attn_grad"``, for gradient-weighted methods): an int indexes the last axis
            of the model's logits (a class, or a vocabulary id), None takes each item's argmax, a callable
            ``target(output)`` returns per-item scores. Scores are per item (summed for one backward pass).
            Autograd is switched on for the pass even inside ``torch.no_grad()``; parameters' ``.grad`` are
            left untouched.
        target_position: where the logits are read along the sequence (default: the classification token for
            classifiers, each item's last real token for decoders).
        values: also record the value-side tensors of each layer (for norm-based methods and ALTI).
        value_zeroing: also compute value-zeroing scores per layer (re-runs each layer once per token).
        generation: how each ``model.generate(...)`` call inside the block becomes one trace over the prompt
            and the generated tokens (all but the last, which no forward pass reads): ``"stitch"`` (the
            default) lays the prefill pass and the one-query cached steps end to end, exactly the attention
            of one teacher-forced pass; ``"rerun"`` runs that teacher-forced pass after ``generate()`` returns
            (for beam search and assisted generation, which cannot be stitched, and for ``target=`` or
            ``values=``). The generation's output is not changed. ``rec.steps`` has the raw steps.
        head_fusion: fuse each layer's heads as it is captured (``"mean"``, ``"max"``, ``"min"``), inside the
            hook and on the model's device where the adapter can: the trace holds ``L·n²`` values instead of
            ``L·H·n²`` (for long inputs). Rollout and flow follow it; methods that need heads refuse.
        dtype: store the weights as ``"float16"``, ``"float32"`` or ``"bfloat16"`` (rounded, kept as float32).
        **options: adapter options (e.g. module selectors for the generic PyTorch adapter).

    Yields:
        A :class:`Recorder`; after the pass, ``rec.trace`` is an :class:`AttentionTrace` (``rec.traces``: one
        per forward pass or ``generate()`` call). The hooks are removed (and any switched attention
        implementation restored) when the block exits, also on error.
    """
    request = CaptureRequest(target=target, target_position=target_position, values=bool(values),
                             value_zeroing=bool(value_zeroing), generation=generation, head_fusion=head_fusion,
                             dtype=dtype)
    chosen = find_adapter(model, adapter, options)
    options = check_adapter_options(chosen, options)
    missing = sorted(request.needs() - set(chosen.captures))
    if missing:
        able = sorted(a.name for a in list_adapters() if set(missing) <= set(a.captures))
        where = f" (adapters that capture them: {', '.join(able)})" if able else ""
        raise AdapterError(
            f"Adapter {chosen.name!r} cannot capture {missing} (it captures {sorted(chosen.captures)}). "
            f"Use an adapter that declares them{where}, or capture the attention weights alone."
        )
    recorder = Recorder(
        framework=chosen.array_library or chosen.framework, model_name=chosen.model_name(model), tokens=tokens,
        adapter=chosen.name, request=request,
    )
    with chosen.hooks(model, recorder, **options):
        yield recorder


def capture(
    model: Any,
    *args: Any,
    adapter: str | Adapter | None = None,
    tokens: Any = None,
    adapter_options: Mapping[str, Any] | None = None,
    target: Any = NO_TARGET,
    target_position: int | None = None,
    values: bool = False,
    value_zeroing: bool = False,
    head_fusion: str | None = None,
    dtype: str | None = None,
    **kwargs: Any,
) -> AttentionTrace:
    """Run ``model`` once on ``*args, **kwargs`` and return its attention as an :class:`AttentionTrace`.

    ``adapter``, ``tokens``, ``adapter_options``, ``target``, ``target_position``, ``values``,
    ``value_zeroing``, ``head_fusion`` and ``dtype`` are attnflow's (see :func:`attach`); everything else goes
    to the model (for Flax linen, ``capture(model, variables, x)`` runs ``model.apply(variables, x)``).

    Returns:
        The trace: per layer ``(batch, heads, query, key)`` probabilities plus mask and labels (``heads`` 1
        with ``head_fusion``).
    """
    chosen = find_adapter(model, adapter, adapter_options)
    with attach(model, adapter=chosen, tokens=tokens, target=target, target_position=target_position, values=values,
                value_zeroing=value_zeroing, head_fusion=head_fusion, dtype=dtype,
                **dict(adapter_options or {})) as recorder:
        chosen.run(model, *args, **kwargs)
    return recorder.trace
