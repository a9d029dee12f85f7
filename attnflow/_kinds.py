"""The capture kinds: everything a capture can record beside the attention weights, declared once.

Each [`CaptureKind`][attnflow.recording.CaptureKind] says, in one place, the adapter capability that provides it, the keyword of
[`attnflow.capture`][attnflow.recording.capture] / [`attnflow.attach`][attnflow.attach] that turns it on, the per-layer extras it records (with
their token axes, used to crop an item to its tokens), and the sentence that tells a user how to get it.
Method needs (``Method.needs``), the capture request, adapters' declared capabilities, ``attnflow batch``'s
settings and the trace's extras axes all read this table; adding a kind means adding a row here and
teaching the adapters that record it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any


@dataclasses.dataclass(frozen=True)
class CaptureKind:
    """One thing a capture can record.

    Attributes:
        name: the name methods list in ``needs`` and adapters in ``captures``.
        summary: one line, what it is.
        keyword: the keyword of [`attnflow.capture`][attnflow.recording.capture] that records it (None: always recorded, or recorded
            by a faithfulness probe rather than into the trace).
        extras: per-layer extras it records -> their token axes after the batch axis (``"q"``: the layer's
            query stream, ``"k"``: its key stream, ``""``: another axis).
        shared: extras among ``extras`` that are parameters, the same for every item (first axis 1).
        marker: the extra whose presence on a layer shows the kind was captured for that layer.
        how: how a user gets it (ends without a full stop).
        in_trace: recorded into the trace (False: used by `attnflow.faithfulness` probes).
        cost: what it costs beyond one forward pass ('' when nothing worth saying).
    """

    name: str
    summary: str
    keyword: str | None = None
    extras: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    shared: frozenset[str] = frozenset()
    marker: str | None = None
    how: str = ""
    in_trace: bool = True
    cost: str = ""

    def keywords(self, target: Any = None) -> dict[str, Any]:
        """The [`attnflow.capture`][attnflow.recording.capture] keywords that record this kind (``target`` for attention gradients)."""
        if self.keyword is None:
            return {}
        return {self.keyword: target} if self.keyword == "target" else {self.keyword: True}


_VALUE_EXTRAS = {
    "value": ("", "k", ""), "residual": ("q", ""), "norm_input": ("q", ""), "norm_output": ("q", ""),
    "block_output": ("q", ""), "out_weight": (), "out_bias": (), "norm_weight": (), "norm_bias": (), "norm_eps": (),
}

#: Every capture kind, by name.
KINDS: Mapping[str, CaptureKind] = MappingProxyType({kind.name: kind for kind in (
    CaptureKind(
        "weights", "attention probabilities, (batch, heads, queries, keys) per layer",
        how="Every trace has them",
    ),
    CaptureKind(
        "attn_grad", "gradients of a target score with respect to the attention probabilities",
        keyword="target", extras={"attn_grad": ("", "q", "k")}, marker="attn_grad",
        how="Capture with a target: attnflow.capture(model, ..., target=CLASS_OR_TOKEN_ID) (None: the argmax "
            "logit), or attnflow.capture(model, ..., methods=[...]); on the command line --target",
        cost="one backward pass",
    ),
    CaptureKind(
        "values", "value vectors, output projection, residual input and norms of each layer",
        keyword="values", extras=_VALUE_EXTRAS,
        shared=frozenset({"out_weight", "out_bias", "norm_weight", "norm_bias", "norm_eps"}), marker="value",
        how="Capture the value-side tensors: attnflow.capture(model, ..., values=True), or "
            "attnflow.capture(model, ..., methods=[...])",
    ),
    CaptureKind(
        "value_zeroing", "per-layer value-zeroing scores (each token's values zeroed in turn)",
        keyword="value_zeroing", extras={"value_zeroing": ("q", "k")}, marker="value_zeroing",
        how="Value zeroing re-runs each layer once per token: attnflow.capture(model, ..., value_zeroing=True), or "
            "attnflow.capture(model, ..., methods=[...])",
        cost="about one forward pass per token",
    ),
    CaptureKind(
        "input_gradients", "gradients of a target score with respect to the input embeddings",
        in_trace=False, how="Computed by attnflow.faithfulness through an adapter that declares it",
    ),
    CaptureKind(
        "ablation", "blanking input tokens out and re-running the model",
        in_trace=False, how="Computed by attnflow.faithfulness through an adapter that declares it",
    ),
)})
"""Every capture kind, by name: name -> [`CaptureKind`][attnflow.recording.CaptureKind] (read-only)."""

#: Adapter capabilities that are not capture kinds: what kind of models and calls an adapter handles.
FEATURES: Mapping[str, str] = MappingProxyType({
    "streams": "several token streams and cross-attention (encoder-decoder, towers)",
    "generation": "stitching generate()'s cached steps into one trace",
})

#: Everything an adapter may declare in ``Adapter.captures``.
CAPABILITIES = frozenset(KINDS) | frozenset(FEATURES)

#: Token axes of every per-layer extra attnflow's adapters record, over all kinds.
EXTRA_TOKEN_AXES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {name: axes for kind in KINDS.values() for name, axes in kind.extras.items() if name not in kind.shared}
)
#: Extras that are parameters, the same for every item.
SHARED_EXTRAS = frozenset().union(*(kind.shared for kind in KINDS.values()))


def how_to_get(kind: str) -> str:
    """The sentence that tells a user how to capture ``kind``."""
    found = KINDS.get(kind)
    return found.how if found is not None else "capture it with an adapter that provides it"


def request_keywords(kinds: Iterable[str], target: Any = None) -> dict[str, Any]:
    """The [`attnflow.capture`][attnflow.recording.capture] keywords that record ``kinds`` (unknown names and probe kinds add nothing)."""
    keywords: dict[str, Any] = {}
    for name in kinds:
        kind = KINDS.get(name)
        if kind is not None and kind.in_trace:
            keywords.update(kind.keywords(target))
    return keywords
