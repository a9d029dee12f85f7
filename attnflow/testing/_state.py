"""What "the model is as it was" means, per framework: a snapshot to compare before and after a capture.

Frameworks are looked up in ``sys.modules`` only: a model of a framework that was never imported cannot
exist, so the kit never imports one itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

_TORCH_HOOKS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
)


def snapshot(model: Any) -> dict[str, Any]:
    """Everything a capture could leave changed on ``model`` and in the process, as comparable values."""
    state: dict[str, Any] = {"process": _process_state()}
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        state.update(_torch_state(model, torch))
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(model, nnx.Module):
        state.update(_nnx_state(model, nnx))
    state["attributes"] = _instance_attributes(model)
    return state


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Human-readable list of what changed between two snapshots (empty: nothing)."""
    found = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b), key=str):
                if not _same(a.get(sub), b.get(sub)):
                    found.append(f"{key}[{sub}]: {_short(a.get(sub))} -> {_short(b.get(sub))}")
        elif not _same(a, b):
            found.append(f"{key}: {_short(a)} -> {_short(b)}")
    return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype \
            and bool(np.array_equal(a, b, equal_nan=True))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, np.ndarray) else f"array{value.shape}"
    return text if len(text) <= 80 else text[:77] + "..."


def _process_state() -> dict[str, Any]:
    state: dict[str, Any] = {}
    torch = sys.modules.get("torch")
    if torch is not None:
        state["torch.backends.mha.fastpath"] = torch.backends.mha.get_fastpath_enabled()
        state["torch.grad_enabled"] = torch.is_grad_enabled()
    jax = sys.modules.get("jax")
    if jax is not None:
        state["jax.disable_jit"] = bool(jax.config.jax_disable_jit)
    return state


def _torch_state(model: Any, torch: Any) -> dict[str, Any]:
    hooks, flags, tensors, configs = {}, {}, {}, {}
    for path, module in model.named_modules():
        for kind in _TORCH_HOOKS:
            registered = getattr(module, kind, None)
            if registered:
                hooks[f"{path}:{kind}"] = tuple(registered.keys())
        flags[f"{path}:training"] = module.training
        if hasattr(module, "fused_attn"):
            flags[f"{path}:fused_attn"] = module.fused_attn
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[f"{path}:config"] = config._attn_implementation
            for name in getattr(config, "sub_configs", None) or {}:
                sub = getattr(config, name, None)
                if sub is not None and hasattr(sub, "_attn_implementation"):
                    configs[f"{path}:config.{name}"] = sub._attn_implementation
    for name, value in model.state_dict(keep_vars=False).items():
        tensors[name] = value.detach().cpu().float().numpy().copy() if value.is_floating_point() else \
            value.detach().cpu().numpy().copy()
    return {"torch hooks": hooks, "torch flags": flags, "torch tensors": tensors, "attention implementations": configs}


def _nnx_state(model: Any, nnx: Any) -> dict[str, Any]:
    graphdef, state = nnx.split(model)
    leaves = {}
    for path, value in nnx.to_flat_state(state):
        leaves["/".join(map(str, path))] = np.asarray(value[...] if hasattr(value, "__getitem__") else value)
    return {"nnx graphdef": repr(graphdef), "nnx state": leaves, "nnx class": type(model)}


def _instance_attributes(model: Any) -> dict[str, Any]:
    """The model object's own attribute names and identities (an adapter must not leave any set)."""
    try:
        attributes = vars(model)
    except TypeError:
        return {}
    return {name: type(value).__name__ for name, value in attributes.items() if not name.startswith("__")}


def output_of(run: Callable[[], Any]) -> list[np.ndarray]:
    """The arrays in a forward pass's output, as numpy (for "outputs identical" checks)."""
    out = run()
    arrays: list[np.ndarray] = []
    _collect(out, arrays, 0)
    return arrays


def _collect(value: Any, arrays: list[np.ndarray], depth: int) -> None:
    if depth > 6 or value is None:
        return
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        arrays.append(value.detach().cpu().float().numpy().copy())
        return
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):
        try:
            arrays.append(np.asarray(value, dtype=np.float64).copy())
            return
        except (TypeError, ValueError):
            pass
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        items = value.to_tuple() if hasattr(value, "to_tuple") else tuple(value.values())
        for item in items:
            _collect(item, arrays, depth + 1)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _collect(item, arrays, depth + 1)
