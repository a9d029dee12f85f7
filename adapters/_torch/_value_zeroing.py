"""Value zeroing (Mohebbi, Zuidema, Chrupała & Alishahi, EACL 2023) at capture time: each layer re-run once per
token with that token's value vectors zeroed.

Private to attnflow.adapters; torch is passed in. For each recorded attention module of a family in
:data:`attnflow.adapters._torch._values.VALUE_MAPS`, the inputs and output of its layer (the whole transformer
block: attention, feed-forward, norms) are kept during the forward pass; at its end, for every item and real
key token ``j``, the layer is run again on that item's inputs (the variants in batches of :data:`CHUNK`) with
a hook that zeroes ``j``'s value vectors in that module, and the cosine distance ``1 - cos(output_i, original
output_i)`` (in float64, as ``‖â - b̂‖² / 2`` of the unit vectors, which has no cancellation when the two are
close) becomes entry ``[i, j]`` of the module's extra ``"value_zeroing"`` ``(batch, queries, keys)``. Entries
on padding are 0, and so are a causal stream's future keys (``j > i``).

Encoder-decoders (BART, Marian, mBART, whose map has a ``cross`` part): a decoder layer is re-run with an
encoder token's values zeroed in its cross-attention too, so the cross-attention module gets
``(batch, decoder queries, encoder keys)`` distances of the same layer output; the method
(``attnflow.methods._contributions.ValueZeroing``) normalises each decoder row over both parts together.
Cache arguments are left out of the re-runs, so a cache the model returns is not touched.

A fused projection has only its value part zeroed: the last third (GPT-2's ``[q | k | v]``) or, laid out per
head (GPT-NeoX's ``[q_h, k_h, v_h]``), the last third of each head's slice. SegFormer's spatial-reduction
blocks, recorded as attention from the patches to their pooled keys, have each pooled key's values zeroed (the
key count read from the value module in one probe run of the block); the method normalises those rows on their
own, as a block with no self-attention partner.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np

import attnflow
from attnflow.recording import CaptureUnavailableError, deferred_interrupts

from .._hf_families import pick_key_stream
from . import _reduced
from . import _torch_common as common
from ._values import heads_of, value_map

_CACHE_KEYWORDS = ("past_key_values", "past_key_value", "layer_past", "cache", "use_cache")
#: Zeroed variants of one item run through a layer at a time (bounds the memory of long inputs).
CHUNK = 64


@dataclasses.dataclass(frozen=True)
class _Zeroed:
    """One recorded attention module whose values are zeroed: its path, kind and value module."""

    path: str
    kind: str
    value: Any
    part: str
    heads: int = 1


def install(model: Any, targets: list[tuple[str, Any, str, int]], passes: common.TorchPass, torch: Any,
            handles: list[Any]) -> None:
    family = value_map(model, "value_zeroing")
    modules = dict(model.named_modules())
    layers: dict[str, list[_Zeroed]] = {}  # layer (block) path -> the attention modules zeroed in it
    for path, attention, kind, _ in targets:
        layout = family if kind == "self" else family.cross
        if layout is None:
            raise CaptureUnavailableError(
                f"value_zeroing=True: {type(model).__name__} has cross-attention layers ({path!r}) but its family's "
                "path map describes no cross-attention block (ValueMap.cross; attnflow.adapters.register_value_map), "
                "so its encoder tokens' values cannot be zeroed; BART, Marian and mBART have one.", kind="value_zeroing",
            )
        if not path.endswith("." + layout.attention):
            continue
        layer = path[: -len(layout.attention) - 1]
        value = modules.get(f"{layer}.{layout.value}")
        if value is None:
            raise attnflow.AdapterError(f"value_zeroing=True: layer {layer!r} has no {layout.value!r} module.")
        heads = heads_of(attention, model.config) if layout.value_part == "qkv_heads" else 1
        layers.setdefault(layer, []).append(_Zeroed(path, kind, value, layout.value_part, heads))
    if not layers:
        raise CaptureUnavailableError(
            f"value_zeroing=True: no attention layer of {type(model).__name__} matches its path map.", kind="value_zeroing")

    def keep_inputs(layer: str) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            if passes.active and not passes.paused:
                passes.state.vz_inputs.setdefault(layer, []).append((args, kwargs))

        return hook

    def keep_output(layer: str) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            if passes.active and not passes.paused:
                hidden = output[0] if isinstance(output, tuple) else output
                passes.state.vz_outputs.setdefault(layer, []).append(hidden.detach())

        return hook

    for layer in layers:
        common.register(handles, modules[layer].register_forward_pre_hook, keep_inputs(layer), with_kwargs=True)
        common.register(handles, modules[layer].register_forward_hook, keep_output(layer))

    def finish(p: common.TorchPass) -> None:
        inputs, outputs = p.state.vz_inputs, p.state.vz_outputs
        indices = p.state.indices
        with torch.no_grad():
            for layer, zeroed in layers.items():
                for call, (args, kwargs) in enumerate(inputs.get(layer, [])):
                    original = outputs[layer][call]
                    for target in zeroed:
                        recorded = indices.get(target.path, [])
                        if call >= len(recorded):
                            continue
                        rows, cols, keys, causal = _token_masks(p, target, original, modules[layer], args, kwargs,
                                                                torch)
                        scores = _scores(modules[layer], target, args, kwargs, original, keys, rows, cols, causal,
                                         torch)
                        p.recorder.add_extras(recorded[call], value_zeroing=scores)

    passes.finishers.append(finish)


def _token_masks(p: common.TorchPass, target: _Zeroed, original: Any, layer: Any, args: tuple, kwargs: dict,
                 torch: Any) -> tuple[np.ndarray | None, np.ndarray | None, int, bool]:
    """``(query mask, key mask, key length, causal)`` of one zeroed module in a call of ``layer``: the real-token
    masks of its query and key streams as the adapter described them in this pass (None: every token is real),
    and whether it is the self-attention of a causal stream."""
    known = _described_streams(p)
    query = p.stream_of(target.path)
    info = known.get(query, {})
    batch, length = int(original.shape[0]), int(original.shape[1])
    rows = _mask(info.get("mask"), (batch, length))
    if target.kind == "self":
        return rows, rows, length, bool(info.get("causal"))
    keys = _key_length(args, kwargs)
    if keys is None and _reduced.BLOCK.fullmatch(target.path):
        return rows, None, _probe_keys(layer, target, args, kwargs, torch), False  # pooled keys: every one real
    if keys is None:
        raise attnflow.AdapterError(
            f"value_zeroing=True: {target.path!r} is a cross-attention layer, but its layer was called without "
            "encoder_hidden_states (batch, keys, hidden), so the encoder tokens to zero are unknown."
        )
    key = pick_key_stream(query, keys, p.seen) if query is not None else None
    cols = _mask(known.get(key, {}).get("mask"), (batch, keys)) if key is not None else None
    return rows, cols, keys, False


def _described_streams(p: common.TorchPass) -> dict[Any, dict[str, Any]]:
    """What the recorder's open pass knows of each stream (mask, causal flag), {} where it says nothing."""
    current = getattr(p.recorder, "_pass", None)
    streams = getattr(current, "streams", None)
    return dict(streams) if isinstance(streams, dict) else {}


