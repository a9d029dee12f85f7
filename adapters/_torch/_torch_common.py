"""Pieces shared by the PyTorch-based adapters (``torch`` and ``transformers``).

Private to attnflow.adapters. Like the adapters, this module imports no framework at top level: every
function that needs torch receives it or imports it lazily.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

import attnflow
from attnflow.recording import deferred_interrupts, module_selector, switch
from attnflow.trace._arrays import adopt

from .._hf_families import pick_key_stream


def to_numpy(tensor: Any) -> tuple[np.ndarray, str]:
    """A detached CPU numpy copy of ``tensor`` and the dtype the model computed in.

    bfloat16 (which numpy lacks) is upcast to float32; the second value then says ``"bfloat16"``.
    """
    source_dtype = str(tensor.dtype).removeprefix("torch.")
    data = tensor.detach()
    if source_dtype == "bfloat16":
        data = data.float()
    return data.cpu().numpy(), source_dtype


def _one_holder() -> int:
    """What ``sys.getrefcount`` says, in `claim`'s frame, of an object one container holds (calibrated here, not
    assumed: the count an interpreter reports for a local differs between Python versions)."""
    holder = [object()]
    item = holder[0]
    return sys.getrefcount(item)


_ONE_HOLDER = _one_holder()


def claim(array: np.ndarray) -> None:
    """Hand ``array`` to the trace without a copy when it is a numpy view of a CPU tensor's whole storage that
    nothing but the array can reach (the model has dropped its attention tensor by the end of the pass, and no
    other tensor, view or Python reference shares the storage); otherwise the trace copies it, as it copies
    every array it is given. Saves a copy of every layer's ``(batch, heads, q, k)`` weights."""
    torch = sys.modules.get("torch")
    use_count = getattr(getattr(torch, "_C", None), "_storage_Use_Count", None)
    base = array.base
    if torch is None or use_count is None or not isinstance(base, torch.Tensor):
        return
    if sys.getrefcount(base) != _ONE_HOLDER or base._base is not None or base.device.type != "cpu":
        return  # held elsewhere too (the array's reference, this frame's), or a view of another tensor
    storage = base.untyped_storage()
    if use_count(storage._cdata) == 2 and storage.nbytes() == array.nbytes:  # base's and `storage`'s own
        adopt(array)


def reduced(weights: Any, request: Any) -> Any:
    """``weights`` with heads fused and in the storage dtype the capture asks for, computed where the tensor
    lives (on a GPU, only the fused map then crosses to the host)."""
    if request.head_fusion and weights.ndim == 4 and weights.shape[1] > 1:
        torch = attnflow.import_optional("torch", "torch")
        with torch.no_grad():
            source = weights.float() if weights.dtype in (torch.float16, torch.bfloat16) else weights
            fused = {"mean": source.mean, "max": source.amax, "min": source.amin}[request.head_fusion](1, keepdim=True)
            weights = fused.to(weights.dtype)
    if request.dtype:
        torch = attnflow.import_optional("torch", "torch")
        target = getattr(torch, request.dtype)
        if weights.dtype != target:
            weights = weights.detach().to(target)
    return weights


def selector_matcher(adapter: str, modules: Any, torch: Any) -> Callable[[str, Any], bool]:
    """:func:`attnflow.recording.module_selector` for ``nn.Module`` subclasses and dotted module paths."""
    return module_selector(adapter, modules, base=torch.nn.Module, base_name="torch.nn.Module",
                           example="layers.*.attn")


def no_match_error(adapter: str, model: Any, modules: Any) -> attnflow.AdapterError:
    paths = [path for path, _ in model.named_modules() if path][:12]
    return attnflow.AdapterError(
        f"Adapter {adapter!r}: no module of {type(model).__name__} matches modules={modules!r}. Module paths "
        f"look like {paths}; select attention modules by class or by a glob over these paths."
    )


def layer_name(path: str, model: Any) -> str:
    return path or type(model).__name__


