"""What faithfulness needs from a model, and the adapter side of it (capabilities ``ablation`` and
``input_gradients``).

An adapter that declares either capability implements ``probe(model, request, *args, **kwargs) -> Probe``;
the probe runs the model on the call's inputs with chosen tokens blanked out (``ablation``) and takes
gradients of the target with respect to the input embeddings (``input_gradients``). Everything else (which
variants to run, Spearman, AOPC, curves) is numpy in [`attnflow.evaluate`][attnflow.evaluate].

The target is resolved here, framework-free, so that every adapter reads it the same way: the rules are
those of ``capture(..., target=...)`` (an int indexes the last axis of the logits, None takes each item's
argmax, a callable maps the output to per-item scores, ``target_position`` picks the token of per-token
logits), plus per-item class lists, masked-language-model positions and embedding targets.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._errors import OptionError

BLANKS = ("mask", "unk", "zero")
"""How a blanked-out token is replaced: ``"mask"`` (the mask token), ``"unk"`` (the unknown token) or
``"zero"`` (a zero input embedding)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """What score of the output is explained, per item.

    Attributes:
        kind: ``"logits"`` (a logit of the model's output), ``"embedding"`` (the cosine similarity of the
            mean-pooled last hidden state, over each item's real tokens, to the unablated one) or
            ``"callable"``.
        index: ``"logits"``: None (each item's argmax on the unablated input, then held fixed), an int (the
            same logit for every item) or a tuple of ints (one per item).
        function: ``"callable"``: ``function(output)`` or ``function(output, items)`` returning per-row scores
            ``(rows,)`` or vectors ``(rows, dim)`` (compared by cosine similarity to the unablated ones);
            ``items`` says which input item each row of the output is a variant of.
        takes_items: whether ``function`` takes ``items``.
    """

    kind: str
    index: Any = None
    function: Callable[..., Any] | None = None
    takes_items: bool = False

    def describe(self) -> str:
        """One line saying what the target scores, e.g. ``"logits (each item's argmax)"``."""
        if self.kind == "embedding":
            return "embedding (cosine of the mean-pooled last hidden state to the unablated one)"
        if self.kind == "callable":
            return f"callable {getattr(self.function, '__name__', type(self.function).__name__)}"
        if self.index is None:
            return "logits (each item's argmax)"
        if isinstance(self.index, tuple):
            return "logits (one index per item)"
        return f"logits[{self.index}]"


def resolve_target(target: Any, batch: int) -> Target | None:
    """``target=`` as the user gave it, checked; None means "decide from the output" (logits if the output
    has them, else the embedding)."""
    if target is None:
        return None
    if isinstance(target, str):
        if target == "embedding":
            return Target("embedding")
        if target == "logits":
            return Target("logits")
        raise OptionError(
            f"target={target!r} is not a target; use None (the argmax logit, or the embedding for models without "
            "logits), 'logits', 'embedding', an int logit index, a list of one index per item, or a callable."
        )
    if callable(target):
        return Target("callable", function=target, takes_items=_takes_items(target))
    if _is_int(target):
        return Target("logits", index=int(target))
    if isinstance(target, (Sequence, np.ndarray)) and not isinstance(target, (str, bytes)):
        values = list(np.asarray(target).ravel().tolist()) if isinstance(target, np.ndarray) else list(target)
        if len(values) != batch or not all(_is_int(v) for v in values):
            raise OptionError(
                f"target as a list needs one int logit index per item ({batch} items), got {target!r}."
            )
        return Target("logits", index=tuple(int(v) for v in values))
    raise OptionError(f"target={target!r} is not a target; use None, 'logits', 'embedding', an int, a list or a callable.")


def _takes_items(function: Any) -> bool:
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def target_positions(
    position: int | None, mask: np.ndarray, *, causal: bool, ids: np.ndarray | None, mask_token_id: int | None,
    length: int,
) -> np.ndarray:
    """``(batch,)`` positions where per-token logits are read.

    ``position`` given: that position for every item (negative counts from the end of the padded
    sequence), as ``capture(..., target_position=)``. Otherwise, as ``capture`` does: each item's last real
    token for causal models (the next-token logits); for other models the one mask token of the item where
    there is exactly one (a masked language model's masked position), else position 0 (the classification
    token).
    """
    batch = mask.shape[0]
    if position is not None:
        if not -length <= position < length:
            raise OptionError(f"target_position={position} is outside the {length} positions of the logits.")
        return np.full(batch, position % length, dtype=np.int64)
    out = np.zeros(batch, dtype=np.int64)
    for b in range(batch):
        real = np.flatnonzero(mask[b])
        if causal and real.size:
            out[b] = real[-1]
        elif ids is not None and mask_token_id is not None:
            hits = np.flatnonzero((ids[b] == mask_token_id) & mask[b])
            if hits.size == 1:
                out[b] = hits[0]
    return out


@dataclasses.dataclass(frozen=True)
class ProbeRequest:
    """What `attnflow.faithfulness` asks of an adapter's probe.

    Attributes:
        target: the resolved target (None: decide from the output, see [`resolve_target`][attnflow.evaluate.resolve_target]).
        target_position: where per-token logits are read (see [`target_positions`][attnflow.evaluate.target_positions]).
        blank: ``"mask"``, ``"unk"``, ``"zero"`` (the token's input embedding set to zero) or a token id.
        tokenizer: the tokenizer (for its mask/unk token ids), or None.
        mask: ``(batch, tokens)`` bool, the real tokens of the explained input (from the explanation).
        causal: whether the explained stream is causal (a decoder).
        embedding: which module gives the input embeddings (a module, or its path), None: the adapter finds it.
        max_rows: at most this many input rows per forward pass.
        gradients: whether [`Probe.gradients`][attnflow.evaluate.Probe.gradients] will be asked (input gradients).
        references: the references asked for (a probe computes only the gradient references among them;
            empty: ``grad_norm`` and ``grad_x_input``, as before this field existed).
    """

    target: Target | None
    target_position: int | None
    blank: str | int
    tokenizer: Any
    mask: np.ndarray
    causal: bool
    embedding: Any = None
    max_rows: int = 256
    gradients: bool = True
    references: tuple[str, ...] = ()


