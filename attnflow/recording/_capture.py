"""capture() and attach(): run a model with an adapter's hooks and collect its attention."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

from .._errors import AdapterError, CaptureUnavailableError
from ..methods._registry import Method
from ..trace import AttentionTrace
from ._adapter import Adapter, check_adapter_options
from ._plan import CapturePlan, capture_plan
from ._recorder import NO_TARGET, CaptureRequest, Recorder
from ._registry import ADAPTERS, find_adapter

Methods = Iterable[str | Method] | str | None


@contextmanager
def attach(
    model: Any, *, adapter: str | Adapter | None = None, tokens: Any = None, methods: Methods = None,
    target: Any = NO_TARGET,
    target_position: int | None = None, values: bool = False, value_zeroing: bool = False,
    generation: str | None = None, head_fusion: str | None = None, dtype: str | None = None, **options: Any
) -> Iterator[Recorder]:
    """Record attention of every forward pass run inside the block.

    Args:
        model: the model (a ``torch.nn.Module``, a transformers model, a Flax module...).
        adapter: an adapter name or instance; default: the first registered adapter that claims ``model``.
        tokens: token labels (per batch item) or a tokenizer with ``convert_ids_to_tokens`` or ``decode``.
        methods: record what these methods need (method names, a comma-separated string, or ``"all"``); see
            `attnflow.capture_plan`. Needs the adapter cannot capture are refused in one message, naming
            each; with ``"all"`` the methods it cannot serve are skipped, also where the model turns out not to
            support a kind (e.g. a family without a value path map), and ``trace.metadata["skipped_methods"]``
            says why. Methods that need attention gradients get ``target`` (default None: the argmax logit, or
            for a model without logits the ``"embedding"`` target). Adds to ``target``/``values``/
            ``value_zeroing`` given explicitly.
        target: also record, per layer, the gradient of a target score with respect to the attention
            probabilities (extra ``"attn_grad"``, for gradient-weighted methods): an int indexes the last axis
            of the model's logits (a class, or a vocabulary id), None takes each item's argmax, a callable
            ``target(output)`` returns per-item scores, ``"embedding"`` takes the projection of each item's
            mean-pooled last hidden state on its own direction (held fixed: ``⟨h, h₀/‖h₀‖⟩``, for models
            without logits; the cosine to the unablated embedding has zero gradient there). Scores are per item (summed for one backward pass).
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
        A [`Recorder`][attnflow.recording.Recorder]; after the pass, ``rec.trace`` is an [`AttentionTrace`][attnflow.AttentionTrace] (``rec.traces``: one
        per forward pass or ``generate()`` call). The hooks are removed (and any switched attention
        implementation restored) when the block exits, also on error.

    Examples:
        One encoder layer, two heads; the recorder holds the trace of the calls made inside the block:

        >>> import torch
        >>> import attnflow
        >>> encoder = torch.nn.TransformerEncoder(
        ...     torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1, enable_nested_tensor=False,
        ... ).eval()
        >>> with attnflow.attach(encoder) as recorder:
        ...     _ = encoder(torch.zeros(2, 4, 8))  # (batch, tokens, features)
        >>> recorder.trace.layers[0].shape  # (batch, heads, query, key)
        (2, 2, 4, 4)
    """
    chosen = find_adapter(model, adapter, options)
    options = check_adapter_options(chosen, options)
    plan = None if methods is None else capture_plan(methods, chosen)
    while True:
        request = _request(plan, target=target, target_position=target_position, values=values,
                           value_zeroing=value_zeroing, generation=generation, head_fusion=head_fusion, dtype=dtype)
        _check_captures(chosen, request)
        recorder = Recorder(
            framework=chosen.array_library or chosen.framework, model_name=chosen.model_name(model), tokens=tokens,
            adapter=chosen.name, request=request,
        )
        stack = ExitStack()
        try:
            stack.enter_context(chosen.hooks(model, recorder, **options))
        except CaptureUnavailableError as exc:
            if plan is None or not plan.everything or exc.kind not in plan.kinds or exc.kind == "weights":
                raise
            plan = plan.without(exc.kind, f"{exc}")  # installing failed: nothing is left on the model
            continue
        break
    with stack:
        yield recorder


def _request(plan: CapturePlan | None, *, target: Any, values: bool, value_zeroing: bool, **rest: Any) -> CaptureRequest:
    """The capture request: the explicit keywords, plus what the plan's methods need."""
    if plan is None:
        return CaptureRequest(target=target, values=bool(values), value_zeroing=bool(value_zeroing), **rest)
    wanted = plan.keywords(None if target is NO_TARGET else target)
    if plan.everything and "attn_grad" not in plan.kinds:
        target = NO_TARGET  # the methods that read gradients were skipped: the target serves none of them
    return CaptureRequest(
        target=wanted.get("target", target), values=bool(values) or bool(wanted.get("values")),
        value_zeroing=bool(value_zeroing) or bool(wanted.get("value_zeroing")),
        skipped=tuple(plan.skipped.items()), **rest,
    )


def _check_captures(chosen: Adapter, request: CaptureRequest) -> None:
    missing = sorted(request.needs() - set(chosen.captures))
    if missing:
        able = sorted(a.name for a in ADAPTERS.instances() if set(missing) <= set(a.captures))
        where = f" (adapters that capture them: {', '.join(able)})" if able else ""
        raise AdapterError(
            f"Adapter {chosen.name!r} cannot capture {missing} (it captures {sorted(chosen.captures)}). "
            f"Use an adapter that declares them{where}, or capture the attention weights alone."
        )


def capture(
    model: Any,
    *args: Any,
    adapter: str | Adapter | None = None,
    tokens: Any = None,
    adapter_options: Mapping[str, Any] | None = None,
    methods: Methods = None,
    target: Any = NO_TARGET,
    target_position: int | None = None,
    values: bool = False,
    value_zeroing: bool = False,
    head_fusion: str | None = None,
    dtype: str | None = None,
    **kwargs: Any,
) -> AttentionTrace:
    """Run ``model`` once on ``*args, **kwargs`` and return its attention as an [`AttentionTrace`][attnflow.AttentionTrace].

    ``adapter``, ``tokens``, ``adapter_options``, ``methods``, ``target``, ``target_position``, ``values``,
    ``value_zeroing``, ``head_fusion`` and ``dtype`` are attnflow's (see [`attach`][attnflow.attach]); everything else goes
    to the model (for Flax linen, ``capture(model, variables, x)`` runs ``model.apply(variables, x)``).

    Returns:
        The trace: per layer ``(batch, heads, query, key)`` probabilities plus mask and labels (``heads`` 1
        with ``head_fusion``).

    Examples:
        >>> import torch
        >>> import attnflow
        >>> _ = torch.manual_seed(0)
        >>> layer = torch.nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=16, batch_first=True)
        >>> model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
        >>> x = torch.randn(1, 3, 8)  # (batch, tokens, features)
        >>> trace = attnflow.capture(model, x)
        >>> trace
        AttentionTrace(layers=2, batch=1, heads=2, seq=3, causal=False, framework='torch', model='TransformerEncoder')
        >>> trace.layers[0].shape  # (batch, heads, query, key)
        (1, 2, 3, 3)
    """
    chosen = find_adapter(model, adapter, adapter_options)
    with attach(model, adapter=chosen, tokens=tokens, methods=methods, target=target, target_position=target_position, values=values,
                value_zeroing=value_zeroing, head_fusion=head_fusion, dtype=dtype,
                **dict(adapter_options or {})) as recorder:
        chosen.run(model, *args, **kwargs)
    return recorder.trace
