"""Value zeroing (Mohebbi et al., 2023) at capture time: each layer re-run once per token with that token's
value vectors zeroed.

Private to attnflow.adapters; torch is passed in. For each recorded self-attention layer of a family in
:data:`attnflow.adapters._values.VALUE_MAPS`, the layer module's inputs and output are kept during the
forward pass; at its end, for every item and real token ``j``, the layer is run again on that item's inputs
(all ``n`` variants in one batch) with a hook that zeroes ``j``'s value vectors, and ``1 - cos(output_i,
original output_i)`` becomes entry ``[i, j]`` of the layer's extra ``"value_zeroing"`` ``(batch, queries,
keys)``. Cache arguments are left out of the re-runs, so a cache the model returns is not touched.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

import attnflow

from . import _torch_common as common
from ._values import value_map

_CACHE_KEYWORDS = ("past_key_values", "past_key_value", "layer_past", "cache", "use_cache")


def install(model: Any, targets: list[tuple[str, Any, str, int]], passes: common.TorchPass, torch: Any,
            handles: list[Any]) -> None:
    layout = value_map(model)
    modules = dict(model.named_modules())
    layers = []
    for path, _, kind, _ in targets:
        if kind == "self" and path.endswith("." + layout.attention):
            layer = path[: -len(layout.attention) - 1]
            layers.append((path, modules[layer], modules[f"{layer}.{layout.value}"]))
    if not layers:
        raise attnflow.AdapterError(f"value_zeroing=True: no self-attention layer of {type(model).__name__} matches its path map.")

    def keep_inputs(path: str) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            if passes.active and not passes.paused:
                passes.state.setdefault("vz_inputs", {}).setdefault(path, []).append((args, kwargs))

        return hook

    def keep_output(path: str) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            if passes.active and not passes.paused:
                hidden = output[0] if isinstance(output, tuple) else output
                passes.state.setdefault("vz_outputs", {}).setdefault(path, []).append(hidden.detach())

        return hook

    for path, layer, _ in layers:
        handles.append(layer.register_forward_pre_hook(keep_inputs(path), with_kwargs=True))
        handles.append(layer.register_forward_hook(keep_output(path)))

    def finish(p: common.TorchPass) -> None:
        inputs, outputs = p.state.get("vz_inputs", {}), p.state.get("vz_outputs", {})
        indices = p.state.get("indices", {})
        masks = p.state.get("target_tokens") or (None, None)
        with torch.no_grad():
            for path, layer, value in layers:
                for call, index in enumerate(indices.get(path, [])):
                    args, kwargs = inputs[path][call]
                    original = outputs[path][call]
                    scores = _scores(layer, value, layout.value_part, args, kwargs, original, masks[0], torch)
                    p.recorder.add_extras(index, value_zeroing=scores)

    passes.finishers.append(finish)


def _scores(layer: Any, value: Any, part: str, args: tuple, kwargs: dict, original: Any, mask: Any,
            torch: Any) -> np.ndarray:
    batch, tokens, _ = original.shape
    out = np.zeros((batch, tokens, tokens))
    args, kwargs = _without_cache(layer, args, kwargs)
    for b in range(batch):
        real = np.arange(tokens) if mask is None else np.flatnonzero(np.asarray(mask)[b])
        count = real.size
        zeroed = torch.as_tensor(real)

        handle = value.register_forward_hook(_zeroing(zeroed, part, torch))
        try:
            result = layer(*_variants(args, b, batch, count, torch), **_variants(kwargs, b, batch, count, torch))
        finally:
            handle.remove()
        hidden = result[0] if isinstance(result, tuple) else result
        reference = original[b : b + 1].expand(count, -1, -1)
        cosine = torch.nn.functional.cosine_similarity(hidden.float(), reference.float(), dim=-1)  # (count, tokens)
        distance = (1.0 - cosine).clamp(min=0.0).T.cpu().double().numpy()  # [i, k]: i's output with real[k] zeroed
        out[b][np.ix_(real, real)] = distance[real]
    return out


def _without_cache(layer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The layer's call with every cache argument (given by name or position) left out."""
    try:
        bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return args, {k: v for k, v in kwargs.items() if k not in _CACHE_KEYWORDS}
    for name in _CACHE_KEYWORDS:
        if name in bound.arguments:
            bound.arguments[name] = False if name == "use_cache" else None
    extra = bound.arguments.pop("kwargs", None) if "kwargs" in bound.arguments else None
    if isinstance(extra, dict):
        bound.arguments.update({k: v for k, v in extra.items() if k not in _CACHE_KEYWORDS})
    return tuple(bound.args), dict(bound.kwargs)


def _zeroing(positions: Any, part: str, torch: Any) -> Any:
    """A value module's forward hook: in variant ``k`` of the batch, token ``positions[k]``'s values are zero."""

    def zero(module: Any, args: tuple, output: Any) -> Any:
        output = output.clone()
        start = 2 * output.shape[-1] // 3 if part == "qkv" else 0  # a fused projection: only its value third
        output[torch.arange(positions.numel()), positions, start:] = 0.0
        return output

    return zero


def _variants(value: Any, b: int, batch: int, count: int, torch: Any) -> Any:
    """Item ``b`` of every batch-first tensor in ``value``, repeated ``count`` times (shared tensors kept)."""
    if isinstance(value, torch.Tensor):
        if value.ndim and value.shape[0] == batch and batch > 1:
            value = value[b : b + 1]
        if value.ndim and value.shape[0] == 1:
            return value.expand(count, *value.shape[1:])
        return value
    if isinstance(value, tuple):
        return tuple(_variants(item, b, batch, count, torch) for item in value)
    if isinstance(value, list):
        return [_variants(item, b, batch, count, torch) for item in value]
    if isinstance(value, dict):
        return {key: _variants(item, b, batch, count, torch) for key, item in value.items()}
    return value
