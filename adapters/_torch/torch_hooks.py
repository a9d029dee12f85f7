"""The generic PyTorch adapter: forward hooks on attention modules that return their weights.

Works with any ``torch.nn.Module`` whose attention modules return ``(output, weights)``. By default it
hooks every ``torch.nn.MultiheadAttention`` (inside ``nn.TransformerEncoder``/``Decoder`` or a model of
your own) and asks each call for per-head weights (``need_weights=True, average_attn_weights=False``);
what the caller receives is put back to what it asked for. Other modules are selected with the
``modules=`` option::

    with attnflow.attach(model, modules=["blocks.*.attn"]) as rec:    # glob over module paths
        model(x)
    trace = attnflow.capture(model, x, adapter_options={"modules": [MyAttention]})  # or by class

Modules that return no weights are captured at the softmax they compute: with ``layout=`` (the axis order of
their probabilities, ``"bhqk"``...), the output of the ``torch.softmax``/``F.softmax``/``Tensor.softmax`` over
the key axis, or the probabilities of the ``F.scaled_dot_product_attention`` call, computed during a selected
module's call is its attention (mask and causality are then read from the probabilities). A selected module
whose output *is* the pattern (TransformerLens ``blocks.*.attn.hook_pattern``) is taken as it is::

    trace = attnflow.capture(model, x, adapter_options={"modules": ["layers.*.attn"], "layout": "bhqk"})

torch is imported inside methods only: ``import attnflow`` and loading this entry point never import it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import attnflow
from attnflow.recording import deferred_interrupts, switch

from .._hf_families import pick_key_stream, plan_streams
from .._layout import Layout
from . import _torch_common as common

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
    * ``output_index``: where selected non-MHA modules return their weights (default 1). A selected module
      whose output is a single tensor returns the pattern itself (TransformerLens' ``hook_pattern``).
    * ``layout``: record the probabilities the selected modules *compute* instead of what they return: the
      softmax over the key axis of this axis order (``"bhqk"``, ``"bqhk"``, ``"bgnqk"``...: b batch, q query,
      k key, h heads, g key/value group; as the Flax adapters' ``layout=``) or the probabilities of the
      ``F.scaled_dot_product_attention`` call made during each selected call (one per call). A selected module
      that computes neither but returns a tensor of that layout is taken as the pattern. Mask and causality are
      read from the probabilities (a key no query attends to is padding).
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
        attnflow.AdapterOption(
            "layout", str, None,
            "record the softmax (or scaled_dot_product_attention) the selected modules compute, laid out as "
            "'bhqk', 'bqhk', 'bgnqk'... (b batch, q query, k key, h heads, g key/value group)",
        ),
    )
    captures = frozenset({"weights", "streams"})

    def claims(self, model: Any) -> bool:
        torch = attnflow.import_optional("torch", self.extra)
        model = common.unwrap(model)
        if not isinstance(model, torch.nn.Module):
            return False
        return any(isinstance(module, torch.nn.MultiheadAttention) for module in model.modules())

    def accepts(self, model: Any) -> bool:
        """Any ``torch.nn.Module``, once its attention modules are named with ``modules=``."""
        torch = attnflow.import_optional("torch", self.extra)
        return isinstance(common.unwrap(model), torch.nn.Module)

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        return common.run_without_grad(common.unwrap(model), args, kwargs)

    @contextmanager
    # override ignored: an adapter takes only the options it declares (attnflow.capture checks them first)
    def hooks(  # type: ignore[override]
        self, model: Any, recorder: attnflow.Recorder, *, modules: Any = None, output_index: int = 1,
        disable_fastpath: bool = True, layout: str | None = None,
    ) -> Iterator[None]:
        torch = attnflow.import_optional("torch", self.extra)
        model = common.unwrap(model)
        if not isinstance(model, torch.nn.Module):
            raise attnflow.AdapterError(
                f"Adapter 'torch' captures torch.nn.Module models; got {type(model).__module__}.{type(model).__qualname__}."
            )
        if not isinstance(output_index, int) or isinstance(output_index, bool):
            raise attnflow.OptionError(f"Adapter 'torch': output_index must be an int, got {output_index!r}.")
        if layout is not None and modules is None:
            raise attnflow.OptionError(
                "Adapter 'torch': layout= describes the probabilities of the modules selected with modules=; give "
                "both, e.g. modules=['layers.*.attn'], layout='bhqk'."
            )
        parsed = None if layout is None else Layout.parse(layout, self.name)
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

        signature = common.forward_signature(model)

        def describe_call(args: tuple, kwargs: dict) -> dict[str, Any]:
            call: dict[str, Any] = {"input_ids": common.int_ids(_first_input(signature, args, kwargs), torch), "metadata": {}}
            if modules is not None:  # selected modules see no padding mask: the model's (Hugging Face style) one
                call["mask"] = _real_tokens(kwargs.get("attention_mask"), torch)
            return call

        handles: list[Any] = []
        watch = _Watch()
        with _fastpath_off(torch) if disable_fastpath else nullcontext(), common.removing(handles), watch.closing():
            with deferred_interrupts():
                for path, module in targets:
                    name = common.layer_name(path, model)
                    if isinstance(module, mha_class):
                        self._hook_mha(torch, module, path, name, passes, handles)
                    elif parsed is not None:
                        _hook_computed(torch, module, path, name, parsed, passes, handles, watch)
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
            listed, kwargs = list(args), dict(kwargs)
            query, key = _get_arg(listed, kwargs, "query"), _get_arg(listed, kwargs, "key")
            calls.append({
                "need_weights": _get_arg(listed, kwargs, "need_weights", _MHA_DEFAULTS["need_weights"]),
                "average": _get_arg(listed, kwargs, "average_attn_weights", _MHA_DEFAULTS["average_attn_weights"]),
                "self": _same_tensor(torch, query, key),
                "padding": _get_arg(listed, kwargs, "key_padding_mask"),
            })
            _set_arg(listed, kwargs, "need_weights", True)
            _set_arg(listed, kwargs, "average_attn_weights", False)
            return tuple(listed), kwargs

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

        common.register(handles, module.register_forward_pre_hook, pre_hook, with_kwargs=True)
        # prepend: under nested attaches the innermost hook sees the full weights first, and the outermost
        # one (whose pre-hook saw the caller's own request) runs last and gives the caller what it asked for.
        common.register(handles, module.register_forward_hook, hook, prepend=True)

        def forget(mod: Any, args: tuple, output: Any) -> None:  # the call raised: drop its stack entry
            if calls and output is None:
                calls.pop()

        common.register(handles, module.register_forward_hook, forget, always_call=True)

    def _hook_module(
        self, torch: Any, module: Any, path: str, name: str, index: int, passes: common.TorchPass, handles: list
    ) -> None:
        def hook(mod: Any, args: tuple, output: Any) -> None:
            # a module whose output is a (batch, heads, query, key) tensor returns the pattern (hook_pattern)
            pattern = isinstance(output, torch.Tensor) and output.ndim == 4
            try:
                if not pattern and not isinstance(output, (tuple, list)):
                    raise TypeError
                weights = output if pattern else output[index]
            except (TypeError, IndexError):
                raise attnflow.AdapterError(
                    f"{name} ({type(mod).__name__}) returned {_shape_text(output)}, which has no attention weights "
                    f"at output_index={index}. Select modules that return (output, weights) or the pattern itself, "
                    "set output_index, or pass layout='bhqk' (the axis order of its probabilities) to record the "
                    "softmax it computes."
                ) from None
            if weights is None:
                raise attnflow.HiddenAttentionError(
                    f"{name} ({type(mod).__name__}) returned None instead of attention weights at "
                    f"output_index={index}; make it return its weights (e.g. need_weights=True), or pass "
                    "layout='bhqk' (the axis order of its probabilities) to record the softmax it computes."
                )
            if not isinstance(weights, torch.Tensor) or weights.ndim != 4:
                shape = tuple(weights.shape) if hasattr(weights, "shape") else type(weights).__name__
                raise attnflow.AdapterError(
                    f"{name} ({type(mod).__name__}) returned {shape} at output_index={index}; attnflow needs per-head weights "
                    "shaped (batch, heads, query, key). Select the module whose output is the pattern, or pass "
                    "layout= (e.g. 'bhqk') to record the softmax the module computes."
                )
            q, k = weights.shape[-2:]
            passes.add(path, weights, kind="self" if q == k else "cross", training=mod.training, name=name)
            if pattern:
                _describe_from_weights(passes, path, weights)

        common.register(handles, module.register_forward_hook, hook)

    # -- faithfulness (attnflow.faithfulness): blank-out and input gradients, in adapters/_torch/_faithfulness_torch.py
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


def _shape_text(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} {tuple(shape)}" if shape is not None else type(value).__name__


def _first_input(signature: Any, args: tuple, kwargs: dict) -> Any:
    """The call's ``input_ids``, or its first argument (positional, or by the name of the forward's first
    parameter: nnsight and others pass every argument by keyword)."""
    if "input_ids" in kwargs:
        return kwargs["input_ids"]
    if args:
        return args[0]
    if signature is not None:
        first = next(iter(signature.parameters.values()), None)
        if first is not None and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
            return kwargs.get(first.name)
    return None


def _real_tokens(mask: Any, torch: Any) -> Any:
    """A ``(batch, tokens)`` 0/1 or bool ``attention_mask`` (1 = real token) as numpy bool, else None."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.is_floating_point():
        return None
    return mask.detach().cpu().numpy().astype(bool)