@dataclasses.dataclass
class PassState:
    """What hooks learn during one forward pass, for the finishing steps (a fresh one each pass)."""

    output: Any = None  # the root module's output (the target's scores are taken from it)
    grad_tensors: list[tuple[int, Any]] = dataclasses.field(default_factory=list)  # (layer index, weights) to differentiate
    target_tokens: tuple[Any, bool | None] | None = None  # (padding mask, causal) of the tokens the target reads
    root: dict[str, Any] | None = None  # the root call's input_ids and mask (several streams)
    injected: bool = False  # attnflow asked for output_attentions: take them out of the output
    single_pixels: tuple[int, ...] | None = None  # pixel input's shape (one-stream vision models)
    single_length: int | None = None  # keys of the first layer (one-stream vision models)
    length: int | None = None  # keys of the first layer (timm)
    batch: int | None = None  # batch size of the first layer (timm)
    pixels: dict[str | None, tuple[tuple[int, ...], Any]] = dataclasses.field(default_factory=dict)  # stream -> (shape, tower)
    stream_masks: dict[str | None, Any] = dataclasses.field(default_factory=dict)  # stream -> its padding mask
    frame_masks: set[str | None] = dataclasses.field(default_factory=set)  # streams whose frame mask is derived
    indices: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # module path -> its layers' indices
    values: dict[str, dict[str, list[Any]]] = dataclasses.field(default_factory=dict)  # layer -> slot -> kept tensors
    vz_inputs: dict[str, list[tuple[tuple, dict]]] = dataclasses.field(default_factory=dict)  # layer -> its calls
    vz_outputs: dict[str, list[Any]] = dataclasses.field(default_factory=dict)  # layer -> its outputs
    swin: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)  # stage -> (batch, height, width)
    segformer: dict[Any, dict[str, Any]] = dataclasses.field(default_factory=dict)  # stage -> batch, grid, pooled


