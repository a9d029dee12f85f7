"""The timm adapter: Vision Transformers (and relatives) built on timm's ``Attention`` module.

timm's attention computes ``F.scaled_dot_product_attention`` when its ``fused_attn`` flag is set (the
default), so the probabilities never exist. While attached, this adapter sets ``fused_attn = False`` on
every such module (the unfused path computes ``softmax(q k^T) -> attn_drop -> @ v``, the same maths) and
records what enters ``attn_drop``, which is exactly the probabilities; each module's flag is put back on
exit, also on errors, and overlapping attaches share the switch. The trace has one stream whose special
tokens are timm's prefix tokens (class token, registers) and whose patch grid is the patch embedding's.

torch and timm are imported inside methods only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, cast

import numpy as np

import attnflow
from attnflow.recording import deferred_interrupts, switch

from . import _torch_common as common


def is_timm_attention(module: Any) -> bool:
    """A timm attention module: it has the ``fused_attn`` switch and an ``attn_drop`` the probabilities pass."""
    return (
        type(module).__module__.startswith("timm.")
        and hasattr(module, "fused_attn")
        and hasattr(module, "attn_drop")
        and hasattr(module.attn_drop, "register_forward_pre_hook")
    )


class TimmAdapter(attnflow.Adapter):
    """Captures timm models (ViT, DeiT, EVA-style blocks with timm's ``Attention``); no options."""

    name = "timm"
    framework = "timm"
    array_library = "torch"
    extra = "timm"
    priority = 10
    options = ()
    captures = frozenset({"weights", "attn_grad"})

    def claims(self, model: Any) -> bool:
        torch = attnflow.import_optional("torch", self.extra)
        model = common.unwrap_compiled(model)
        return isinstance(model, torch.nn.Module) and any(is_timm_attention(m) for m in model.modules())

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        return common.run_without_grad(common.unwrap_compiled(model), args, kwargs)

    @contextmanager
    # override ignored: an adapter takes only the options it declares (attnflow.capture checks them first)
    def hooks(self, model: Any, recorder: attnflow.Recorder) -> Iterator[None]:  # type: ignore[override]
        torch = attnflow.import_optional("torch", self.extra)
        model = common.unwrap_compiled(model)
        targets = [(path, m) for path, m in model.named_modules() if is_timm_attention(m)]
        if not targets:
            raise attnflow.AdapterError(
                f"Adapter 'timm': {type(model).__name__} has no timm attention module (a module of timm with "
                "fused_attn and attn_drop). For other modules use adapter='torch' with modules=[...]."
            )
        passes = common.TorchPass(recorder)
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)

        def describe_call(args: tuple, kwargs: dict) -> dict[str, Any]:
            return {"metadata": {"captured_with": "fused_attn=False"}}

        def finish(p: common.TorchPass) -> None:
            length = p.state.length
            if grid is None or length is None or length != prefix + int(grid[0]) * int(grid[1]):
                return
            special = np.zeros((cast(int, p.state.batch), length), bool)  # set with the length
            special[:, :prefix] = True
            p.recorder.describe_stream(None, special=special, grid=(int(grid[0]), int(grid[1])))

        passes.finishers.append(finish)
        handles: list[Any] = []
        with ExitStack() as held, common.removing(handles):
            for _, module in targets:
                held.enter_context(switch(("timm.fused_attn", id(module)), _unfuse(module), _refuse(module)))
            with deferred_interrupts():
                for path, module in targets:
                    common.register(handles, module.attn_drop.register_forward_pre_hook, _probabilities(path, module, passes, torch))
                common.install_pass_hooks(model, passes, describe_call, handles)
            yield


def _unfuse(module: Any) -> Any:
    def turn_on() -> Any:
        before = module.fused_attn
        module.fused_attn = False
        return before

    return turn_on


def _refuse(module: Any) -> Any:
    def turn_off(before: Any) -> None:
        module.fused_attn = before

    return turn_off


def _probabilities(path: str, attention: Any, passes: common.TorchPass, torch: Any) -> Any:
    def hook(dropout: Any, args: tuple) -> None:
        weights = args[0] if args else None
        if not isinstance(weights, torch.Tensor) or weights.ndim != 4:
            raise attnflow.AdapterError(
                f"{path} ({type(attention).__name__}): its attn_drop received {type(weights).__name__}, not the "
                "(batch, heads, query, key) probabilities; this timm attention module works differently."
            )
        if passes.state.length is None:
            passes.state.length = int(weights.shape[-1])
        if passes.state.batch is None:
            passes.state.batch = int(weights.shape[0])
        passes.add(path, weights, training=attention.training and dropout.p > 0)

    return hook