def _describe_from_weights(passes: common.TorchPass, path: str, weights: Any) -> None:
    """The key mask of a self-attention layer's stream read from its probabilities (a key no query of any head
    attends to is padding), for captures that see no mask; a mask already known is kept."""
    if passes.paused or passes.muted or weights.shape[-2] != weights.shape[-1]:
        return
    keys = (weights.detach() != 0).any(dim=1).any(dim=1)
    passes.recorder.describe_stream(passes.stream_of(path), mask=keys.cpu().numpy())


# -- softmax-level capture (layout=) ------------------------------------------------------------------------------
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _Frame:
    """One running call of a module selected with ``layout=``: the probabilities computed during it."""

    __slots__ = ("name", "layout", "found", "other", "dropout")

    def __init__(self, name: str, layout: Layout):
        self.name, self.layout = name, layout
        self.found: list[Any] = []  # (batch, heads, query, key) tensors
        self.other: list[tuple[int, ...]] = []  # shapes of softmaxes over another axis or of another rank
        self.dropout = False

    def offer(self, torch: Any, func: Any, args: tuple, kwargs: dict, output: Any) -> None:
        functional = torch.nn.functional
        if func is functional.scaled_dot_product_attention:
            bound = dict(zip(_SDPA_PARAMS, args), **kwargs)
            probabilities = _sdpa_probabilities(torch, bound)
            if probabilities is None:
                self.other.append(tuple(getattr(bound.get("query"), "shape", ())))
            else:
                self.found.append(probabilities)
                self.dropout = self.dropout or bool(bound.get("dropout_p") or 0.0)
            return
        if func not in (torch.softmax, functional.softmax, torch.Tensor.softmax, torch.special.softmax):
            return
        if not isinstance(output, torch.Tensor):
            return
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        roles = _fit(self.layout, output.ndim)
        if roles is None or not isinstance(dim, int) or dim % output.ndim != roles.index("k"):
            self.other.append(tuple(output.shape))
            return
        self.found.append(_to_bhqk(output, roles))


