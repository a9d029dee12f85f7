"""Pieces shared by the PyTorch-based adapters (``torch`` and ``transformers``).

Private to attnflow.adapters. Like the adapters, this module imports no framework at top level: every
function that needs torch receives it or imports it lazily.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

import attnflow
from attnflow._switches import deferred_interrupts

from ._hf_families import pick_key_stream


def to_numpy(tensor: Any) -> tuple[np.ndarray, str]:
    """A detached CPU numpy copy of ``tensor`` and the dtype the model computed in.

    bfloat16 (which numpy lacks) is upcast to float32; the second value then says ``"bfloat16"``.
    """
    source_dtype = str(tensor.dtype).removeprefix("torch.")
    data = tensor.detach()
    if source_dtype == "bfloat16":
        data = data.float()
    return data.cpu().numpy(), source_dtype


def selector_matcher(adapter: str, modules: Any, torch: Any) -> Callable[[str, Any], bool]:
    """A predicate ``(path, module) -> bool`` for the ``modules=`` option.

    Each selector is an ``nn.Module`` subclass (matched with isinstance), a string (an fnmatch glob over
    the dotted module path, e.g. ``"layers.*.self_attn"``), or a compiled ``re.Pattern`` (fullmatch on the
    path). One selector may be given bare instead of in a list.
    """
    if isinstance(modules, (str, type, re.Pattern)):
        modules = [modules]
    try:
        selectors = list(modules)
    except TypeError:
        selectors = [modules]
    if not selectors:
        raise attnflow.OptionError(f"Adapter {adapter!r}: modules= is empty; give module classes or name patterns.")
    for selector in selectors:
        ok = (
            isinstance(selector, (str, re.Pattern))
            or (isinstance(selector, type) and issubclass(selector, torch.nn.Module))
        )
        if not ok:
            raise attnflow.OptionError(
                f"Adapter {adapter!r}: modules= takes torch.nn.Module subclasses, glob strings over module paths "
                f"(e.g. 'layers.*.attn') or compiled regular expressions; got {selector!r}."
            )

    def match(path: str, module: Any) -> bool:
        for selector in selectors:
            if isinstance(selector, type):
                if isinstance(module, selector):
                    return True
            elif isinstance(selector, re.Pattern):
                if selector.fullmatch(path):
                    return True
            elif fnmatch.fnmatchcase(path, selector):
                return True
        return False

    return match


def no_match_error(adapter: str, model: Any, modules: Any) -> attnflow.AdapterError:
    paths = [path for path, _ in model.named_modules() if path][:12]
    return attnflow.AdapterError(
        f"Adapter {adapter!r}: no module of {type(model).__name__} matches modules={modules!r}. Module paths "
        f"look like {paths}; select attention modules by class or by a glob over these paths."
    )


def layer_name(path: str, model: Any) -> str:
    return path or type(model).__name__


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
        self.depth = 0
        self.seen: dict[str, int] = {}  # stream -> its length, from the layers of this pass
        self.layer_counts: dict[str | None, int] = {}  # stream -> layers of it recorded in this pass
        self.state: dict[str, Any] = {}  # what hooks learn during the pass, for the finishing steps
        self.finishers: list[Callable[[TorchPass], None]] = []

    @property
    def active(self) -> bool:
        return self.depth > 0

    def reset(self) -> None:
        """Forget the last pass's details (before an outermost call is described)."""
        self.seen, self.state, self.layer_counts = {}, {}, {}

    def begin(self, call: Mapping[str, Any] | None) -> None:
        self.depth += 1
        self.recorder.start_call(**dict(call or {}))

    def finish(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            for finisher in self.finishers:
                finisher(self)
        self.recorder.end_call()

    def abort(self) -> None:
        if self.depth > 0:
            self.depth = 0
            self.recorder.abort_call()

    def stream_of(self, path: str) -> str | None:
        return self.streams.get(path)

    def add(
        self, path: str, weights: Any, *, kind: str | None = None, key_stream: str | None = None,
        training: bool = False, name: str | None = None,
    ) -> None:
        """Record one module's ``(batch, heads, q, k)`` attention tensor; the query stream comes from the
        module's path, the key stream of a cross layer from the streams this pass has run (or ``key_stream``)."""
        array, source_dtype = to_numpy(weights)
        query = self.stream_of(path)
        key = None
        if kind == "cross" and query is not None:
            key = key_stream or pick_key_stream(query, array.shape[-1], self.seen)
            if key is None:
                key = "memory"  # keys handed in from outside the model (e.g. encoder_hidden_states)
        elif kind != "cross" and query is not None:
            self.seen.setdefault(query, array.shape[-1])
        self.layer_counts[query] = self.layer_counts.get(query, 0) + 1
        self.recorder.record(
            name or path, array, kind=kind, source_dtype=source_dtype, query_stream=query, key_stream=key,
            training=training,
        )


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

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> Any:
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
        ended[0] += 1
        replaced = after(output) if after is not None and passes.depth == 1 else None
        passes.finish()
        return replaced

    def cleanup_hook(module: Any, args: tuple, output: Any) -> None:
        # always_call: runs also when forward raised, when end_hook did not run (or raised itself).
        if ended[0]:
            ended[0] -= 1
        else:
            passes.abort()

    handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
    handles.append(model.register_forward_hook(end_hook))
    handles.append(model.register_forward_hook(cleanup_hook, always_call=True))


def unwrap_compiled(model: Any) -> Any:
    """The module behind a ``torch.compile``d one (``OptimizedModule._orig_mod``), else ``model``."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            return model
        model = inner
    return model


@contextmanager
def removing(handles: list[Any]) -> Iterator[list[Any]]:
    """Remove every hook handle in ``handles`` on exit, also when the body raises. Register the hooks under
    ``attnflow._switches.deferred_interrupts()``, so that a Ctrl-C cannot fall between registering a hook
    and keeping its handle."""
    try:
        yield handles
    finally:
        with deferred_interrupts():  # a Ctrl-C between pop() and remove() would leave a hook behind
            while handles:
                handles.pop().remove()


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