class TorchPass:
    """What a torch-based adapter knows while attached: the recorder, which stream each hooked module's
    queries belong to, and what the current forward pass has shown so far.

    Pass boundaries come from the root module's hooks (:func:`install_pass_hooks`): the outermost call
    opens a pass in the recorder, a nested call of the root joins it, the end runs the adapter's
    finishing steps (stream details learned only once every layer ran) and closes the pass; a forward
    that raised drops it. Layers are handed to the recorder as they run; the recorder buffers them.
    """

    def __init__(self, recorder: attnflow.Recorder, streams: Mapping[str, str | None] | None = None):
        self.recorder = recorder
        self.streams = dict(streams or {})  # module path -> stream of its queries (None: the only stream)
        self.request = recorder.request
        self.depth = 0
        self.grad_mode: bool | None = None  # autograd's state before a pass that records gradients
        self.paused = False  # the finishing steps re-run parts of the model: nothing they run is recorded
        self.muted = 0  # > 0: nothing is recorded and no pass opens (generate() before a re-run)
        self.generating = False  # the passes are steps of one generate() call: streams seen stay known
        self.seen: dict[str, int] = {}  # stream -> its length, from the layers of this pass
        self.layer_counts: dict[str | None, int] = {}  # stream -> layers of it recorded in this pass
        self.state = PassState()  # what hooks learn during the pass, for the finishing steps
        self.finishers: list[Callable[[TorchPass], None]] = []
        self.borrowed: list[np.ndarray] = []  # this pass's weights, still viewing the model's tensors

    @property
    def active(self) -> bool:
        return self.depth > 0

    def reset(self) -> None:
        """Forget the last pass's details (before an outermost call is described); while generating, the
        streams seen so far (an encoder run once before the decoder's steps) stay known."""
        self.state, self.layer_counts, self.borrowed = PassState(), {}, []
        if not self.generating:
            self.seen = {}

    def begin(self, call: Mapping[str, Any] | None) -> None:
        self.depth += 1
        if self.depth == 1 and self.request.gradients:
            torch = attnflow.import_optional("torch", "torch")
            self.grad_mode = torch.is_grad_enabled()
            torch.set_grad_enabled(True)  # gradients are asked for: also inside the caller's torch.no_grad()
        self.recorder.start_call(**dict(call or {}))

    def finish(self) -> None:
        self.depth -= 1
        try:
            if self.depth == 0:
                if self.request.gradients:
                    attention_gradients(self)
                self.paused = True
                for finisher in self.finishers:
                    finisher(self)
        finally:
            self.paused = False
            if self.depth == 0:
                self._restore_grad_mode()
                borrowed, self.borrowed = self.borrowed, []
                for array in borrowed:  # the model is done with its tensors: those only the trace holds move
                    claim(array)
        self.recorder.end_call()

    def abort(self) -> None:
        if self.depth > 0:
            self.depth = 0
            self.borrowed = []
            self._restore_grad_mode()
            self.recorder.abort_call()

    def _restore_grad_mode(self) -> None:
        if self.grad_mode is not None:
            attnflow.import_optional("torch", "torch").set_grad_enabled(self.grad_mode)
            self.grad_mode = None

    def stream_of(self, path: str) -> str | None:
        return self.streams.get(path)

    def add(
        self, path: str, weights: Any, *, kind: str | None = None, key_stream: str | None = None,
        training: bool = False, name: str | None = None,
    ) -> int:
        """Record one module's ``(batch, heads, q, k)`` attention tensor (its index in the pass is returned, -1
        while the finishing steps run); the query stream comes from the
        module's path, the key stream of a cross layer from the streams this pass has run (or ``key_stream``)."""
        if self.paused or self.muted:
            return -1
        tensor = reduced(weights, self.request)
        # only memory torch allocated itself may move to the trace: a storage over memory it did not (from_numpy,
        # frombuffer, dlpack, a mapped file; not resizable) may be written by its owner later. Asked before
        # .numpy(), which makes every storage it views unresizable.
        own = getattr(tensor, "is_cpu", False) and tensor.untyped_storage().resizable()
        array, source_dtype = to_numpy(tensor)
        if own:
            self.borrowed.append(array)
        query = self.stream_of(path)
        key = None
        if kind == "cross" and query is not None:
            key = key_stream or pick_key_stream(query, array.shape[-1], self.seen)
            if key is None:
                key = "memory"  # keys handed in from outside the model (e.g. encoder_hidden_states)
        elif kind != "cross" and query is not None:
            self.seen.setdefault(query, array.shape[-1])
        self.layer_counts[query] = self.layer_counts.get(query, 0) + 1
        index = self.recorder.record(
            name or path, array, kind=kind, source_dtype=source_dtype, query_stream=query, key_stream=key,
            training=training,
        )
        if self.request.gradients and self.active:
            self.state.grad_tensors.append((index, weights))
        return index


def install_pass_hooks(
    model: Any, passes: TorchPass, describe_call: Callable[[tuple, dict], Mapping[str, Any] | None],
    handles: list[Any], *, after: Callable[[Any], Any] | None = None,
) -> None:
    """Hooks on the root module that open and close a pass; call this after hooking the attention modules,
    so that the end hooks run after every layer hook.

    ``describe_call(args, kwargs)`` gives :meth:`attnflow.Recorder.start_call`'s keywords for an outermost
    call, plus optionally ``"inject"``: keyword arguments to add to the call (e.g. ``output_attentions``).
    ``after(output)`` may return a replacement for the root's output (e.g. to take back what was injected);
    it runs before the pass ends.
    """
    ended = [0]
    muted_calls = [0]  # outermost calls that began while muted: they open no pass, so they close none

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> Any:
        if passes.muted and not passes.active:
            muted_calls[0] += 1
            return None
        if passes.active:
            passes.begin(None)
            return None
        passes.reset()
        call = dict(describe_call(args, kwargs) or {})
        inject = call.pop("inject", None)
        passes.begin(call)
        if inject:
            return args, {**kwargs, **inject}
        return None

    def end_hook(module: Any, args: tuple, output: Any) -> Any:
        if muted_calls[0] and not passes.active:
            return None
        ended[0] += 1
        if passes.depth == 1:
            passes.state.output = output
        replaced = after(output) if after is not None and passes.depth == 1 else None
        passes.finish()
        return replaced

    def cleanup_hook(module: Any, args: tuple, output: Any) -> None:
        # always_call: runs also when forward raised, when end_hook did not run (or raised itself).
        if muted_calls[0] and not passes.active:
            muted_calls[0] -= 1
            return
        if ended[0]:
            ended[0] -= 1
        else:
            passes.abort()

    register(handles, model.register_forward_pre_hook, pre_hook, with_kwargs=True, prepend=True)
    register(handles, model.register_forward_hook, end_hook)
    register(handles, model.register_forward_hook, cleanup_hook, always_call=True)