def _mask(mask: Any, shape: tuple[int, int]) -> np.ndarray | None:
    if mask is None:
        return None
    array = np.asarray(mask).astype(bool)
    return array if array.shape == shape else None


def _key_length(args: tuple, kwargs: dict) -> int | None:
    """The key length of a decoder layer's cross-attention: its ``encoder_hidden_states``' length."""
    states = kwargs.get("encoder_hidden_states")
    if states is None and len(args) > 2:
        states = args[2]
    shape = getattr(states, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) == 3 else None


def _probe_keys(layer: Any, target: _Zeroed, args: tuple, kwargs: dict, torch: Any) -> int:
    """The key length of ``target``: the token axis of its value module's output, in a run of the layer on
    the first item alone (its keys are computed inside the layer, as SegFormer's pooling is)."""
    seen: list[int] = []
    args, kwargs = _without_cache(layer, args, kwargs)
    batch = int(next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).shape[0])
    with common.removing([]) as probing:
        with deferred_interrupts():
            common.register(probing, target.value.register_forward_hook,
                            lambda module, inputs, output: seen.append(int(output.shape[1])))
        layer(*_variants(args, 0, batch, 1, torch), **_variants(kwargs, 0, batch, 1, torch))
    return seen[0]


def _scores(layer: Any, target: _Zeroed, args: tuple, kwargs: dict, original: Any, keys: int,
            rows_mask: np.ndarray | None, cols_mask: np.ndarray | None, causal: bool, torch: Any) -> np.ndarray:
    """``(batch, queries, keys)`` float64 cosine distances of the layer's outputs with each real key token's
    values zeroed in ``target``'s value module; 0 on padding and, when causal, on future keys."""
    batch, queries, _ = original.shape
    out = np.zeros((batch, queries, keys))
    args, kwargs = _without_cache(layer, args, kwargs)
    for b in range(batch):
        rows = np.arange(queries) if rows_mask is None else np.flatnonzero(rows_mask[b])
        cols = np.arange(keys) if cols_mask is None else np.flatnonzero(cols_mask[b])
        reference = torch.nn.functional.normalize(original[b].double(), dim=-1)  # (queries, d)
        for start in range(0, cols.size, CHUNK):
            positions = cols[start : start + CHUNK]
            count = positions.size
            with common.removing([]) as zeroing:  # the zeroing hook is gone when the re-run ends, however
                with deferred_interrupts():
                    common.register(zeroing, target.value.register_forward_hook,
                                    _zeroing(torch.as_tensor(positions), target.part, target.heads, torch))
                result = layer(*_variants(args, b, batch, count, torch), **_variants(kwargs, b, batch, count, torch))
            hidden = result[0] if isinstance(result, tuple) else result
            unit = torch.nn.functional.normalize(hidden.double(), dim=-1)  # (count, queries, d)
            distance = 0.5 * (unit - reference).pow(2).sum(-1)  # ‖â - b̂‖² / 2 = 1 - cos, in float64
            out[b][np.ix_(rows, positions)] = distance.T.cpu().numpy()[rows]
        if causal:
            out[b] = np.tril(out[b])  # j > i: a future token, which a causal layer cannot read
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


