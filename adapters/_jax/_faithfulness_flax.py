"""Faithfulness for Flax models (linen and NNX): blank-out and input gradients in JAX.

Private to attnflow.adapters; jax and flax are imported lazily. :func:`probe` is what the ``flax_linen`` and
``flax_nnx`` adapters return from ``probe(model, request, *args, **kwargs)``; another Flax adapter declares
it in two lines (see docs/faithfulness.md)::

    captures = captures | {"input_gradients", "ablation"}

    def probe(self, model, request, *args, **kwargs):
        from ._faithfulness_flax import probe

        return probe(model, request, args, kwargs)

The call is ``model(*args, **kwargs)`` for NNX and ``model.apply(variables, *rest, **kwargs)`` for linen
(``args[0]`` holds the variables), as in ``attnflow.capture``. The input embeddings are the output of the
model's token ``Embed`` module: for NNX, ``embedding=`` (a path such as ``"embeddings/word"``, or the module)
or the ``nnx.Embed`` with the largest vocabulary, wrapped while the probe runs (the attribute is put back on
:meth:`close`); for linen, ``embedding=`` (a module path) or the first ``nn.Embed`` called on the input ids,
reached through ``nn.intercept_methods``. Blanking by zero and gradients act on that module's output, through
an additive perturbation whose gradient is the input gradient (``jax.grad``; ``jax.jacrev`` for vector
targets). The first pass runs eagerly (it finds the embedding module); the others through ``jax.jit`` where
the model can be traced, eagerly otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


def probe(model: Any, request: ProbeRequest, args: tuple, kwargs: dict, *,
          embedding_method: tuple[type, str] | None = None, no_inner_jit: bool = False) -> FlaxProbe:
    """The probe for a Flax linen or NNX model (see the module docstring).

    For a linen library whose token embedding is not an ``nn.Embed`` called on the ids, ``embedding_method``
    names it: ``(module class, method name)`` (gemma: ``(Embedder, "encode")``), the first such call on the
    input ids being the one perturbed. ``no_inner_jit``: the model's own ``nn.jit`` is turned off while the probe
    calls it (a compiled call would run no interceptor; the probe's own ``jax.jit`` compiles the pass)."""
    return FlaxProbe(model, request, args, kwargs, embedding_method=embedding_method, no_inner_jit=no_inner_jit)


class FlaxProbe(Probe):
    def __init__(self, model: Any, request: ProbeRequest, args: tuple, kwargs: dict, *,
                 embedding_method: tuple[type, str] | None = None, no_inner_jit: bool = False):
        self.jax = attnflow.import_optional("jax", "jax")
        self.jnp = attnflow.import_optional("jax.numpy", "jax")
        flax = attnflow.import_optional("flax", "jax")
        from flax import linen, nnx

        self.nnx, self.linen = nnx, linen
        self._embedding_method: tuple[type[Any], str] = embedding_method or (linen.Embed, "__call__")
        self._no_inner_jit = no_inner_jit
        if getattr(self, "kind", None) == "penzai":
            pass  # a PenzaiProbe: the call is already positional ids and side inputs
        elif isinstance(model, nnx.Module):
            self.kind = "nnx"
        elif isinstance(model, linen.Module):
            self.kind = "linen"
            if not args:
                raise attnflow.OptionError("A linen model is called as faithfulness(model, explanation, variables, *inputs).")
        else:
            raise attnflow.AdapterError(f"Not a Flax (flax {flax.__version__}) linen or NNX module: {type(model).__name__}.")
        self.model = model
        self.request = request
        self.args, self.kwargs = tuple(args), dict(kwargs)
        self.mask = np.asarray(request.mask, bool)
        self.batch, self.length = self.mask.shape
        self.ids_at = self._find_ids()
        self.ids = None if self.ids_at is None else np.asarray(self._get(self.args, self.kwargs, self.ids_at))
        if self.ids is not None and self.ids.shape != self.mask.shape:
            raise attnflow.OptionError(
                f"The call's input ids have shape {self.ids.shape}, but the explanation is of {self.batch} items of "
                f"{self.length} tokens; pass faithfulness() the inputs the explanation's trace was captured from."
            )
        self._perturb: Callable[[Any], Any] | None = None  # applied to the embedding module's output
        self._jitted: Any = self.jax.jit(self._perturbed_pass)
        self._seen: list[Any] = []  # embedding outputs of the last pass
        self._restore: Callable[[], None] | None = None
        self._linen_path: tuple[str, ...] | None = None
        self._current_ids: np.ndarray | None = None  # the unablated pass's ids, to find linen's token Embed
        if self.kind == "nnx":
            self._wrap_nnx_embedding(request.embedding)
        elif request.embedding is not None:
            path = request.embedding
            self._linen_path = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
        try:
            self.blank_id = self._blank_id(request.blank)
            if self.blank_id is not None and self.ids is None:
                raise attnflow.OptionError(
                    f"blank={request.blank!r} replaces token ids, but the call has no input ids (a (batch, tokens) "
                    "integer array); use blank='zero'."
                )
            self._unablated()
        except BaseException:
            self.close()
            raise

    # -- running the model --------------------------------------------------------------------------
    def _call(self, args: tuple, kwargs: dict) -> Any:
        if self.kind == "nnx":
            return self.model(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            if self._no_inner_jit:
                stack.enter_context(self.jax.disable_jit())
            stack.enter_context(self.linen.intercept_methods(self._linen_interceptor))
            return self.model.apply(args[0], *args[1:], **kwargs)

    def _embedding_output(self, output: Any) -> Any:
        self._seen.append(output)
        return output if self._perturb is None else self._perturb(output)

    def _perturbed_pass(self, args: tuple, kwargs: dict, keep: Any, delta: Any) -> tuple[Any, Any]:
        """``(output, embedding output)`` of one pass in which the embedding output ``e`` becomes
        ``e * keep[..., None] + delta`` (``keep`` ``(rows, tokens)``: 0 blanks a token by zero; ``delta``: the
        perturbation whose gradient is the input gradient)."""
        with self._perturbing(lambda out: out * keep[..., None].astype(out.dtype) + delta) as seen:
            output = self._call(args, kwargs)
            return output, (seen[0] if seen else None)

    def _run(self, args: tuple, kwargs: dict, keep: Any, delta: Any) -> tuple[Any, Any]:
        """:meth:`_perturbed_pass` compiled with ``jax.jit`` (eager JAX compiles every operation for every new
        shape); a model that cannot be traced (Python control flow on its inputs, state it mutates) runs eagerly."""
        if self._jitted is not None:
            try:
                return self._jitted(args, kwargs, keep, delta)
            except Exception:  # not traceable: from now on eagerly (a real error shows again below)
                self._jitted = None
        return self._perturbed_pass(args, kwargs, keep, delta)

    def _linen_interceptor(self, next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        kind, method = self._embedding_method
        if context.method_name != method or not isinstance(module, kind):
            return next_fun(*args, **kwargs)
        path = tuple(str(p) for p in module.path) if hasattr(module, "path") else (module.name or "",)
        if self._linen_path is None and self.ids is not None and args and _same_ids(args[0], self._current_ids):
            self._linen_path = path
        if path != self._linen_path:
            return next_fun(*args, **kwargs)
        return self._embedding_output(next_fun(*args, **kwargs))

    def _wrap_nnx_embedding(self, chosen: Any) -> None:
        nnx = self.nnx
        found = [(path, node) for path, node in nnx.iter_graph(self.model) if isinstance(node, nnx.Embed)]
        if chosen is not None:
            wanted = tuple(chosen.split("/")) if isinstance(chosen, str) else None
            matches = [(p, n) for p, n in found if n is chosen or tuple(str(k) for k in p) == wanted]
        else:
            sizes = sorted(found, key=lambda item: -int(item[1].num_embeddings))
            unique = len(sizes) == 1 or (len(sizes) > 1 and sizes[0][1].num_embeddings > sizes[1][1].num_embeddings)
            matches = sizes[:1] if unique else []
        if not matches or not matches[0][0]:
            raise attnflow.OptionError(
                f"Cannot tell which nnx.Embed of {type(self.model).__name__} embeds the input tokens (found "
                f"{['/'.join(map(str, p)) for p, _ in found] or 'none'}); pass embedding='path/to/embed'."
            )
        path, embed = matches[0]
        parent = self.model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        probe = self

        class _Perturbed(nnx.Module):  # type: ignore[name-defined]  # nnx is imported at run time; stands in for the Embed while the probe runs
            def __init__(self, inner: Any):
                self.inner = inner

            def __call__(self, *a: Any, **k: Any) -> Any:
                return probe._embedding_output(self.inner(*a, **k))

        key = path[-1]
        if isinstance(key, int):
            parent[key] = _Perturbed(embed)

            def restore() -> None:
                parent[key] = embed
        else:
            setattr(parent, key, _Perturbed(embed))

            def restore() -> None:
                setattr(parent, key, embed)

        self._restore = restore
        self._vocabulary = int(embed.num_embeddings)

    def close(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None

    @contextlib.contextmanager
    def _perturbing(self, function: Callable[[Any], Any] | None) -> Iterator[list[Any]]:
        self._perturb, self._seen = function, []
        try:
            yield self._seen
        finally:
            self._perturb = None

    # -- the target ---------------------------------------------------------------------------------
    def _unablated(self) -> None:
        jnp = self.jnp
        self._current_ids = self.ids
        with self._perturbing(None) as seen:
            output = self._call(self.args, self.kwargs)
        self._current_ids = None
        self._width = int(seen[0].shape[-1]) if seen else 1
        if not seen and (self.blank_id is None or self.request.gradients):
            raise attnflow.OptionError(
                f"No input embedding module of {type(self.model).__name__} ran on the input ids; pass embedding=... "
                "(a module path such as 'embeddings/word')."
            )
        target = self.request.target
        if target is None:
            target = Target("logits") if _logits(output) is not None else (
                Target("embedding") if _hidden(output) is not None else None)
            if target is None:
                raise attnflow.OptionError(
                    f"The model's output ({type(output).__name__}) has neither logits nor a last hidden state; pass "
                    "target=a callable mapping the output to per-item scores (or vectors)."
                )
        self.target = target
        # set from the target below: None, or arrays
        self.positions: Any = None
        self.index: Any = None
        self.vectors: Any = None
        items = np.arange(self.batch)
        if target.kind == "logits":
            logits = _logits(output)
            if logits is None:
                raise attnflow.OptionError(
                    f"The model's output ({type(output).__name__}) has no logits to take the target from; pass "
                    "target='embedding' or a callable."
                )
            if logits.ndim == 3:
                self.positions = target_positions(
                    self.request.target_position, self.mask, causal=self.request.causal, ids=self.ids,
                    mask_token_id=self._token_id("mask"), length=int(logits.shape[1]),
                )
            rows = self._rows(logits, items)
            classes = int(rows.shape[-1])
            if target.index is None:
                self.index = np.asarray(jnp.argmax(rows, axis=-1))
            else:
                self.index = target_index(target.index, classes, self.batch, repr(target.index))
            self.base = np.asarray(self._score_array(output, items), dtype=np.float64)
        else:
            value = self._vector_or_scores(output, items)
            self.vector = value.ndim == 2
            if self.vector:
                self.vectors = value
                self.base = np.ones(self.batch)
            else:
                self.base = np.asarray(value, dtype=np.float64)

    def _rows(self, logits: Any, items: np.ndarray) -> Any:
        if logits.ndim == 3:
            return logits[np.arange(logits.shape[0]), self.positions[items]]
        if logits.ndim != 2:
            raise attnflow.OptionError(f"Cannot read a target from logits of shape {tuple(logits.shape)}; pass target=a callable.")
        return logits

    def _vector_or_scores(self, output: Any, items: np.ndarray) -> Any:
        jnp = self.jnp
        if self.target.kind == "embedding":
            hidden = _hidden(output)
            if hidden is None:
                raise attnflow.OptionError(
                    f"target='embedding' needs the model's last hidden state; the output ({type(output).__name__}) has "
                    "none. Pass target=a callable returning (rows, dim) vectors."
                )
            mask = jnp.asarray(self.mask[items], dtype=hidden.dtype)
            return (hidden * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
        function = self.target.function
        value = function(output, items) if self.target.takes_items else function(output)  # type: ignore[misc]
        if getattr(value, "ndim", None) not in (1, 2) or value.shape[0] != len(items):
            shape = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
            raise attnflow.OptionError(
                f"target(output) must return an array of per-row scores ({len(items)},) or vectors ({len(items)}, dim); "
                f"got {shape}."
            )
        return value

    def _score_array(self, output: Any, items: np.ndarray) -> Any:
        """The target of each row, ``(rows,)`` (a JAX array, differentiable)."""
        jnp = self.jnp
        if self.target.kind == "logits":
            rows = self._rows(_logits(output), items)
            return jnp.take_along_axis(rows, jnp.asarray(self.index[items])[:, None], axis=1)[:, 0]
        value = self._vector_or_scores(output, items)
        if self.vector:
            reference = jnp.asarray(self.vectors)[items]
            dot = (value * reference).sum(-1)
            norms = jnp.linalg.norm(value, axis=-1) * jnp.linalg.norm(reference, axis=-1)
            return dot / jnp.maximum(norms, 1e-12)
        return value

    # -- blank-out ----------------------------------------------------------------------------------
    def scores(self, items: np.ndarray, blanked: np.ndarray) -> np.ndarray:
        items = np.asarray(items, dtype=np.int64)
        blanked = np.asarray(blanked, bool)
        out = np.zeros(items.size)
        # JAX compiles once per shape: every pass of this call gets the same number of rows (a power of two, the
        # last pass filled up by repeating a row)
        step = rows = min(self.request.max_rows, 1 << max(items.size - 1, 0).bit_length())
        for start in range(0, items.size, step):
            chunk, mask = items[start : start + step], blanked[start : start + step]
            padded = np.concatenate([chunk, np.repeat(chunk[:1], rows - chunk.size)])
            padded_mask = np.concatenate([mask, np.repeat(mask[:1], rows - chunk.size, axis=0)])
            args, kwargs = self._variant_call(padded, None if self.blank_id is None else padded_mask)
            keep = np.ones(padded_mask.shape, np.float32) if self.blank_id is not None else (~padded_mask).astype(np.float32)
            output, _ = self._run(args, kwargs, keep, np.zeros(keep.shape + (self._width,), np.float32))
            out[start : start + chunk.size] = np.asarray(self._score_array(output, padded), dtype=np.float64)[: chunk.size]
        return out

    def _variant_call(self, items: np.ndarray, blanked: np.ndarray | None) -> tuple[tuple, dict]:
        first = 1 if self.kind == "linen" else 0  # linen's variables are never indexed
        args = self.args[:first] + tuple(_index(v, items, self.batch) for v in self.args[first:])
        kwargs = {k: _index(v, items, self.batch) for k, v in self.kwargs.items()}
        if blanked is not None:
            ids = np.array(cast(np.ndarray, self.ids)[items])  # blanking needs ids: both set
            ids[blanked] = self.blank_id
            args, kwargs = self._put(args, kwargs, cast("tuple[str, Any]", self.ids_at), self.jnp.asarray(ids))
        return args, kwargs

    # -- input gradients ----------------------------------------------------------------------------
    def gradients(self) -> dict[str, np.ndarray]:
        jax, jnp = self.jax, self.jnp
        norm = np.zeros((self.batch, self.length))
        times_input = np.zeros((self.batch, self.length))
        step = 1 if self.vector else self.request.max_rows  # a vector target's Jacobian: one item at a time
        for start in range(0, self.batch, step):
            items = np.arange(start, min(start + step, self.batch))
            args, kwargs = self._variant_call(items, None)
            keep = np.ones((items.size, self.length), np.float32)
            _, e = self._run(args, kwargs, keep, np.zeros(keep.shape + (self._width,), np.float32))
            if e is None:
                raise attnflow.OptionError(
                    f"No input embedding module of {type(self.model).__name__} ran; pass embedding=... (a module path)."
                )

            def run(delta: Any, args: tuple = args, kwargs: dict = kwargs, items: np.ndarray = items,
                    keep: np.ndarray = keep) -> Any:
                output, _ = self._run(args, kwargs, keep, delta)
                return self._vector_or_scores(output, items) if self.vector else self._score_array(output, items).sum()

            if self.vector:
                jacobian = np.asarray(jax.jacrev(run)(jnp.zeros_like(e)), dtype=np.float64)[0, :, 0]  # (D, T, E)
                u = np.asarray(self.vectors, dtype=np.float64)[start]
                u = u / max(np.linalg.norm(u), 1e-300)
                projected = jacobian - np.einsum("d,te->dte", u, np.einsum("dte,d->te", jacobian, u))
                norm[start] = np.sqrt((projected**2).sum(axis=(0, 2)))
                times_input[start] = np.linalg.norm(np.einsum("dte,te->dt", projected, np.asarray(e[0], np.float64)), axis=0)
            else:
                grad = np.asarray(jax.grad(run)(jnp.zeros_like(e)), dtype=np.float64)
                norm[items] = np.linalg.norm(grad, axis=-1)
                times_input[items] = (grad * np.asarray(e, np.float64)).sum(-1)
        return {"grad_norm": norm, "grad_x_input": times_input}

    # -- helpers ------------------------------------------------------------------------------------
    def _find_ids(self) -> tuple[str, Any] | None:
        if _int_ids(self.kwargs.get("input_ids")):
            return ("kw", "input_ids")
        first = 1 if self.kind == "linen" else 0
        for i, value in enumerate(self.args[first:], start=first):
            if _int_ids(value):
                return ("arg", i)
        return None

    @staticmethod
    def _get(args: tuple, kwargs: dict, where: tuple[str, Any]) -> Any:
        return args[where[1]] if where[0] == "arg" else kwargs[where[1]]

    @staticmethod
    def _put(args: tuple, kwargs: dict, where: tuple[str, Any], value: Any) -> tuple[tuple, dict]:
        if where[0] == "arg":
            return args[: where[1]] + (value,) + args[where[1] + 1 :], kwargs
        return args, {**kwargs, where[1]: value}

    def _token_id(self, kind: str) -> int | None:
        return model_token_id(self.request.tokenizer, self.model, kind)

    def _blank_id(self, blank: Any) -> int | None:
        return resolve_blank(blank, self.request.tokenizer, self.model, getattr(self, "_vocabulary", None))


def penzai_probe(model: Any, request: ProbeRequest, args: tuple, kwargs: dict) -> PenzaiProbe:
    """The probe for a penzai model called as ``model(tokens, **side_inputs)`` (see :class:`PenzaiProbe`)."""
    return PenzaiProbe(model, request, args, kwargs)


_TAP_CLASS: list[type] = []


def _embedding_tap(pz: Any) -> type:
    """A penzai layer that hands its input (the embedding lookup's output) to a probe (made once, lazily)."""
    if not _TAP_CLASS:
        import dataclasses

        @pz.pytree_dataclass
        class EmbeddingTap(pz.nn.Layer):
            probe: Any = dataclasses.field(metadata={"pytree_node": False})

            def __call__(self, value: Any, **side_inputs: Any) -> Any:
                return self.probe._named_embedding(value)

        _TAP_CLASS.append(EmbeddingTap)
    return _TAP_CLASS[0]


class PenzaiProbe(FlaxProbe):
    """Blank-out and input gradients for penzai models: the output of the model's ``pz.nn.EmbeddingLookup`` is
    perturbed by a layer placed after it in a copy of the model (penzai layers are immutable; the model itself
    is untouched). The call's named ``{batch, seq}`` tokens and side inputs (``token_positions``...) become
    positional arrays for the rows of each variant, and are named again for each call; the output
    ``{batch, seq, vocabulary}`` logits become positional ``(batch, seq, vocabulary)``."""

    def __init__(self, model: Any, request: ProbeRequest, args: tuple, kwargs: dict):
        pz = attnflow.import_optional("penzai.pz", "penzai")
        self.pz, self.kind = pz, "penzai"
        if len(args) != 1:
            raise attnflow.OptionError(
                f"A penzai model is called as faithfulness(model, explanation, tokens, **side_inputs); got {len(args)} "
                "positional inputs."
            )
        self._names: dict[str, list[str]] = {}
        positional = {}
        for key, value in {"": args[0], **kwargs}.items():
            names = list(getattr(value, "named_shape", ()))
            if not names or getattr(value, "positional_shape", None) or "batch" not in names:
                raise attnflow.OptionError(
                    f"penzai input {key or 'tokens'!r}: expected a named array with a 'batch' axis, got "
                    f"{type(value).__name__} {names or ''}."
                )
            order = ["batch", *[n for n in names if n != "batch"]]
            self._names[key] = order
            positional[key] = value.untag(*order).unwrap()
        lookups = pz.select(model).at_instances_of(pz.nn.EmbeddingLookup)
        if lookups.count() != 1:
            raise attnflow.OptionError(
                f"The penzai model has {lookups.count()} pz.nn.EmbeddingLookup layers; the probe needs exactly one "
                "(the token embedding)."
            )
        tap = _embedding_tap(pz)
        self._perturbed_model = lookups.apply(lambda layer: pz.nn.Sequential([layer, tap(probe=self)]))
        super().__init__(model, request, (positional.pop(""),), positional)

    def _call(self, args: tuple, kwargs: dict) -> Any:
        wrap = self.pz.nx.wrap
        tokens = wrap(args[0]).tag(*self._names[""])
        side = {key: wrap(value).tag(*self._names[key]) for key, value in kwargs.items()}
        output = self._perturbed_model(tokens, **side)
        names = list(getattr(output, "named_shape", ()))
        if output.positional_shape or "batch" not in names or "seq" not in names or len(names) != 3:
            raise attnflow.OptionError(
                f"The penzai model's output has named axes {names} (positional {output.positional_shape}); the probe "
                "reads logits named {batch, seq, vocabulary}."
            )
        return output.untag("batch", "seq", *[n for n in names if n not in ("batch", "seq")]).unwrap()

    def _named_embedding(self, value: Any) -> Any:
        names = list(value.named_shape)
        rest = [n for n in names if n not in ("batch", "seq")]
        if value.positional_shape or len(rest) != 1 or len(names) != 3:
            raise attnflow.OptionError(
                f"The penzai embedding lookup's output has named axes {names}; expected {{batch, seq, embedding}}."
            )
        output = self._embedding_output(value.untag("batch", "seq", *rest).unwrap())
        return self.pz.nx.wrap(output).tag("batch", "seq", *rest)


def _int_ids(value: Any) -> bool:
    return (hasattr(value, "ndim") and hasattr(value, "dtype") and value.ndim == 2
            and np.issubdtype(np.dtype(value.dtype), np.integer))


def _same_ids(value: Any, ids: np.ndarray | None) -> bool:
    if ids is None or not _int_ids(value) or tuple(value.shape) != ids.shape:
        return False
    try:
        return bool(np.array_equal(np.asarray(value), ids))
    except Exception:  # a tracer (under jit): not the call's own ids
        return False


def _index(value: Any, items: np.ndarray, batch: int) -> Any:
    """Row ``items[r]`` of every batch-first array in ``value`` (nested tuples, lists, dicts), others kept."""
    if hasattr(value, "ndim") and hasattr(value, "shape") and value.ndim and value.shape[0] == batch:
        return value[np.asarray(items)]
    if isinstance(value, tuple):
        return tuple(_index(v, items, batch) for v in value)
    if isinstance(value, list):
        return [_index(v, items, batch) for v in value]
    if isinstance(value, dict):
        return {k: _index(v, items, batch) for k, v in value.items()}
    return value


def _logits(output: Any) -> Any:
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if logits is None and hasattr(output, "ndim") and output.ndim in (2, 3):
        logits = output
    return logits


def _hidden(output: Any) -> Any:
    """The last hidden state: ``output.last_hidden_state``, a tuple's first array, or the output itself."""
    hidden = output.get("last_hidden_state") if isinstance(output, dict) else getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)) and output and hasattr(output[0], "ndim"):
        hidden = output[0]
    if hidden is None:
        hidden = output
    return hidden if hasattr(hidden, "ndim") and hidden.ndim == 3 else None