def attention_gradients(passes: TorchPass) -> None:
    """The gradient of the target score with respect to every recorded attention tensor of the pass, added to
    its layer as extra ``"attn_grad"``. One backward pass; nothing accumulates into parameters' ``.grad``."""
    torch = attnflow.import_optional("torch", "torch")
    tensors, passes.state.grad_tensors = passes.state.grad_tensors, []
    kept = [(i, t) for i, t in tensors if t.requires_grad]
    if not kept:
        raise attnflow.AdapterError(
            "Gradients were asked for (target=...), but no recorded attention took part in autograd; the model "
            "may detach its attention weights, or run its attention in a way autograd does not follow."
        )
    score = target_score(passes.state.output, passes.request, passes.state.target_tokens, torch)
    grads = torch.autograd.grad(score, [t for _, t in kept], allow_unused=True)
    if all(grad is None for grad in grads):
        raise attnflow.AdapterError(
            "The target does not depend on any recorded attention tensor: the attention modules return weights "
            "that are not the ones they compute with (a copy or a view made after use), so their gradients cannot "
            "be read. Capture gradients with an adapter that hooks the probabilities the model uses."
        )
    for (index, tensor), grad in zip(kept, grads):  # a layer the target does not depend on has gradient 0
        grad = torch.zeros_like(tensor) if grad is None else grad
        passes.recorder.add_extras(index, attn_grad=to_numpy(grad)[0])


def target_score(output: Any, request: Any, target_tokens: Any, torch: Any) -> Any:
    """The scalar whose gradient is taken: per item, ``target`` of the model's logits (at the target
    position for per-token logits), summed over the batch.

    ``target_tokens``: ``(mask, causal)`` of the tokens the logits belong to, to find each item's last real
    token (decoders); None when unknown (then position 0).
    """
    target = request.target
    if callable(target):
        score = target(output)
        if not isinstance(score, torch.Tensor):
            raise attnflow.OptionError(f"target(output) must return a torch tensor of per-item scores, got {type(score).__name__}.")
        return score.sum()
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, torch.Tensor) and output.ndim in (2, 3):
        logits = output
    if target == EMBEDDING or (target is None and logits is None and _hidden_states(output, torch) is not None):
        return embedding_score(output, target_tokens, torch)
    if logits is None:
        raise attnflow.OptionError(
            f"The model's output ({type(output).__name__}) has no logits to take target={target!r} from; pass "
            "target=a callable that maps the output to per-item scores, e.g. lambda out: out.last_hidden_state[:, 0, 0]."
        )
    batch = logits.shape[0]
    if logits.ndim == 3:
        positions = _target_positions(request.target_position, target_tokens, batch, logits.shape[1], torch)
        logits = logits[torch.arange(batch), positions]
    if logits.ndim != 2:
        raise attnflow.OptionError(f"Cannot read a target from logits of shape {tuple(logits.shape)}; pass target=a callable.")
    if target is None:
        index = logits.argmax(-1)
    else:
        if not isinstance(target, int) or isinstance(target, bool) or not -logits.shape[-1] <= target < logits.shape[-1]:
            raise attnflow.OptionError(
                f"target={target!r} is not an index of the model's {logits.shape[-1]} outputs (classes or vocabulary)."
            )
        index = torch.full((batch,), target % logits.shape[-1], dtype=torch.long, device=logits.device)
    return logits.gather(1, index[:, None]).sum()


