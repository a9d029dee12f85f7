"""The generic PyTorch adapter: forward hooks on attention modules that return their weights.

Works with any ``torch.nn.Module`` whose attention modules return ``(output, weights)``. By default it
hooks every ``torch.nn.MultiheadAttention`` (inside ``nn.TransformerEncoder``/``Decoder`` or a model of
your own) and asks each call for per-head weights (``need_weights=True, average_attn_weights=False``);
what the caller receives is put back to what it asked for. Other modules are selected with the
``modules=`` option::

    with attnflow.attach(model, modules=["blocks.*.attn"]) as rec:    # glob over module paths
        model(x)
    trace = attnflow.capture(model, x, adapter_options={"modules": [MyAttention]})  # or by class

torch is imported inside methods only: ``import attnflow`` and loading this entry point never import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import attnflow
from attnflow.capture import deferred_interrupts, switch

from . import _torch_common as common
from ._hf_families import pick_key_stream, plan_streams

# torch.nn.MultiheadAttention.forward's parameters, in order (to rewrite them when passed positionally).
_MHA_PARAMS = (
    "query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal",
)
_MHA_DEFAULTS = {"need_weights": True, "average_attn_weights": True}
# An additive float key_padding_mask entry at or below this marks padding (PyTorch uses -inf; old code -1e4).
_MASKED_BELOW = -1e4


def _get_arg(args: list, kwargs: dict, name: str, default: Any = None) -> Any:
    index = _MHA_PARAMS.index(name)
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _set_arg(args: list, kwargs: dict, name: str, value: Any) -> None:
    index = _MHA_PARAMS.index(name)
    if len(args) > index:
        args[index] = value
    else:
        kwargs[name] = value


def _valid_from_padding_mask(torch: Any, mask: Any) -> Any:
    """``(batch, seq)`` numpy bool, True = real token, from an MHA ``key_padding_mask`` (True/-inf = padding)."""
    if not isinstance(mask, torch.Tensor):
        return None
    mask = mask.detach()
    valid = ~mask if mask.dtype == torch.bool else ~(mask <= _MASKED_BELOW)
    if valid.ndim == 1:
        valid = valid[None]
    return valid.cpu().numpy() if valid.ndim == 2 else None


def _same_tensor(torch: Any, a: Any, b: Any) -> bool:
    if a is b:
        return True
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    return bool(torch.equal(a, b))


class TorchAdapter(attnflow.Adapter):
    """Forward hooks on ``torch.nn.MultiheadAttention`` or on any module selected with ``modules=``.

    Options (``attach(model, **options)`` / ``capture(..., adapter_options={...})``):

    * ``modules``: module classes, glob patterns over module paths (``"encoder.layers.*.self_attn"``) or
      compiled regular expressions (fullmatch); default: every ``nn.MultiheadAttention``. A selected module
      must return its attention as ``output[output_index]``, shaped ``(batch, heads, query, key)``.
    * ``output_index``: where selected non-MHA modules return their weights (default 1).
    * ``disable_fastpath``: switch off PyTorch's fused MHA/TransformerEncoder fast path while attached
      (default True; the fast path skips ``MultiheadAttention.forward``, or feeds it nested tensors that
      hide the padding mask). The previous setting of ``torch.backends.mha`` is restored on exit. It is a
      process-wide switch: with False, padded batches through ``nn.TransformerEncoder`` may not capture.

    The trace's mask comes from the ``key_padding_mask`` the first self-attention MHA receives; token ids
    for labels from an ``input_ids`` keyword, or a first positional integer tensor shaped (batch, seq)
    (or (seq, batch), transposed).
    Layer names are module paths from ``model.named_modules()``; a module run twice in one pass is named
    ``path#1`` the second time. Keep the model in ``eval()`` mode: attention dropout breaks the rows.

    Self or cross: an ``nn.MultiheadAttention`` is ``"self"`` when its query and key are the same tensor.
    A module selected with ``modules=`` is judged by shape alone (square = ``"self"``), so a cross-attention
    module whose memory is as long as its queries would pass for self-attention: select only the
    self-attention modules for rollout and flow.
    """

    name = "torch"
    framework = "torch"
    extra = "torch"
    priority = 0
    options = (
        attnflow.AdapterOption("modules", None, None, "module classes, path globs or regexes of the attention modules"),
        attnflow.AdapterOption("output_index", int, 1, "where selected modules return their weights"),
        attnflow.AdapterOption("disable_fastpath", bool, True, "switch PyTorch's fused MHA fast path off"),
    )
    captures = frozenset({"weights", "streams"})

    def claims(self, model: Any) -> bool:
        torch = attnflow.import_optional("torch", self.extra)
        if not isinstance(model, torch.nn.Module):
            return False
        return any(isinstance(module, torch.nn.MultiheadAttention) for module in model.modules())

    def accepts(self, model: Any) -> bool:
        """Any ``torch.nn.Module``, once its attention modules are named with ``modules=``."""
        torch = attnflow.import_optional("torch", self.extra)
        return isinstance(model, torch.nn.Module)

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        return common.run_without_grad(model, args, kwargs)

    @contextmanager
    def hooks(
        self, model: Any, recorder: attnflow.Recorder, *, modules: Any = None, output_index: int = 1,
        disable_fastpath: bool = True,
    ) -> Iterator[None]:
        torch = attnflow.import_optional("torch", self.extra)
        if not isinstance(model, torch.nn.Module):
            raise attnflow.AdapterError(
                f"Adapter 'torch' captures torch.nn.Module models; got {type(model).__module__}.{type(model).__qualname__}."
            )
        if not isinstance(output_index, int) or isinstance(output_index, bool):
            raise attnflow.OptionError(f"Adapter 'torch': output_index must be an int, got {output_index!r}.")
        mha_class = torch.nn.MultiheadAttention
        if modules is None:
            targets = [(path, m) for path, m in model.named_modules() if isinstance(m, mha_class)]
            if not targets:
                raise attnflow.AdapterError(
                    f"Adapter 'torch': {type(model).__name__} contains no torch.nn.MultiheadAttention. Select the "
                    "modules that compute attention with modules=[ClassName] or modules=['glob.over.*.paths']; "
                    "they must return (output, weights)."
                )
        else:
            match = common.selector_matcher(self.name, modules, torch)
            targets = [(path, m) for path, m in model.named_modules() if match(path, m)]
            if not targets:
                raise common.no_match_error(self.name, model, modules)

        plan = plan_streams([path for path, _ in targets], None)
        passes = common.TorchPass(recorder, plan.streams)

        def describe_call(args: tuple, kwargs: dict) -> dict[str, Any]:
            ids = kwargs.get("input_ids", args[0] if args else None)
            return {"input_ids": common.int_ids(ids, torch), "metadata": {}}

        handles: list[Any] = []
        with _fastpath_off(torch) if disable_fastpath else nullcontext(), common.removing(handles):
            with deferred_interrupts():
                for path, module in targets:
                    name = common.layer_name(path, model)
                    if isinstance(module, mha_class):
                        self._hook_mha(torch, module, path, name, passes, handles)
                    else:
                        self._hook_module(torch, module, path, name, output_index, passes, handles)
                common.install_pass_hooks(model, passes, describe_call, handles)
            yield

    # -- per-module hooks ---------------------------------------------------------------------------
    def _hook_mha(
        self, torch: Any, module: Any, path: str, name: str, passes: common.TorchPass, handles: list
    ) -> None:
        calls: list[dict[str, Any]] = []  # one entry per running call of this module (a stack)

        def pre_hook(mod: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            args, kwargs = list(args), dict(kwargs)
            query, key = _get_arg(args, kwargs, "query"), _get_arg(args, kwargs, "key")
            calls.append({
                "need_weights": _get_arg(args, kwargs, "need_weights", _MHA_DEFAULTS["need_weights"]),
                "average": _get_arg(args, kwargs, "average_attn_weights", _MHA_DEFAULTS["average_attn_weights"]),
                "self": _same_tensor(torch, query, key),
                "padding": _get_arg(args, kwargs, "key_padding_mask"),
            })
            _set_arg(args, kwargs, "need_weights", True)
            _set_arg(args, kwargs, "average_attn_weights", False)
            return tuple(args), kwargs

        def hook(mod: Any, args: tuple, output: Any) -> Any:
            call = calls.pop() if calls else {"need_weights": True, "average": False, "self": True, "padding": None}
            weights = output[1]
            if weights is None:
                raise attnflow.HiddenAttentionError(
                    f"{name}: torch.nn.MultiheadAttention returned no weights although need_weights=True was "
                    "requested; another hook or a subclass overrides it."
                )
            if weights.ndim == 3:  # unbatched input: (heads, query, key)
                weights = weights[None]
            kind = "self" if call["self"] else "cross"
            passes.add(path, weights, kind=kind, training=mod.training and mod.dropout > 0, name=name)
            valid = _valid_from_padding_mask(torch, call["padding"])
            if valid is not None:  # the padding mask of this layer's keys
                stream = passes.stream_of(path) if kind == "self" else _key_stream(passes, path, weights)
                passes.recorder.describe_stream(stream, mask=valid)
            # Give the caller what it asked for.
            if not call["need_weights"]:
                return (output[0], None)
            if call["average"]:
                averaged = output[1].mean(dim=-3)
                return (output[0], averaged)
            return None

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        # prepend: under nested attaches the innermost hook sees the full weights first, and the outermost
        # one (whose pre-hook saw the caller's own request) runs last and gives the caller what it asked for.
        handles.append(module.register_forward_hook(hook, prepend=True))

        def forget(mod: Any, args: tuple, output: Any) -> None:  # the call raised: drop its stack entry
            if calls and output is None:
                calls.pop()

        handles.append(module.register_forward_hook(forget, always_call=True))

    def _hook_module(
        self, torch: Any, module: Any, path: str, name: str, index: int, passes: common.TorchPass, handles: list
    ) -> None:
        def hook(mod: Any, args: tuple, output: Any) -> None:
            try:
                if not isinstance(output, (tuple, list)):
                    raise TypeError
                weights = output[index]
            except (TypeError, IndexError):
                raise attnflow.AdapterError(
                    f"{name} ({type(mod).__name__}) returned {type(output).__name__}, which has no attention weights "
                    f"at output_index={index}. Select modules that return (output, weights), or set output_index."
                ) from None
            if weights is None:
                raise attnflow.HiddenAttentionError(
                    f"{name} ({type(mod).__name__}) returned None instead of attention weights at "
                    f"output_index={index}; make it return its weights (e.g. need_weights=True)."
                )
            if not isinstance(weights, torch.Tensor) or weights.ndim != 4:
                shape = tuple(weights.shape) if hasattr(weights, "shape") else type(weights).__name__
                raise attnflow.AdapterError(
                    f"{name} ({type(mod).__name__}) returned {shape} at output_index={index}; attnflow needs "
                    "per-head weights shaped (batch, heads, query, key)."
                )
            q, k = weights.shape[-2:]
            passes.add(path, weights, kind="self" if q == k else "cross", training=mod.training, name=name)

        handles.append(module.register_forward_hook(hook))

    # -- faithfulness (attnflow.faithfulness): blank-out and input gradients, in adapters/_faithfulness_torch.py
    captures = captures | {"input_gradients", "ablation"}

    def probe(self, model: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        from ._faithfulness_torch import probe

        return probe(model, request, args, kwargs)


def _key_stream(passes: common.TorchPass, path: str, weights: Any) -> str | None:
    """The stream a cross-attention MHA's keys belong to (None: the single stream's ``memory``)."""
    query = passes.stream_of(path)
    if query is None:
        return "memory"
    return pick_key_stream(query, int(weights.shape[-1]), passes.seen) or "memory"


def _fastpath_off(torch: Any) -> AbstractContextManager[Any]:
    """PyTorch's MHA fast path switched off; one flag for the whole process, so reference-counted: it is
    back as found once the last overlapping attach has left."""

    def turn_on() -> bool:
        before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        return before

    return switch("torch.backends.mha.fastpath", turn_on, lambda before: torch.backends.mha.set_fastpath_enabled(before))
