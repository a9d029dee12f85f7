"""Generation with a key-value cache in JAX libraries under ``attnflow.attach``: one stitched trace per generation.

penzai (``penzai.models.transformer.sampling_mode.KVCachingTransformerLM``): the sampler is a stateful layer
whose calls each run a slice of the sequence (the prompt, then one token per call) against its key-value
cache (``pz.nn.KVCachingAttention``, a cache of fixed length ``cache_len`` whose slot ``i`` holds position
``i``). Attached to the sampler, attnflow takes each call as one step of a generation: the call that finds the
cache empty (``cache_end_index == 0``) starts one, each later call continues it, and the steps are stitched by
the core (``attnflow.recording``'s ``stitch``: the static cache's unwritten slots are sliced off) into one causal
trace over the prompt and the tokens fed back. The generation ends when ``temperature_sample_pyloop`` (penzai's
``simple_decoding_loop``) returns, which also tells the last sampled token (read by no call), or else when the
attach block ends (a loop of your own: the tokens fed back are the generated ones). The mask is the prompt's
(its ``pad_id`` tokens are padding, as the sampler treats them) followed by every generated token.

Private to attnflow.adapters; jax and penzai are imported lazily.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np

from attnflow import AdapterError, OptionError, Recorder
from attnflow.recording import generated_mask

from ._flax_common import patched_attribute

_SAMPLING_MODULE = "penzai.models.transformer.sampling_mode"
_LOOP_MODULE = "penzai.models.transformer.simple_decoding_loop"
_LOOP = "temperature_sample_pyloop"


def is_penzai_sampler(model: Any) -> bool:
    """Whether ``model`` is penzai's ``KVCachingTransformerLM`` (a stateful sampler with a key-value cache)."""
    module = sys.modules.get(_SAMPLING_MODULE)
    cls = getattr(module, "KVCachingTransformerLM", None)
    return cls is not None and isinstance(model, cls)


def generation_metadata(ids: np.ndarray, first: int, eos: tuple[int, ...] = ()) -> dict[str, Any]:
    """The trace's ``metadata["generation"]`` for sequences ``ids`` (prompt then generated tokens, the last one
    included) whose generated tokens begin at ``first``."""
    produced = generated_mask(None, 0, ids[:, first:], eos)
    return {"generation": {
        "mode": "stitch", "stream": None, "first_generated": first, "new_tokens": int(ids.shape[1] - first),
        "generated_ids": ids[:, first:].tolist(), "lengths": produced.sum(axis=1).tolist(),
    }}