class _Watch:
    """The selected calls running in each thread (innermost last) for one attach, and the torch function mode
    that hands each its softmax and attention-function results.

    A mode is pushed by a selected module's pre-hook and popped by its (always-called) forward hook. Torch's
    function-mode stack is per thread, so threads never see each other's frames. A ``KeyboardInterrupt`` skips
    PyTorch's always-called hooks: :meth:`closing` pops what such a call left when the attach ends."""

    def __init__(self) -> None:
        self.local = threading.local()

    @property
    def stack(self) -> list[tuple[_Frame, Any]]:
        stack = getattr(self.local, "stack", None)
        if stack is None:
            stack = self.local.stack = []
        return stack

    def push(self, torch: Any, frame: _Frame) -> None:
        mode = _mode_class(torch)(self, frame, torch)
        mode.__enter__()
        self.stack.append((frame, mode))

    def pop(self, frame: _Frame) -> bool:
        """Leave ``frame``'s call (and any inner ones an interrupt left open); False if it is not running."""
        stack = self.stack
        if not any(f is frame for f, _ in stack):
            return False
        while stack:
            top, mode = stack.pop()
            mode.__exit__(None, None, None)
            if top is frame:
                return True
        return True

    def innermost(self, frame: _Frame) -> bool:
        stack = self.stack
        return bool(stack) and stack[-1][0] is frame

    @contextmanager
    def closing(self) -> Iterator[None]:
        try:
            yield
        finally:
            stack = self.stack
            while stack:  # only after an interrupt inside a selected call: this thread's modes are ours, on top
                _, mode = stack.pop()
                mode.__exit__(None, None, None)


_MODE_CLASS: list[Any] = []


def _mode_class(torch: Any) -> Any:
    """A ``TorchFunctionMode`` that offers every torch function's result to the innermost frame of its watch
    (defined once torch is imported)."""
    if not _MODE_CLASS:

        class ProbabilityWatch(torch.overrides.TorchFunctionMode):
            def __init__(self, watch: _Watch, frame: _Frame, torch: Any):
                super().__init__()
                self.watch, self.frame, self.torch = watch, frame, torch

            def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
                kwargs = kwargs or {}
                output = func(*args, **kwargs)
                if self.watch.innermost(self.frame):  # nested selected calls: the innermost takes it
                    self.frame.offer(self.torch, func, args, kwargs, output)
                return output

        _MODE_CLASS.append(ProbabilityWatch)
    return _MODE_CLASS[0]