def _zeroing(positions: Any, part: str, heads: int, torch: Any) -> Any:
    """A value module's forward hook: in variant ``k`` of the batch, token ``positions[k]``'s values are zero
    (a fused projection: only its value third, or each head's value third where it is laid out per head)."""

    def zero(module: Any, args: tuple, output: Any) -> Any:
        output = output.clone()
        variants = torch.arange(positions.numel())
        if part == "qkv_heads":
            size = output.shape[-1] // (3 * heads)
            per_head = output.view(*output.shape[:-1], heads, 3 * size)
            per_head[variants, positions, :, 2 * size :] = 0.0
            return output
        start = 2 * output.shape[-1] // 3 if part == "qkv" else 0
        output[variants, positions, start:] = 0.0
        return output

    return zero


def _variants(value: Any, b: int, batch: int, count: int, torch: Any) -> Any:
    """Item ``b`` of every batch-first tensor in ``value``, repeated ``count`` times (shared tensors kept; a 1-D
    tensor, such as ``cache_position``, is a position axis, never the batch)."""
    if isinstance(value, torch.Tensor):
        if value.ndim < 2:
            return value
        if value.shape[0] == batch and batch > 1:
            value = value[b : b + 1]
        if value.shape[0] == 1:
            return value.expand(count, *value.shape[1:])
        return value
    if isinstance(value, tuple):
        return tuple(_variants(item, b, batch, count, torch) for item in value)
    if isinstance(value, list):
        return [_variants(item, b, batch, count, torch) for item in value]
    if isinstance(value, dict):
        return {key: _variants(item, b, batch, count, torch) for key, item in value.items()}
    return value