class PenzaiSampling:
    """The generation under way on one attached ``KVCachingTransformerLM`` (see the module docstring)."""

    def __init__(self, recorder: Recorder, sampler: Any, causal: bool | None):
        self.recorder = recorder
        self.sampler = sampler
        self.causal = causal  # every attention layer masks causally (the stitched trace says so)
        self.pad_id = int(sampler.pad_id)
        self.prompt: np.ndarray | None = None  # (batch, prompt length) ids of the generation under way
        self.fed: list[np.ndarray] = []  # the ids of each later call

    @property
    def running(self) -> bool:
        return self.prompt is not None

    def _cache_index(self) -> int:
        value = self.sampler.cache_end_index.value
        try:
            return int(value)
        except Exception as exc:  # a tracer: the sampler's call is being traced (jax.jit of a function around it)
            raise AdapterError(
                "attnflow stitches the calls of a penzai KVCachingTransformerLM run eagerly, but this call's cache "
                f"index is a traced value ({type(value).__name__}): call the sampler (or temperature_sample_pyloop) "
                "outside jax.jit / jax.lax loops."
            ) from exc

    def before_call(self, tokens: Any, refuse: str | None) -> None:
        """A call of the sampler begins, with ``tokens`` (the call's ``(batch, seq)`` ids as numpy, or None)."""
        if refuse:
            raise OptionError(
                f"attnflow cannot stitch the calls of a penzai KVCachingTransformerLM into one trace with {refuse}: "
                "they need one forward pass over the whole sequence. Generate first, then capture the uncached model "
                "(the TransformerLM the sampler was built from) on the finished sequences with "
                "attnflow.capture(model, tokens, token_positions=..., ...)."
            )
        if tokens is None:
            raise AdapterError(
                "attnflow stitches the calls of a penzai KVCachingTransformerLM from their token ids, but this call's "
                "tokens are not a concrete integer named array with axes 'batch' and 'seq'; call the sampler eagerly "
                "with pz.nx.wrap(ids).tag('batch', 'seq')."
            )
        index = self._cache_index()
        if index == 0:  # an empty cache: a new generation
            if self.running:
                self.finish()
            self.recorder.start_generation()
            self.prompt, self.fed = np.asarray(tokens), []
            return
        if not self.running:
            raise AdapterError(
                f"The penzai sampler's key-value cache already holds {index} tokens written before attnflow was "
                "attached, so their attention was not recorded and the steps cannot be stitched from position 0. "
                "Build a fresh sampler (KVCachingTransformerLM.from_uncached(...)) and attach before its first call."
            )
        expected = int(self.prompt.shape[1]) + sum(int(ids.shape[1]) for ids in self.fed)  # type: ignore[union-attr]
        if index != expected:
            self.abort()
            raise AdapterError(
                f"The penzai sampler's cache index is {index}, but the calls recorded since its prompt wrote "
                f"{expected} tokens (its state was changed between calls); build a fresh sampler for each generation."
            )
        self.fed.append(np.asarray(tokens))

    def finish(self, continuation: Any = None) -> None:
        """End the generation: ``continuation``, the ``(batch, new)`` tokens a sampling loop returned (the last
        one read by no call), or None (the tokens fed back are the generated ones)."""
        if self.prompt is None:
            return
        prompt, fed = self.prompt, self.fed
        self.prompt, self.fed = None, []
        first = int(prompt.shape[1])
        stitched = np.concatenate([prompt, *fed], axis=1)
        if continuation is None:
            full = stitched
        else:
            full = np.concatenate([prompt, np.asarray(continuation)], axis=1)
            if full.shape[1] != stitched.shape[1] + 1 or not np.array_equal(full[:, :-1], stitched):
                self.recorder.abort_generation()
                raise AdapterError(
                    "The tokens penzai's sampling loop returned are not the ones it fed the sampler after the prompt "
                    "(the sampler was called outside the loop meanwhile); run one loop per fresh sampler."
                )
        mask = generated_mask(prompt != self.pad_id, first, stitched[:, first:])
        metadata = generation_metadata(full, first)
        self.recorder.end_generation(streams={None: {"input_ids": stitched, "mask": mask, "causal": self.causal}},
                                     metadata=metadata)

    def abort(self) -> None:
        if self.prompt is not None:
            self.prompt, self.fed = None, []
            self.recorder.abort_generation()


#: Per thread, the attached samplers' generations (``id(sampler)`` -> generations, in attach order).
_SAMPLINGS: dict[int, dict[int, list[PenzaiSampling]]] = {}


def _of(sampler: Any) -> list[PenzaiSampling]:
    return list(_SAMPLINGS.get(threading.get_ident(), {}).get(id(sampler), ()))


def _wrapped_loop(original: Callable[..., Any]) -> Callable[..., Any]:
    def temperature_sample_pyloop(model: Any, *args: Any, **kwargs: Any) -> Any:
        samplings = _of(model)
        if not samplings:
            return original(model, *args, **kwargs)
        try:
            result = original(model, *args, **kwargs)
        except BaseException:
            for sampling in samplings:
                sampling.abort()
            raise
        continuation = _batch_seq(result)
        for sampling in samplings:
            sampling.finish(continuation)
        return result

    temperature_sample_pyloop.__wrapped__ = original  # type: ignore[attr-defined]
    temperature_sample_pyloop.__doc__ = original.__doc__
    return temperature_sample_pyloop


def _batch_seq(named: Any) -> np.ndarray | None:
    names = list(getattr(named, "named_shape", ()))
    if "seq" not in names or set(names) - {"batch", "seq"}:
        return None
    array = np.asarray(named.untag(*(["batch"] if "batch" in names else []), "seq").unwrap())
    return array if "batch" in names else array[None]


@contextmanager
def penzai_sampling(recorder: Recorder, sampler: Any, causal: bool | None) -> Iterator[PenzaiSampling]:
    """While held: ``sampler``'s calls are steps of a generation on ``recorder`` (ended by penzai's
    ``temperature_sample_pyloop`` returning, or at the end of the block); undone on exit. ``causal``: whether
    every attention layer of the sampler masks causally."""
    sampling = PenzaiSampling(recorder, sampler, causal)
    with _registered(_SAMPLINGS, sampler, sampling):
        loop_module = sys.modules.get(_LOOP_MODULE)
        if loop_module is None:
            import importlib

            loop_module = importlib.import_module(_LOOP_MODULE)
        with patched_attribute(loop_module, _LOOP, _wrapped_loop):
            try:
                yield sampling
            except BaseException:
                sampling.abort()
                raise
            sampling.finish()


