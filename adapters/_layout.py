"""The axis order of attention probabilities as a module computes them (the ``layout=`` option of the PyTorch
and JAX adapters' softmax-level capture).

Private to attnflow.adapters; numpy only, no framework.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from attnflow import AdapterError, OptionError

_ROLES = {"b": "b", "q": "q", "t": "q", "k": "k", "s": "k", "h": "h", "n": "h", "g": "g"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """The axis order of attention probabilities as a module computes them (``layout=`` option).

    Letters: ``b`` batch, ``q``/``t`` query positions, ``k``/``s`` key positions, ``h``/``n`` heads, and ``g``
    the key/value head group of grouped-query attention (heads are flattened group-major, head
    ``g * heads_per_group + h``, as Hugging Face's ``repeat_kv`` orders them). ``"bhqk"`` is Flax's and
    ``jax.nn.dot_product_attention``'s order; Gemma computes ``"btns"``.
    """

    text: str
    roles: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, adapter: str) -> Layout:
        roles = tuple(_ROLES.get(letter, "?") for letter in text.lower())
        if "?" in roles or len(set(roles)) != len(roles) or "q" not in roles or "k" not in roles:
            raise OptionError(
                f"Adapter {adapter!r}: layout={text!r} is not an axis order of attention probabilities. Use one "
                "letter per axis: b (batch), q or t (query), k or s (key), h or n (heads), g (key/value group of "
                "grouped-query heads), e.g. 'bhqk', 'bqhk' (= 'btns'), 'bgnqk'; q and k are required."
            )
        return cls(text, roles)

    def fit(self, ndim: int) -> tuple[str, ...] | None:
        """The role of each axis of an ``ndim``-axis array: the layout itself, or the layout without its batch
        axis (a module vmapped over examples sees one example); None if neither fits."""
        roles = self.roles
        if ndim == len(roles):
            return roles
        if ndim == len(roles) - 1 and "b" in roles:
            return tuple(role for role in roles if role != "b")
        return None

    def key_axis(self, ndim: int) -> int | None:
        roles = self.fit(ndim)
        return None if roles is None else roles.index("k")

    def to_bhqk(self, array: np.ndarray) -> np.ndarray:
        """``array`` as ``(batch, heads, query, key)``, groups and heads merged group-major."""
        roles = self.fit(array.ndim)
        if roles is None:
            raise AdapterError(
                f"Attention probabilities of shape {array.shape} do not fit layout={self.text!r}; pass the "
                "layout= of the selected modules' softmax output."
            )
        batch = [i for i, role in enumerate(roles) if role == "b"]
        order = batch + [roles.index(role) for role in ("g", "h", "q", "k") if role in roles]
        moved = np.transpose(array, order)
        size = int(np.prod(moved.shape[: len(batch)])) if batch else 1
        return moved.reshape(size, -1, *moved.shape[-2:])

    def from_bhqk(self, array: Any, shape: tuple[int, ...]) -> Any:
        """The inverse of :meth:`to_bhqk`: a ``(batch, heads, query, key)`` array (numpy or jax) laid out as the
        module's own probabilities of shape ``shape`` (how target= adds its zero to them)."""
        roles = self.fit(len(shape))
        if roles is None:
            raise AdapterError(f"Attention probabilities of shape {shape} do not fit layout={self.text!r}.")
        order = [i for i, role in enumerate(roles) if role == "b"] + [
            roles.index(role) for role in ("g", "h", "q", "k") if role in roles]
        return array.reshape([shape[i] for i in order]).transpose(tuple(int(i) for i in np.argsort(order)))
