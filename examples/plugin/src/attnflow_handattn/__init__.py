"""attnflow-handattn: an attnflow adapter for :class:`~attnflow_handattn.model.HandAttentionNet`.

Its attention module computes fused SDPA and returns only its output, so this adapter recovers the
probabilities: it keeps what each module's query and key projections return during the forward pass
and computes ``softmax(q k^T / sqrt(d))`` under the module's own padding mask. torch is imported only
when the adapter runs, never when attnflow loads this entry point.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

import attnflow

__all__ = ["HandAttnAdapter"]


def _is_hand_attention(module: Any) -> bool:
    model = sys.modules.get("attnflow_handattn.model")
    return model is not None and isinstance(module, model.HandAttention)


class HandAttnAdapter(attnflow.Adapter):
    """Captures ``HandAttentionNet`` models (and any model built of ``HandAttention`` modules)."""

    name = "handattn"
    framework = "torch"
    array_library = "torch"
    extra = "torch"
    priority = 20  # asked before the generic torch adapter
    options = (attnflow.AdapterOption("scale", float, None, "attention scale (default 1/sqrt(head size))"),)
    captures = frozenset({"weights"})

    def claims(self, model: Any) -> bool:
        return hasattr(model, "modules") and any(_is_hand_attention(m) for m in model.modules())

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        torch = attnflow.import_optional("torch", "torch")
        with torch.no_grad():
            return model(*args, **kwargs)

    @contextlib.contextmanager
    def hooks(self, model: Any, recorder: attnflow.Recorder, *, scale: float | None = None) -> Iterator[None]:
        torch = attnflow.import_optional("torch", "torch")
        handles: list[Any] = []
        pending: dict[int, dict[str, Any]] = {}

        def begin(module: Any, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            recorder.start_call(
                input_ids=None if ids is None else ids.detach().cpu().numpy(),
                mask=None if mask is None else mask.detach().cpu().numpy().astype(bool),
            )

        def end(module: Any, args: tuple, output: Any) -> None:
            recorder.end_call()

        def failed(module: Any, args: tuple, output: Any) -> None:  # always called: drop a pass that raised
            if output is None:
                recorder.abort_call()

        def keep(slot: str, owner: int) -> Any:
            def hook(module: Any, args: tuple, output: Any) -> None:
                pending.setdefault(owner, {})[slot] = output

            return hook

        def record(path: str) -> Any:
            def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
                seen = pending.pop(id(module), {})
                padding = kwargs.get("padding", args[1] if len(args) > 1 else None)
                q, k = module.split(seen["q"]), module.split(seen["k"])
                factor = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
                scores = (q @ k.transpose(-1, -2)) * factor
                if padding is not None:
                    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
                weights = torch.softmax(scores, dim=-1)
                recorder.record(path, weights.detach().float().cpu().numpy(), training=module.training)

            return hook

        try:
            handles.append(model.register_forward_pre_hook(begin, with_kwargs=True))
            for path, module in model.named_modules():
                if _is_hand_attention(module):
                    handles.append(module.q_proj.register_forward_hook(keep("q", id(module))))
                    handles.append(module.k_proj.register_forward_hook(keep("k", id(module))))
                    handles.append(module.register_forward_hook(record(path), with_kwargs=True))
            handles.append(model.register_forward_hook(end))
            handles.append(model.register_forward_hook(failed, always_call=True))
            yield
        finally:
            for handle in reversed(handles):
                handle.remove()