@contextmanager
def _registered(table: dict[int, dict[int, list[Any]]], model: Any, item: Any) -> Iterator[None]:
    """``item`` listed under ``model`` in ``table`` (per thread) for the block, and removed after it."""
    per_thread = table.setdefault(threading.get_ident(), {})
    per_thread.setdefault(id(model), []).append(item)
    try:
        yield
    finally:
        held = per_thread.get(id(model), [])
        if item in held:
            held.remove(item)
        if not held:
            per_thread.pop(id(model), None)


# -- gemma (gm.text.Sampler) ------------------------------------------------------------------------------------
_PREFILL_MODULE = "gemma.gm.text._prefill"
_LOOP_CLASS = ("gemma.gm.text._sampler_loop", "SamplerLoop")


class GemmaSampling:
    """The generation under way through ``gm.text.Sampler.sample`` on one attached gemma model.

    gemma's sampler right-pads the prompts to the longest, ``L`` tokens (BOS included), runs a prefill over
    them, then runs the prompt's last slot again (its first step re-computes the last prompt token, at slot
    ``L - 1``, to predict the first token), and writes each later token at the next slot of its fixed-length
    cache. attnflow lays each item out left-padded (its real prompt tokens moved to the end of the ``L`` slots,
    on queries and keys: the order of real tokens and their attention are unchanged), keeps the first ``L - 1``
    prefill rows (the padding queries' rows zeroed) and takes row ``L - 1`` from the first step (the query that
    predicted the first token), so that the core stitches one causal trace over the left-padded prompt and the
    generated tokens, as a PyTorch ``generate()`` over a left-padded prompt gives.
    """

    def __init__(self, recorder: Recorder, model: Any):
        self.recorder = recorder
        self.model = model
        self.prompt: np.ndarray | None = None  # (batch, L) right-padded prompt ids of the generation under way
        self.order: np.ndarray | None = None  # (batch, L) the right-padded slot each left-padded slot comes from
        self.passes = 0  # passes of the model recorded so far in this generation

    @property
    def running(self) -> bool:
        return self.prompt is not None

    def start(self, text: Any, length: int, has_images: bool, last_state: Any) -> None:
        request = self.recorder.request
        if request.gradients or request.values or request.value_zeroing:
            raise OptionError(
                "attnflow cannot stitch gemma's sampler steps with target=, values= or value_zeroing=: they need one "
                "forward pass over the whole sequence. Sample first, then capture the model on the finished "
                "sequences with attnflow.capture(model, {'params': params}, ids, target=...)."
            )
        if has_images or last_state is not None:
            what = "images" if has_images else "last_state= (a later turn: its cache holds earlier turns)"
            raise OptionError(
                f"attnflow stitches gemma's Sampler.sample over one text prompt, not with {what}; sample without "
                "it, or capture the finished sequence with one model.apply over it."
            )
        prompt = np.asarray(text)[:, :length]
        real = prompt != 0
        counts = real.sum(axis=1)
        if not all(real[b, :n].all() for b, n in enumerate(counts)):
            raise AdapterError("gemma's sampler handed attnflow a prompt that is not right-padded with id 0.")
        self.order = np.stack([np.concatenate([np.arange(n, length), np.arange(n)]) for n in counts])
        self.prompt, self.passes = prompt, 0
        self.recorder.start_generation()

    def relayout(self, weights: np.ndarray) -> np.ndarray:
        """One recorded layer of the current pass, laid out left-padded (see the class docstring)."""
        order, length = self.order, int(self.prompt.shape[1])  # type: ignore[union-attr]
        batch = np.arange(weights.shape[0])[:, None]
        keys = np.array(weights)
        keys[..., :length] = np.moveaxis(np.moveaxis(weights[..., :length], -1, 1)[batch, order], 1, -1)
        if self.passes:
            return keys
        rows = np.moveaxis(np.moveaxis(keys[:, :, :length], 2, 1)[batch, order], 1, 2)
        rows[:, :, :length][np.broadcast_to((self.prompt[batch, order] == 0)[:, None, :], rows.shape[:3])] = 0  # type: ignore[index]
        return rows[:, :, : length - 1]

    def finish(self, predicted: Any, steps: int, eos: tuple[int, ...]) -> None:
        """``predicted``: the sampler's ``(batch, max_out_length)`` output buffer, ``steps`` of it written."""
        if self.prompt is None:
            return
        prompt, self.prompt = self.prompt, None
        generated = np.asarray(predicted)[:, :steps]
        real = prompt != 0
        left = np.stack([np.concatenate([np.zeros((~r).sum(), row.dtype), row[r]]) for row, r in zip(prompt, real)])
        left_mask = left != 0
        first = int(prompt.shape[1])
        full = np.concatenate([left, generated], axis=1)
        mask = generated_mask(left_mask, first, generated[:, :-1], eos)
        metadata = generation_metadata(full, first, eos)
        self.recorder.end_generation(streams={None: {"input_ids": full[:, :-1], "mask": mask, "causal": True}},
                                     metadata=metadata)

    def abort(self) -> None:
        if self.prompt is not None:
            self.prompt = None
            self.recorder.abort_generation()


