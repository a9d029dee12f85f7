"""Stitching the forward passes of one ``generate()`` call into one trace.

With a key-value cache, ``generate()`` runs a prefill pass over the prompt (queries = the prompt) and
then one pass per new token whose queries are that token alone, against every cached key. No single pass
is a trace. Stitched, they are: the rows of each layer are laid end to end along the query axis and each
step's keys are put at their absolute positions, which gives exactly the attention of one teacher-forced
forward pass over the prompt and the generated tokens (all but the last, which no pass read).

Where each step's keys sit, for self-attention, from the number ``K`` of keys a step returns and the
length ``T`` of the sequence up to and including its queries:

* ``K == T``: every position (a growing cache);
* ``K > T``: positions ``0..T-1`` in the first ``T`` slots, the rest unused (a static cache padded to its
  length, or a static sliding-window buffer not yet full);
* ``K < T``: the last ``K`` positions, ``T-K..T-1`` (a sliding-window cache, dynamic or static: both hand
  the window's keys over in order).

Cross-attention keys (an encoder's tokens) are the same at every step. Beam search reorders the cache
between steps, so its steps cannot be stitched row by row: the adapters refuse it and offer a re-run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import AdapterError

__all__ = ["GenerationStep", "StepLayer", "generated_mask"]

#: Attention on key slots past the last written position above this is an error (float32 rounding is below).
_UNWRITTEN = 1e-6


@dataclasses.dataclass(frozen=True)
class StepLayer:
    """One layer of one generation step as the model computed it.

    Attributes:
        name: the module path (unnumbered: a path recorded twice in a step appears twice).
        weights: ``(batch, heads, q, K)``: the step's queries against the keys its cache handed over.
        kind: ``"self"``, ``"cross"`` or None (self-attention of the only stream).
        query_stream, key_stream: as in [`attnflow.LayerAttention`][attnflow.LayerAttention] (None: the only stream).
    """

    name: str
    weights: np.ndarray
    kind: str | None
    query_stream: str | None
    key_stream: str | None


@dataclasses.dataclass(frozen=True)
class GenerationStep:
    """One forward pass of a ``generate()`` call (``Recorder.steps``): the prefill (or an encoder run)
    first, then one per new token."""

    index: int
    layers: tuple[StepLayer, ...]

    @property
    def queries(self) -> dict[str | None, int]:
        """Per query stream, how many queries this step ran (the prompt's length, then 1 per token)."""
        out: dict[str | None, int] = {}
        for layer in self.layers:
            out.setdefault(layer.query_stream, int(layer.weights.shape[2]))
        return out


def stitch(steps: Sequence[Any]) -> list[Any]:
    """The layers of the stitched pass from the buffered passes of a generation (each with ``.layers`` of
    the recorder's layer records): per layer, ``(batch, heads, length, keys)`` weights over every position.
    """
    order: list[tuple[str, int]] = []
    found: dict[tuple[str, int], list[tuple[int, Any]]] = {}
    queries: list[dict[str | None, int]] = []
    for s, step in enumerate(steps):
        seen: dict[str, int] = {}
        per_stream: dict[str | None, int] = {}
        for layer in step.layers:
            k = seen.get(layer.name, 0)
            seen[layer.name] = k + 1
            key = (layer.name, k)
            if key not in found:
                order.append(key)
                found[key] = []
            found[key].append((s, layer))
            q = int(layer.weights.shape[2])
            if per_stream.setdefault(layer.query_stream, q) != q:
                raise AdapterError(
                    f"Generation step {s} ran {per_stream[layer.query_stream]} queries in one layer and {q} in "
                    f"{layer.name!r} of the same stream; attnflow stitches steps whose layers all see the same new "
                    "tokens. Capture with attach(model, generation='rerun') instead."
                )
        queries.append(per_stream)
    batch = {int(layer.weights.shape[0]) for step in steps for layer in step.layers}
    if len(batch) > 1:
        raise AdapterError(
            f"The generation steps ran different batch sizes {sorted(batch)} (beam search or a batch that "
            "shrinks as items finish), so their rows cannot be stitched per sequence. Capture with "
            "attach(model, generation='rerun'), which runs one forward pass over the finished sequences."
        )
    offsets: list[dict[str | None, int]] = []
    running: dict[str | None, int] = {}
    for per_stream in queries:
        offsets.append(dict(running))
        for stream, q in per_stream.items():
            running[stream] = running.get(stream, 0) + q
    out = []
    for key in order:
        records = found[key]
        first = records[0][1]
        stream = first.query_stream
        total = running[stream]
        cross = first.kind == "cross" or (first.key_stream is not None and first.key_stream != stream)
        if len(records) == 1 and int(first.weights.shape[2]) == total and (cross or first.weights.shape[3] == total):
            out.append(first)
            continue
        keys = {int(layer.weights.shape[3]) for _, layer in records}
        if cross and len(keys) > 1:
            raise AdapterError(
                f"Cross-attention layer {key[0]!r} saw {sorted(keys)} keys in different generation steps; the "
                "encoder's tokens must stay the same through one generate() call."
            )
        width = keys.pop() if cross else total
        b, h = first.weights.shape[:2]
        weights = np.zeros((b, h, total, width), dtype=first.weights.dtype)
        for s, layer in records:
            w = layer.weights
            start = offsets[s].get(stream, 0)
            q, k = int(w.shape[2]), int(w.shape[3])
            end = start + q
            if cross:
                weights[:, :, start:end, :] = w
            elif k >= end:
                # the step's last query is a real token (a padded query row spreads over every slot)
                unwritten = float(np.abs(w[..., -1, end:]).max(initial=0.0))
                if unwritten > _UNWRITTEN:
                    raise AdapterError(
                        f"Layer {key[0]!r} attends to unwritten cache slots in generation step {s}: its query at "
                        f"position {end - 1} puts up to {unwritten:.3g} of its attention on the "
                        f"{k - end} key slots after position {end - 1}, which no token has filled (a static cache the "
                        "model masks wrongly). The model's outputs under this cache are not those of its real "
                        "attention; generate with the default dynamic cache (leave cache_implementation out)."
                    )
                weights[:, :, start:end, :end] = w[..., :end]
            else:
                weights[:, :, start:end, end - k:end] = w
        out.append(dataclasses.replace(first, weights=weights))
    _stitch_links(steps, running)
    return out


def _stitch_links(steps: Sequence[Any], lengths: dict[str | None, int]) -> None:
    """The links a step recorded (a vision-language prefill's image tokens fed by vision patches), widened in
    place to the stitched length of the stream they feed: the generated tokens are fed by nothing."""
    for step in steps:
        links = getattr(step, "links", None)
        if not links:
            continue
        widened = []
        for link in links:
            total = lengths.get(link.stream, int(link.weights.shape[1]))
            short = total - int(link.weights.shape[1])
            if short > 0:
                link = dataclasses.replace(link, weights=np.pad(link.weights, ((0, 0), (0, short), (0, 0))))
            widened.append(link)
        step.links = widened


def generated_mask(
    prompt_mask: np.ndarray | None, prompt_length: int, generated: np.ndarray, eos: Sequence[int] = (),
) -> np.ndarray:
    """The real-token mask of the stitched stream: the prompt's mask, then every generated token up to and
    including the item's first end-of-sequence token; later positions (padding a finished item) are masked.

    Args:
        prompt_mask: ``(batch, prompt_length)`` (None: all real).
        generated: ``(batch, new)`` the generated token ids fed back as inputs (``sequences[:, P:-1]``).
        eos: the end-of-sequence ids.

    Returns:
        ``(batch, prompt_length + new)`` bool.
    """
    generated = np.asarray(generated)
    batch = generated.shape[0]
    prompt = np.ones((batch, prompt_length), bool) if prompt_mask is None else np.asarray(prompt_mask).astype(bool)
    real = np.ones(generated.shape, bool)
    if len(eos) and generated.size:
        ended = np.isin(generated, list(eos))
        # a position is padding when an end-of-sequence token came strictly before it
        before: np.ndarray = np.cumsum(ended, axis=1) - ended
        real = before == 0
    return np.concatenate([prompt, real], axis=1)
