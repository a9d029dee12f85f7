"""Pieces shared by the PyTorch-based adapters (``torch`` and ``transformers``).

Private to attnflow.adapters. Like the adapters, this module imports no framework at top level: every
function that needs torch receives it or imports it lazily.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

import attnflow
from attnflow._switches import deferred_interrupts


def to_numpy(tensor: Any) -> tuple[np.ndarray, str]:
    """A detached CPU numpy copy of ``tensor`` and the dtype the model computed in.

    bfloat16 (which numpy lacks) is upcast to float32; the second value then says ``"bfloat16"``.
    """
    source_dtype = str(tensor.dtype).removeprefix("torch.")
    data = tensor.detach()
    if source_dtype == "bfloat16":
        data = data.float()
    return data.cpu().numpy(), source_dtype


def check_unknown_options(adapter: str, unknown: dict[str, Any], known: Sequence[str]) -> None:
    if unknown:
        raise attnflow.OptionError(
            f"Adapter {adapter!r} got unknown option(s) {sorted(unknown)}; it takes {sorted(known)}."
        )


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


class PassRecorder:
    """Buffers the layers of one forward pass of the root module and hands them to the Recorder at its end.

    Buffering (rather than recording as layers run) lets the adapter decide the pass's mask from what the
    attention modules saw, and drops the half-recorded layers of a forward pass that raised.
    A layer recorded while the root is not running (the user called a submodule directly) goes straight
    to the Recorder.
    """

    def __init__(self, recorder: attnflow.Recorder):
        self.recorder = recorder
        self.depth = 0
        self.layers: list[tuple[str, np.ndarray, str, str]] = []
        self.call: dict[str, Any] = {}
        self.names_seen: dict[str, int] = {}
        self.training = False

    @property
    def active(self) -> bool:
        return self.depth > 0

    def begin(self, **call: Any) -> bool:
        """Start a root pass; False for a nested call of the root (which records into the outer pass)."""
        self.depth += 1
        if self.depth > 1:
            return False
        self.layers, self.call, self.names_seen, self.training = [], dict(call), {}, False
        return True

    def add(self, name: str, weights: np.ndarray, *, kind: str, source_dtype: str, training: bool = False) -> None:
        if not self.active:
            self.recorder.record(name, weights, kind=kind, source_dtype=source_dtype)
            return
        count = self.names_seen.get(name, 0)
        self.names_seen[name] = count + 1
        if count:  # a module run more than once in one pass (shared weights): name each call
            name = f"{name}#{count}"
        self.training = self.training or training
        self.layers.append((name, weights, kind, source_dtype))

    def finish(self) -> None:
        """End the root pass normally: validate and store the trace."""
        self.depth -= 1
        if self.depth > 0:
            return
        layers, call, training = self.layers, self.call, self.training
        self.layers, self.call, self.names_seen = [], {}, {}
        self.recorder.start_call(
            mask=call.get("mask"), input_ids=_ids_for(call.get("input_ids"), layers), causal=call.get("causal"),
            metadata=call.get("metadata"),
        )
        for name, weights, kind, source_dtype in layers:
            self.recorder.record(name, weights, kind=kind, source_dtype=source_dtype)
        try:
            self.recorder.end_call()
        except attnflow.TraceError as exc:
            if training:
                raise attnflow.AdapterError(
                    f"The captured attention is not a valid trace ({exc}) and the model is in training mode, where "
                    "attention dropout rescales the weights. Call model.eval() before capturing."
                ) from exc
            raise

    def abort(self) -> None:
        """The root's forward raised: forget the pass (nothing half-recorded reaches the Recorder)."""
        if self.depth > 0:
            self.depth = 0
            self.layers, self.call, self.names_seen = [], {}, {}


def _ids_for(ids: np.ndarray | None, layers: list[tuple[str, np.ndarray, str, str]]) -> np.ndarray | None:
    """Token ids laid out as the trace's (batch, seq), or None when they do not fit it (then labels are
    positions, or the user's ``tokens=``). Sequence-first ids, as ``batch_first=False`` models take, are
    transposed."""
    if ids is None or not layers:
        return ids
    first = next((w for _, w, kind, _ in layers if kind == "self"), layers[0][1])
    want = (first.shape[0], first.shape[2])
    if ids.shape == want:
        return ids
    return ids.T if ids.T.shape == want else None


def install_root_hooks(
    model: Any, passes: PassRecorder, describe_call: Callable[[tuple, dict], dict[str, Any]], handles: list[Any]
) -> None:
    """Register the root pre-hook (start of a pass). Call :func:`install_root_end_hooks` after the
    attention modules' hooks so that the pass ends after every layer hook ran."""

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        if passes.active:
            passes.begin()
        else:
            passes.begin(**describe_call(args, kwargs))

    handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))


def install_root_end_hooks(model: Any, passes: PassRecorder, handles: list[Any]) -> None:
    ended = [0]

    def end_hook(module: Any, args: tuple, output: Any) -> None:
        ended[0] += 1
        passes.finish()

    def cleanup_hook(module: Any, args: tuple, output: Any) -> None:
        # always_call: runs also when forward raised, when end_hook did not run (or raised itself).
        if ended[0]:
            ended[0] -= 1
        else:
            passes.abort()

    handles.append(model.register_forward_hook(end_hook))
    handles.append(model.register_forward_hook(cleanup_hook, always_call=True))


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