#: The target of models without logits: each item's mean-pooled last hidden state projected on its own
#: (fixed) direction, ``⟨h, h₀/‖h₀‖⟩``: its gradient is that of ``‖h‖`` along ``h₀``, where the cosine to the
#: unablated embedding (faithfulness' ``"embedding"`` target) has gradient zero.
EMBEDDING = "embedding"


def _hidden_states(output: Any, torch: Any) -> Any:
    hidden: Any = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        hidden = output[0]
    elif isinstance(hidden, torch.Tensor) and hidden.ndim == 4:
        # a convolutional-style feature map (batch, channels, height, width), as SegFormer's: positions as tokens
        hidden = hidden.flatten(2).transpose(1, 2)
    return hidden if isinstance(hidden, torch.Tensor) and hidden.ndim == 3 else None


def embedding_score(output: Any, target_tokens: Any, torch: Any) -> Any:
    """``Σ_b ⟨h_b, h_b/‖h_b‖⟩`` with the direction detached; ``h_b``: item b's last hidden state averaged over
    its real tokens (``target_tokens``' mask; every position where it is unknown)."""
    hidden = _hidden_states(output, torch)
    if hidden is None:
        raise attnflow.OptionError(
            f"target='embedding' needs the model's last hidden state, (batch, tokens, width) or a feature map (batch, "
            f"channels, height, width); the output "
            f"({type(output).__name__}) has none. Pass target=a callable that maps the output to per-item scores."
        )
    mask = None if target_tokens is None else target_tokens[0]
    if mask is not None and tuple(np.shape(mask)) == tuple(hidden.shape[:2]):
        weights = torch.as_tensor(np.asarray(mask, dtype=np.float64), dtype=hidden.dtype, device=hidden.device)
    else:
        weights = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    pooled = (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)
    direction = pooled.detach() / pooled.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (pooled * direction).sum()


def _target_positions(position: int | None, target_tokens: Any, batch: int, length: int, torch: Any) -> Any:
    if position is not None:
        if not -length <= position < length:
            raise attnflow.OptionError(f"target_position={position} is outside the {length} positions of the logits.")
        return torch.full((batch,), position % length, dtype=torch.long)
    if target_tokens is not None:
        mask, causal = target_tokens
        if causal and mask is None:
            return torch.full((batch,), length - 1, dtype=torch.long)
        if causal and tuple(np.shape(mask)) == (batch, length):
            last = [int(np.flatnonzero(np.asarray(row))[-1]) for row in mask]
            return torch.tensor(last, dtype=torch.long)
    return torch.zeros(batch, dtype=torch.long)