def _hook_computed(
    torch: Any, module: Any, path: str, name: str, layout: Layout, passes: common.TorchPass, handles: list,
    watch: _Watch,
) -> None:
    """Hooks that record the probabilities ``module`` computes during its call (``layout=``)."""
    frames: list[_Frame] = []  # this module's running calls, innermost last

    def pre_hook(mod: Any, args: tuple) -> None:
        frame = _Frame(name, layout)
        frames.append(frame)
        watch.push(torch, frame)

    def hook(mod: Any, args: tuple, output: Any) -> None:
        if not frames:
            return
        frame = frames.pop()
        watch.pop(frame)
        if output is None:  # the call raised (or returned nothing): nothing to record
            return
        if len(frame.found) > 1:
            raise attnflow.AdapterError(
                f"{name!r} ({type(mod).__name__}), selected with modules= and layout={layout.text!r}, computed "
                f"{len(frame.found)} attention probabilities (softmax over the key axis, or "
                "scaled_dot_product_attention) in one call; select the modules that each compute one (the innermost "
                "attention modules)."
            )
        if frame.found:
            weights = frame.found[0]
        elif isinstance(output, torch.Tensor) and _fit(layout, output.ndim) is not None:
            weights = _to_bhqk(output, layout.roles)  # the module's output is the pattern (hook_pattern)
        else:
            other = f" (it computed softmaxes of shapes {frame.other[:3]}, over another axis or of another rank)" if \
                frame.other else ""
            raise attnflow.HiddenAttentionError(
                f"{name!r} ({type(mod).__name__}) was selected with modules= and layout={layout.text!r}, but computed "
                f"no softmax over the key axis of that layout and no torch.nn.functional.scaled_dot_product_attention"
                f"{other}, and its output is not such a pattern. Select the module that computes the attention "
                "probabilities, give the layout= of its softmax output, or load the model with an attention "
                "implementation that computes them in PyTorch (a fused kernel such as flash attention hides them)."
            )
        q, k = weights.shape[-2:]
        passes.add(path, weights, kind="self" if q == k else "cross", training=frame.dropout or mod.training,
                   name=name)
        _describe_from_weights(passes, path, weights)

    with deferred_interrupts():
        common.register(handles, module.register_forward_pre_hook, pre_hook)
        common.register(handles, module.register_forward_hook, hook, always_call=True)


def _fit(layout: Layout, ndim: int) -> tuple[str, ...] | None:
    """The layout's roles for an ``ndim``-axis tensor: every axis named, batch included."""
    return layout.roles if ndim == len(layout.roles) else None


def _to_bhqk(tensor: Any, roles: tuple[str, ...]) -> Any:
    """``tensor`` (axes ``roles``) as ``(batch, heads, query, key)``, key/value groups and heads merged group-major."""
    batch = [i for i, role in enumerate(roles) if role == "b"]
    order = batch + [roles.index(role) for role in ("g", "h", "q", "k") if role in roles]
    moved = tensor.permute(*order)
    if not batch:
        moved = moved.unsqueeze(0)
    return moved.reshape(moved.shape[0], -1, *moved.shape[-2:])


def _sdpa_probabilities(torch: Any, bound: dict[str, Any]) -> Any:
    """The probabilities ``torch.nn.functional.scaled_dot_product_attention(**bound)`` attends with, as
    ``(batch, heads, query, key)``: ``softmax(q kᵀ · scale + mask)`` with its causal (top-left) and boolean or
    additive mask, grouped key heads repeated (``enable_gqa``); rows with every key masked are 0. None for
    inputs of rank other than 3 or 4."""
    query, key = bound.get("query"), bound.get("key")
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor) or query.ndim not in (3, 4):
        return None
    with torch.no_grad():
        q, k = query.detach(), key.detach()
        if q.ndim == 3:
            q, k = q[:, None], k[:, None]
        if bound.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        scale = bound.get("scale")
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-2, -1)) * scale
        n_q, n_k = scores.shape[-2:]
        if bound.get("is_causal"):
            allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        mask = bound.get("attn_mask")
        if isinstance(mask, torch.Tensor):
            mask = mask.detach()
            if mask.ndim == 3 and query.ndim == 3:
                mask = mask[:, None]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.to(dtype)
        probabilities = torch.softmax(scores, dim=-1)
        return torch.nan_to_num(probabilities, nan=0.0)