class Probe(abc.ABC):
    """One model call's inputs, ready to be re-run with tokens blanked out and differentiated.

    Attributes (set by the adapter when the probe is made, from one unablated forward pass):
        base: ``(batch,)`` the target score of each item's unablated input (1.0 for embedding targets: the
            cosine of the output with itself).
        positions: ``(batch,)`` where per-token logits are read, or None (the target reads no token).
        target: the resolved [`Target`][attnflow.evaluate.Target].
        vector: whether the target is a vector compared by cosine similarity to the unablated one (the
            embedding target, or a callable returning ``(rows, dim)``).
    """

    base: np.ndarray
    positions: np.ndarray | None
    target: Target
    vector: bool = False

    @abc.abstractmethod
    def scores(self, items: np.ndarray, blanked: np.ndarray) -> np.ndarray:
        """The target score of variants of the inputs: row ``r`` is item ``items[r]`` with the tokens where
        ``blanked[r]`` is True blanked out. ``items``: ``(rows,)`` int; ``blanked``: ``(rows, tokens)`` bool.
        Returns ``(rows,)`` float64. Rows are run in forward passes of at most ``request.max_rows``."""

    @abc.abstractmethod
    def gradients(self) -> dict[str, np.ndarray]:
        """Input-gradient importances ``{"grad_norm": (batch, tokens), "grad_x_input": (batch, tokens)}``:
        for a scalar target ``s``, ``‖∂s/∂e_j‖₂`` and ``Σ_d (∂s/∂e_j)_d (e_j)_d`` with ``e_j`` the input
        embedding of token ``j``; for a vector target ``v`` (cosine to the unablated ``v₀``, whose gradient is
        0 there), ``‖P ∂v/∂e_j‖_F`` and ``‖P (∂v/∂e_j) e_j‖₂`` with ``P = I − u uᵀ``, ``u = v₀/‖v₀‖`` (the
        Jacobian: one backward pass per output dimension).

        A probe may also return ``"grad_norm_proj"``: ``‖∂s/∂e_j‖₂`` of the projection
        ``s(x) = ⟨v(x), u⟩`` on the unablated direction (one backward pass; for a scalar target, ``grad_norm``
        itself), and may leave out what `ProbeRequest.references` does not ask for."""

    def jacobian_size(self) -> int | None:
        """The output dimension of a vector target (the backward passes per item its Jacobian needs), or None
        for a scalar target."""
        return None

    def close(self) -> None:  # noqa: B027 (optional to override: most probes change nothing)
        """Undo anything the probe changed on the model (hooks, swapped modules)."""


def blank_error(blank: str, where: str) -> OptionError:
    """The error for a model that has no token of the kind ``blank`` asks for."""
    zero = "blank='zero' (the token's input embedding set to zero)"
    others = {
        "mask": f"blank='unk' (the unknown token, as Abnar & Zuidema blank tokens out) or {zero}",
        "unk": f"{zero} or blank='mask' (the mask token)",
    }[blank]
    return OptionError(
        f"blank={blank!r} needs a {blank} token, but {where} has none. Use {others}, or pass blank=TOKEN_ID; "
        "a tokenizer that has the token can be passed as tokenizer=."
    )


def model_token_id(tokenizer: Any, model: Any, kind: str) -> int | None:
    """The id of the ``kind`` token (``"mask"``, ``"unk"``, ``"pad"``...) from the tokenizer, else the model's
    config; None when neither has one."""
    for source in (tokenizer, getattr(model, "config", None)):
        value = getattr(source, f"{kind}_token_id", None) if source is not None else None
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
            return int(value)
    return None


def resolve_blank(blank: Any, tokenizer: Any, model: Any, vocabulary: int | None) -> int | None:
    """The token id that blanks a token out for ``blank`` (``"mask"``, ``"unk"``, an id), or None for
    ``"zero"`` (the input embedding set to zero); ``vocabulary``: the embedding's size, when known."""
    if blank == "zero":
        return None
    if isinstance(blank, str):
        found = model_token_id(tokenizer, model, blank)
        if found is None:
            where = (f"the tokenizer ({type(tokenizer).__name__}) and the model's config" if tokenizer is not None
                     else f"{type(model).__name__}'s config (no tokenizer= given)")
            raise blank_error(blank, where)
        blank = found
    if vocabulary is not None and not 0 <= int(blank) < vocabulary:
        raise OptionError(f"blank token id {blank} is outside the model's vocabulary of {vocabulary} tokens.")
    return int(blank)


def target_index(index: Any, classes: int, batch: int, shown: str) -> np.ndarray:
    """``(batch,)`` class or vocabulary indices of a ``target=`` int (or per-item ints), negative ones counted
    from the end; an [`OptionError`][attnflow.OptionError] naming ``shown`` (the target as the user wrote it) when one is out of
    range of the model's ``classes`` outputs."""
    out = np.broadcast_to(np.asarray(index, dtype=np.int64), (batch,))
    if ((out < -classes) | (out >= classes)).any():
        raise OptionError(f"target={shown} is not an index of the model's {classes} outputs (classes or vocabulary).")
    return out % classes