def unwrap_compiled(model: Any) -> Any:
    """The module behind a ``torch.compile``d one (``OptimizedModule._orig_mod``), else ``model``."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            return model
        model = inner
    return model


def register(handles: list[Any], method: Callable[..., Any], hook: Callable[..., Any], **options: Any) -> None:
    """``method(hook, **options)`` (a module's ``register_forward_hook`` or ``register_forward_pre_hook``) with
    its handle kept in ``handles`` (a :func:`removing` list). Call it under
    ``attnflow.recording.deferred_interrupts()``, which holds back signals, so that no signal handler's exception
    can fall between registering and keeping. If registering raises, whatever it added to the module's hook
    dicts is taken out again (found by ``hook``'s identity: pass a function of this attach's own)."""
    try:
        handles.append(method(hook, **options))
    except BaseException:
        _unregister(method.__self__, hook)  # type: ignore[attr-defined]  # a bound method: its module
        raise


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_EXTRA_DICTS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _unregister(module: Any, hook: Any) -> None:
    for name in _HOOK_DICTS:
        hooks = getattr(module, name, None) or {}
        for key in [key for key, value in hooks.items() if value is hook]:
            del hooks[key]
            for extra in _EXTRA_DICTS:
                (getattr(module, extra, None) or {}).pop(key, None)


@contextmanager
def removing(handles: list[Any]) -> Iterator[list[Any]]:
    """Remove every hook handle in ``handles`` on exit, also when the body raises and when an exception (a
    signal handler's) arrives on the way out. Register the hooks with :func:`register` under
    ``attnflow.recording.deferred_interrupts()``.

    The removal is a switch of its own (released once, with a second start if an exception arrives as the first
    begins); a ``remove()`` that raises does not stop it: see :func:`remove_all`."""
    with switch(("torch hooks", id(handles)), lambda: handles, remove_all):
        yield handles


def remove_all(handles: list[Any]) -> None:
    """Remove every handle in ``handles`` (last first) with signals held back. A ``remove()`` that raises does
    not stop the others: its hook is taken out of the dicts the handle names, and the first such error is
    raised once every handle is gone."""
    error: BaseException | None = None
    with deferred_interrupts():
        while handles:
            handle = handles[-1]
            try:
                handle.remove()
            except BaseException as exc:  # survived: the removal goes on
                error = error or exc
                _forget(handle)
            handles.pop()
    if error is not None:
        raise error


def _forget(handle: Any) -> None:
    """What ``RemovableHandle.remove`` does, without calling it: the handle's id out of the dicts it names."""
    refs = (getattr(handle, "hooks_dict_ref", None), *getattr(handle, "extra_dict_ref", ()))
    for ref in refs:
        hooks = ref() if callable(ref) else None
        if isinstance(hooks, dict):
            hooks.pop(getattr(handle, "id", None), None)


def int_ids(value: Any, torch: Any) -> np.ndarray | None:
    """``value`` as a ``(batch, seq)`` integer numpy array, when it is a 2-D integer tensor."""
    if isinstance(value, torch.Tensor) and value.ndim == 2 and not value.is_floating_point() and not value.is_complex():
        if value.dtype == torch.bool:
            return None
        return value.detach().cpu().numpy()
    return None


def run_without_grad(model: Any, args: tuple, kwargs: dict) -> Any:
    """One forward pass for ``capture()``: no autograd graph is needed to read attention."""
    torch = attnflow.import_optional("torch", "torch")
    with torch.no_grad():
        return model(*args, **kwargs)


def unwrap(model: Any) -> Any:
    """The ``torch.nn.Module`` behind wrappers that hold one: ``torch.compile``'s ``OptimizedModule`` (see
    :func:`unwrap_compiled`) and nnsight's envoys (``NNsight``, ``LanguageModel``, ``TransformersModel``... keep
    the module they wrap as ``_module``); else ``model``. nnsight is never imported here: a model can only be
    an envoy once nnsight is."""
    import sys

    for _ in range(8):
        nnsight = sys.modules.get("nnsight")
        envoy = getattr(nnsight, "Envoy", None) if nnsight is not None else None
        if envoy is not None and isinstance(model, envoy):
            inner = model.__dict__.get("_module")
        else:
            inner = unwrap_compiled(model)
        if inner is None or inner is model:
            return model
        model = inner
    return model


def forward_signature(module: Any) -> Any:
    """The signature a call of ``module`` is bound against: its real ``forward``'s, without ``self``.

    ``inspect.signature(module.forward)`` is wrong where a wrapper object was put in the instance's ``forward``
    slot with ``functools.update_wrapper`` around the class's (unbound) function, as nnsight does for every module
    it wraps: the reported signature then starts with ``self``, and a positional first argument (token ids) would
    be bound to it. None where there is no signature."""
    import inspect

    forward = getattr(module, "forward", None)
    if forward is None:
        return None
    try:
        functions = {vars(cls).get("forward") for cls in type(module).__mro__} - {None}
        wrapped = forward
        for _ in range(8 if not (inspect.ismethod(forward) or inspect.isfunction(forward)) else 0):
            wrapped = getattr(wrapped, "__wrapped__", None)  # one step at a time: the class's may be decorated
            if wrapped is None:
                break
            if wrapped in functions:
                signature = inspect.signature(wrapped)
                parameters = list(signature.parameters.values())
                if parameters and parameters[0].kind in (
                    inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                ):
                    return signature.replace(parameters=parameters[1:])
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None
