"""Faithfulness for PyTorch models (adapters ``torch`` and ``transformers``): blank-out and input gradients.

Private to attnflow.adapters; torch is imported lazily. :func:`probe` returns an
:class:`attnflow.evaluate.Probe` over one model call: the call is run once unablated (the target is fixed
from it: each item's argmax, the unablated embedding), then again on batches of variants, each a copy of
one item (every batch-first tensor of the call indexed by item) with some tokens blanked out: their id
replaced by the mask/unk token, or their input embedding (the output of the model's input embedding
module, e.g. ``get_input_embeddings()``: word embeddings, before position embeddings are added) set to
zero. Input gradients are taken with respect to that same embedding output, which is replaced during the
pass by a detached leaf so that parameters' ``.grad`` are never touched.

The target follows ``capture(..., target=...)`` (see :mod:`attnflow.evaluate._probe`), per item rather
than summed, so that each variant gets its own score.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, cast

import numpy as np

import attnflow
from attnflow.evaluate import (
    Probe,
    ProbeRequest,
    Target,
    model_token_id,
    resolve_blank,
    target_index,
    target_positions,
)
from attnflow.recording import deferred_interrupts

from . import _torch_common as common

# Jacobians of vector targets are computed a few items at a time: at most this many floats at once.
_JACOBIAN_FLOATS = 1 << 25
# The references a probe's gradients() computes (attnflow.evaluate's input-gradient references).
_GRADIENT_REFERENCES = ("grad_norm", "grad_x_input", "grad_norm_proj")


def probe(model: Any, request: ProbeRequest, args: tuple, kwargs: dict) -> TorchProbe:
    """The probe the ``torch`` and ``transformers`` adapters hand to :func:`attnflow.faithfulness`."""
    return TorchProbe(model, request, args, kwargs)


class TorchProbe(Probe):
    def __init__(self, model: Any, request: ProbeRequest, args: tuple, kwargs: dict):
        torch = attnflow.import_optional("torch", "torch")
        self.torch = torch
        self.model = common.unwrap_compiled(model)
        if getattr(self.model, "training", False):
            raise attnflow.OptionError(
                f"{type(self.model).__name__} is in training mode (dropout on), so re-running it gives other scores "
                "each time; call model.eval() first."
            )
        self.request = request
        self.args, self.kwargs = tuple(args), dict(kwargs)
        self.mask = np.asarray(request.mask, bool)
        self.batch, self.length = self.mask.shape
        self.ids_at = _find_ids(self.model, self.args, self.kwargs, torch)
        ids = self._get(self.args, self.kwargs, self.ids_at) if self.ids_at is not None else None
        self.ids = None if ids is None else ids.detach().cpu().numpy()
        if self.ids is not None and self.ids.shape != self.mask.shape:
            raise attnflow.OptionError(
                f"The call's input ids have shape {tuple(self.ids.shape)}, but the explanation is of {self.batch} items "
                f"of {self.length} tokens; pass faithfulness() the inputs the explanation's trace was captured from."
            )
        self._embedding: Any = None
        self._embedding_error: Exception | None = None
        try:
            self._embedding = _embedding_module(self.model, request.embedding, torch)
        except attnflow.AttnflowError as exc:
            self._embedding_error = exc
        self.blank_id = self._blank_id(request.blank)
        if self.blank_id is None:
            _ = self.embedding  # blank="zero" needs it: fail now, not after the unablated pass
        elif self.ids is None:
            raise attnflow.OptionError(
                f"blank={request.blank!r} replaces token ids, but the call has no input_ids (a (batch, tokens) integer "
                "tensor, by keyword or first); use blank='zero' (the input embedding set to zero)."
            )
        self._unablated()

    # -- the target ---------------------------------------------------------------------------------
    def _unablated(self) -> None:
        torch = self.torch
        with torch.no_grad():
            output = self.model(*self.args, **self.kwargs)
        target = self.request.target
        if target is None:
            if _logits(output, torch) is not None:
                target = Target("logits")
            elif _hidden(output, torch) is not None:
                target = Target("embedding")
            else:
                raise attnflow.OptionError(
                    f"The model's output ({type(output).__name__}) has neither logits nor a last hidden state; pass "
                    "target=a callable mapping the output to per-item scores (or vectors)."
                )
        self.target = target
        self.positions: Any = None  # set from the target below: None, or an array
        self.index: Any = None
        self.vectors: Any = None
        items = np.arange(self.batch)
        if target.kind == "logits":
            logits = _logits(output, torch)
            if logits is None:
                raise attnflow.OptionError(
                    f"The model's output ({type(output).__name__}) has no logits to take target={_shown(target)} from; "
                    "pass target='embedding' or a callable, e.g. lambda out: out.last_hidden_state[:, 0, 0]."
                )
            if logits.ndim == 3:
                self.positions = target_positions(
                    self.request.target_position, self.mask, causal=self.request.causal, ids=self.ids,
                    mask_token_id=self._token_id("mask"), length=int(logits.shape[1]),
                )
            rows = self._rows(logits, items)
            classes = int(rows.shape[-1])
            if target.index is None:
                self.index = rows.argmax(-1).cpu().numpy()
            else:
                self.index = target_index(target.index, classes, self.batch, _shown(target))
            self.base = self._score(output, items)
        else:
            value = self._vector_or_scores(output, items)
            self.vector = value.ndim == 2
            if self.vector:
                self.vectors = value.detach().double()
                self.base = np.ones(self.batch)
            else:
                self.base = value.detach().double().cpu().numpy()

    def _rows(self, logits: Any, items: np.ndarray) -> Any:
        """``(rows, classes)`` logits of the rows (variants of ``items``), at the target positions."""
        if logits.ndim == 3:
            positions = self.torch.as_tensor(self.positions[items], device=logits.device)
            return logits[self.torch.arange(logits.shape[0], device=logits.device), positions]
        if logits.ndim != 2:
            raise attnflow.OptionError(f"Cannot read a target from logits of shape {tuple(logits.shape)}; pass target=a callable.")
        return logits

    def _vector_or_scores(self, output: Any, items: np.ndarray) -> Any:
        torch = self.torch
        target = self.target
        if target.kind == "embedding":
            hidden = _hidden(output, torch)
            if hidden is None:
                raise attnflow.OptionError(
                    f"target='embedding' needs the model's last hidden state; the output ({type(output).__name__}) has "
                    "none. Pass target=a callable returning (rows, dim) vectors."
                )
            mask = torch.as_tensor(self.mask[items], device=hidden.device, dtype=hidden.dtype)
            return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        value = target.function(output, items) if target.takes_items else target.function(output)  # type: ignore[misc]
        if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or value.shape[0] != len(items):
            shape = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
            raise attnflow.OptionError(
                f"target(output) must return a torch tensor of per-row scores ({len(items)},) or vectors "
                f"({len(items)}, dim); got {shape}."
            )
        return value

    def _score_tensor(self, output: Any, items: np.ndarray) -> Any:
        """The target of each row, as a (rows,) tensor that keeps autograd's graph."""
        torch = self.torch
        if self.target.kind == "logits":
            rows = self._rows(_logits(output, torch), items)
            index = torch.as_tensor(self.index[items], device=rows.device)
            return rows.gather(1, index[:, None])[:, 0]
        value = self._vector_or_scores(output, items)
        if self.vector:
            if value.ndim != 2:
                raise attnflow.OptionError("target(output) returned vectors for the unablated input but not for variants.")
            reference = self.vectors[items].to(value.device)
            return torch.nn.functional.cosine_similarity(value.double(), reference, dim=-1)
        return value

    def _score(self, output: Any, items: np.ndarray) -> np.ndarray:
        return self._score_tensor(output, items).detach().double().cpu().numpy()

    # -- blank-out ----------------------------------------------------------------------------------
    def scores(self, items: np.ndarray, blanked: np.ndarray) -> np.ndarray:
        items = np.asarray(items, dtype=np.int64)
        blanked = np.asarray(blanked, bool)
        out = np.zeros(items.size)
        step = self.request.max_rows
        for start in range(0, items.size, step):
            chunk, mask = items[start : start + step], blanked[start : start + step]
            args, kwargs = self._variant_call(chunk, None if self.blank_id is None else mask)
            zeroing = self._zeroing(mask) if self.blank_id is None else nullcontext()
            with self.torch.no_grad(), zeroing:
                output = self.model(*args, **kwargs)
            out[start : start + chunk.size] = self._score(output, chunk)
        return out

    def _variant_call(self, items: np.ndarray, blanked: np.ndarray | None) -> tuple[tuple, dict]:
        torch = self.torch
        args, kwargs = _index(self.args, items, self.batch, torch), _index(self.kwargs, items, self.batch, torch)
        if blanked is not None:
            ids_at = cast("tuple[str, Any]", self.ids_at)  # blanking needs ids: found
            ids = self._get(args, kwargs, ids_at).clone()
            ids[torch.as_tensor(blanked, device=ids.device)] = self.blank_id
            args, kwargs = self._put(args, kwargs, ids_at, ids)
        return args, kwargs

    @contextmanager
    def _zeroing(self, blanked: np.ndarray) -> Iterator[None]:
        torch = self.torch

        def hook(module: Any, inputs: Any, output: Any) -> Any:
            _check_embedding_output(output, blanked.shape)
            output = output.clone()
            output[torch.as_tensor(blanked, device=output.device)] = 0.0
            return output

        with common.removing([]) as handles:
            with deferred_interrupts():
                common.register(handles, self.embedding.register_forward_hook, hook)
            yield

    # -- input gradients ----------------------------------------------------------------------------
    def jacobian_size(self) -> int | None:
        return int(self.vectors.shape[1]) if self.vector else None

    def gradients(self) -> dict[str, np.ndarray]:
        torch = self.torch
        asked = set(self.request.references) & set(_GRADIENT_REFERENCES) or {"grad_norm", "grad_x_input"}
        # grad_norm and grad_x_input of a vector target need its Jacobian (one backward pass per dimension);
        # grad_norm_proj, and every reference of a scalar target, one backward pass.
        full = self.vector and bool(asked & {"grad_norm", "grad_x_input"})
        out = {name: np.zeros((self.batch, self.length)) for name in asked}
        kept: dict[str, Any] = {}

        def hook(module: Any, inputs: Any, output: Any) -> Any:
            _check_embedding_output(output, (None, self.length))
            leaf = output.detach().requires_grad_(True)
            kept["e"] = leaf
            return leaf

        dim = int(self.vectors.shape[1]) if full else 1
        width = int(getattr(self.embedding, "embedding_dim", 0) or 1024)
        step = self.request.max_rows if not full else max(1, _JACOBIAN_FLOATS // (dim * self.length * width))
        with common.removing([]) as handles, torch.enable_grad():
            with deferred_interrupts():
                common.register(handles, self.embedding.register_forward_hook, hook)
            for start in range(0, self.batch, step):
                items = np.arange(start, min(start + step, self.batch))
                args, kwargs = self._variant_call(items, None)
                output = self.model(*args, **kwargs)
                if "e" not in kept:
                    raise attnflow.AdapterError(
                        f"The input embedding module ({type(self.embedding).__name__}) did not run in the forward "
                        "pass; name the module that embeds the input ids with embedding=..."
                    )
                e = kept.pop("e")
                if full:
                    values = self._jacobian(self._vector_or_scores(output, items), e, items)
                else:
                    values = self._gradient(self._projection(output, items) if self.vector
                                            else self._score_tensor(output, items), e)
                for name in asked:
                    out[name][items] = values[name].cpu().numpy()
        return out

    def _projection(self, output: Any, items: np.ndarray) -> Any:
        """``⟨v, u⟩`` per row: a vector target projected on its unablated direction ``u = v₀/‖v₀‖``."""
        value = self._vector_or_scores(output, items)
        u = self.torch.nn.functional.normalize(self.vectors[items].to(value.device), dim=-1)
        return (value.double() * u).sum(-1)

    def _gradient(self, scores: Any, e: Any) -> dict[str, Any]:
        """The gradient references of per-row scalar ``scores`` ``(rows,)``: one backward pass."""
        (grad,) = self.torch.autograd.grad(scores.sum(), e, allow_unused=True)
        grad = self.torch.zeros_like(e) if grad is None else grad
        norm = grad.double().norm(dim=-1)
        return {"grad_norm": norm, "grad_norm_proj": norm, "grad_x_input": (grad.double() * e.detach().double()).sum(-1)}

    def _jacobian(self, vectors: Any, e: Any, items: np.ndarray) -> dict[str, Any]:
        """For vectors ``v`` ``(rows, D)`` of embeddings ``e`` ``(rows, T, E)``: ``‖P J_j‖_F`` and ``‖P J_j e_j‖``
        with ``J_j = ∂v/∂e_j`` and ``P`` the projection off the unablated vector's direction ``u``, and
        ``‖uᵀ J_j‖`` (the gradient of the projection on ``u``). The ``D`` backward passes run as one batched
        (vmapped) backward: about the time of one backward pass over ``D`` times the rows (measured by
        benchmarks/bench_references.py)."""
        torch = self.torch
        rows, dim = vectors.shape
        eye = torch.eye(dim, dtype=vectors.dtype, device=vectors.device)[:, None, :].expand(dim, rows, dim)
        try:
            (jacobian,) = torch.autograd.grad(vectors, e, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        except RuntimeError:  # an operation vmap cannot batch: one backward pass per output dimension
            jacobian = torch.stack([
                torch.autograd.grad(vectors, e, grad_outputs=eye[d], retain_graph=True, allow_unused=True)[0]
                for d in range(dim)
            ])
        jacobian = jacobian.double()  # (D, rows, T, E)
        u = torch.nn.functional.normalize(self.vectors[items].to(jacobian.device), dim=-1)  # (rows, D)
        along = torch.einsum("dbte,bd->bte", jacobian, u)
        projected = jacobian - torch.einsum("bd,bte->dbte", u, along)
        grad_norm = projected.pow(2).sum(dim=(0, 3)).sqrt()
        grad_x_input = torch.einsum("dbte,bte->dbt", projected, e.detach().double()).norm(dim=0)
        return {"grad_norm": grad_norm, "grad_x_input": grad_x_input, "grad_norm_proj": along.norm(dim=-1)}

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def embedding(self) -> Any:
        if self._embedding is None:
            raise self._embedding_error or attnflow.OptionError("No input embedding module; pass embedding=...")
        return self._embedding

    def _token_id(self, kind: str) -> int | None:
        return model_token_id(self.request.tokenizer, self.model, kind)

    def _blank_id(self, blank: Any) -> int | None:
        return resolve_blank(blank, self.request.tokenizer, self.model, _vocab_size(self._embedding))

    @staticmethod
    def _get(args: tuple, kwargs: dict, where: tuple[str, Any]) -> Any:
        return args[where[1]] if where[0] == "arg" else kwargs[where[1]]

    @staticmethod
    def _put(args: tuple, kwargs: dict, where: tuple[str, Any], value: Any) -> tuple[tuple, dict]:
        if where[0] == "arg":
            args = args[: where[1]] + (value,) + args[where[1] + 1 :]
        else:
            kwargs = {**kwargs, where[1]: value}
        return args, kwargs


def _find_ids(model: Any, args: tuple, kwargs: dict, torch: Any) -> tuple[str, Any] | None:
    """Where the call's token ids are: the ``input_ids`` keyword, or the first positional integer
    ``(batch, tokens)`` tensor."""
    if common.int_ids(kwargs.get("input_ids"), torch) is not None:
        return ("kw", "input_ids")
    for i, value in enumerate(args):
        if common.int_ids(value, torch) is not None:
            return ("arg", i)
    return None


def _embedding_module(model: Any, chosen: Any, torch: Any) -> Any:
    """The module whose output is the input embeddings: ``embedding=`` (a module or a path), the model's
    ``get_input_embeddings()``, or its only (or largest-vocabulary) ``nn.Embedding``."""
    modules = dict(model.named_modules())
    embeddings = [(path, m) for path, m in modules.items() if isinstance(m, torch.nn.Embedding)]
    if chosen is not None:
        if isinstance(chosen, torch.nn.Module):
            return chosen
        if isinstance(chosen, str) and chosen in modules:
            return modules[chosen]
        raise attnflow.OptionError(
            f"embedding={chosen!r} is not a module of {type(model).__name__}; embedding modules there: "
            f"{[p for p, _ in embeddings] or 'none'}."
        )
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, torch.nn.Module):
            return found
    sizes = sorted(((m.num_embeddings, path, m) for path, m in embeddings), key=lambda t: -t[0])
    if len(sizes) == 1 or (len(sizes) > 1 and sizes[0][0] > sizes[1][0]):
        return sizes[0][2]
    raise attnflow.OptionError(
        f"Cannot tell which module of {type(model).__name__} embeds the input tokens (nn.Embedding modules: "
        f"{[p for _, p, _ in sizes] or 'none'}); pass embedding='path.to.module' (or the module), or give the model "
        "a get_input_embeddings() method."
    )


def _check_embedding_output(output: Any, shape: tuple[Any, int]) -> None:
    rows, length = shape
    if getattr(output, "ndim", 0) != 3 or output.shape[1] != length or (rows is not None and output.shape[0] != rows):
        got = tuple(output.shape) if hasattr(output, "shape") else type(output).__name__
        raise attnflow.OptionError(
            f"The input embedding module returned {got}, expected (rows, {length} tokens, dim); pass embedding= the "
            "module that embeds the input tokens."
        )


def _index(value: Any, items: np.ndarray, batch: int, torch: Any) -> Any:
    """Row ``items[r]`` of every batch-first tensor in ``value`` (nested tuples, lists, dicts), others kept."""
    if isinstance(value, torch.Tensor):
        if value.ndim and value.shape[0] == batch:
            return value[torch.as_tensor(items, device=value.device)]
        return value
    if isinstance(value, tuple):
        return tuple(_index(v, items, batch, torch) for v in value)
    if isinstance(value, list):
        return [_index(v, items, batch, torch) for v in value]
    if isinstance(value, dict):
        return {k: _index(v, items, batch, torch) for k, v in value.items()}
    return value


def _logits(output: Any, torch: Any) -> Any:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, torch.Tensor) and output.ndim in (2, 3):
        logits = output
    return logits


def _hidden(output: Any, torch: Any) -> Any:
    """The last hidden state: ``output.last_hidden_state``, a tuple's first tensor, or the output itself."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        hidden = output[0]
    if hidden is None:
        hidden = output
    return hidden if isinstance(hidden, torch.Tensor) and hidden.ndim == 3 else None


def _shown(target: Target) -> str:
    return "None" if target.index is None else repr(list(target.index) if isinstance(target.index, tuple) else target.index)


def _vocab_size(embedding: Any) -> int | None:
    size = getattr(embedding, "num_embeddings", None)
    return size if isinstance(size, int) else None