class StepRecorder:
    """The recorder as the gemma adapter's capture sees it: while a sampler's generation runs, each recorded
    layer is laid out by :meth:`GemmaSampling.relayout` and each pass counted; otherwise the recorder itself."""

    def __init__(self, recorder: Recorder, sampling: GemmaSampling):
        self._recorder = recorder
        self._sampling = sampling

    def __getattr__(self, name: str) -> Any:
        return getattr(self._recorder, name)

    def record(self, name: str, weights: np.ndarray, **options: Any) -> int:
        if self._sampling.running:
            weights = self._sampling.relayout(weights)
        return self._recorder.record(name, weights, **options)

    def end_call(self) -> None:
        self._recorder.end_call()
        if self._sampling.running and not self._recorder.in_call:
            self._sampling.passes += 1


#: Per thread, the attached gemma models' generations (``id(model)`` -> generations, in attach order).
_GEMMA: dict[int, dict[int, list[GemmaSampling]]] = {}


def _gemma_of(model: Any) -> list[GemmaSampling]:
    return list(_GEMMA.get(threading.get_ident(), {}).get(id(model), ()))


def _wrapped_prefill(original: Callable[..., Any]) -> Callable[..., Any]:
    def prefill(**kwargs: Any) -> Any:
        samplings = _gemma_of(kwargs.get("model"))
        if not samplings:
            return original(**kwargs)
        source = kwargs["input"]
        for sampling in samplings:
            sampling.start(source.text, int(source.length_with_mm), source.images is not None,
                           kwargs.get("last_state"))
        try:
            return original(**kwargs)
        except BaseException:
            for sampling in samplings:
                sampling.abort()
            raise

    prefill.__wrapped__ = original  # type: ignore[attr-defined]
    return prefill


def _wrapped_sample(original: Callable[..., Any]) -> Callable[..., Any]:
    def sample(self: Any, **kwargs: Any) -> Any:
        samplings = [s for s in _gemma_of(self.model) if s.running]
        if not samplings:
            return original(self, **kwargs)
        if kwargs.get("stream"):
            for sampling in samplings:
                sampling.abort()
            raise OptionError("attnflow stitches gemma's Sampler.sample(stream=False); sample without stream=True "
                              "inside attach.")
        try:
            state = original(self, **kwargs)
        except BaseException:
            for sampling in samplings:
                sampling.abort()
            raise
        for sampling in samplings:
            sampling.finish(state.predicted_tokens, int(state.step), tuple(int(t) for t in self.end_tokens))
        return state

    sample.__wrapped__ = original  # type: ignore[attr-defined]
    return sample


@contextmanager
def gemma_sampling(recorder: Recorder, model: Any) -> Iterator[StepRecorder]:
    """While held: ``gm.text.Sampler.sample`` on ``model`` records one stitched trace on ``recorder``; yields
    the recorder the adapter's capture must record through. Nothing is patched when gemma's sampler was never
    imported (the model cannot be sampling then)."""
    sampling = GemmaSampling(recorder, model)
    with _registered(_GEMMA, model, sampling), ExitStack() as patches:
        prefill_module = sys.modules.get(_PREFILL_MODULE)
        loop = getattr(sys.modules.get(_LOOP_CLASS[0]), _LOOP_CLASS[1], None)
        if prefill_module is not None and loop is not None:
            patches.enter_context(patched_attribute(prefill_module, "prefill", _wrapped_prefill))
            patches.enter_context(patched_attribute(loop, "sample", _wrapped_sample))
        try:
            yield StepRecorder(recorder, sampling)
        except BaseException:
            sampling.abort()
            raise
        sampling.abort()  # a generation the sampler did not finish
