"""``generate()`` under ``attnflow.attach``: one trace per call, stitched from its steps or re-run.

While attached, the model's ``generate`` is wrapped (an instance attribute, removed on exit; a
reference-counted switch, so overlapping attaches share one wrapper). The wrapper leaves the call and
its output alone and tells each attach on the model that a generation runs:

* ``generation="stitch"`` (the default): the recorder buffers the prefill pass and each one-query step
  and stitches them into one causal trace over the prompt and the generated tokens (see
  :mod:`attnflow.capture._generation`);
* ``generation="rerun"``: nothing is recorded while ``generate()`` runs; afterwards one teacher-forced
  forward pass over the finished sequences (all but their last token) is captured, with the positions
  ``generate()`` used (from the attention mask's cumulative sum when the prompt is left-padded).

Either way the trace's mask is the prompt's attention mask followed by each item's generated tokens up
to and including its first end-of-sequence token, and its metadata says where the generated tokens
begin (``sources="generated"``).

Private to attnflow.adapters; torch is imported lazily.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

import attnflow
from attnflow.recording import generated_mask, switch

from . import _torch_common as common

MODES = ("stitch", "rerun")
_lock = threading.Lock()
_listeners: dict[int, list[Listener]] = {}
# generate() keywords that are not model inputs (the re-run forward pass must not get them)
_NOT_INPUTS = {
    "input_ids", "inputs", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "past_key_values",
    "use_cache", "generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
    "synced_gpus", "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask",
    "output_attentions", "output_hidden_states", "return_dict_in_generate", "labels", "cache_position",
    "position_ids", "cache",
}
#: ``cache_implementation`` values that give every step a cache of fixed length (unwritten slots included).
_FIXED_CACHES = ("static", "offloaded_static")


class Listener:
    """One attach's view of the model's ``generate()`` calls."""

    def __init__(self, model: Any, passes: common.TorchPass, mode: str, streams: tuple[str | None, str | None]):
        if mode not in MODES:
            raise attnflow.OptionError(f"generation must be 'stitch' or 'rerun', got {mode!r}.")
        self.model = model
        self.passes = passes
        self.recorder = passes.recorder
        self.mode = mode
        self.decoder, self.encoder = streams  # stream names (decoder None: a single-stream model)

    # -- before generate() ----------------------------------------------------------------------------
    def check(self, call: GenerateCall) -> None:
        if self.mode != "stitch":
            return
        request = self.recorder.request
        asked = [k for k, on in (("target=", request.gradients), ("values=True", request.values),
                                 ("value_zeroing=True", request.value_zeroing)) if on]
        why = None
        if asked:
            why = f"{' and '.join(asked)} need one forward pass with autograd and the model at hand"
        elif call.setting("num_beams", 1) > 1:
            why = f"beam search (num_beams={call.setting('num_beams', 1)}) reorders the cache between steps"
        elif call.kwargs.get("assistant_model") is not None or call.setting("prompt_lookup_num_tokens", None):
            why = "assisted generation runs candidate tokens it later drops"
        local = _self_masked_local_layers(self.model)
        if why is None and local and _fixed_cache(call):
            raise attnflow.OptionError(
                f"attnflow refuses this generate() call before it runs: {type(self.model).__name__}'s local attention "
                f"layers ({local[0]}...) mask keys by their own position table, which assumes the keys end at the "
                "query; with a static cache (cache_implementation='static') they attend to unwritten cache slots, so "
                "no trace of the steps is the model's real attention. Generate with the default dynamic cache (leave "
                "cache_implementation out)."
            )
        if why is not None:
            raise attnflow.OptionError(
                f"attnflow cannot stitch this generate() call's steps into one trace: {why}. Attach with "
                "attnflow.attach(model, generation='rerun'), which captures one teacher-forced forward pass over "
                "the finished sequences instead."
            )

    def before(self, call: GenerateCall) -> None:
        if self.mode == "stitch":
            self.recorder.start_generation()
            self.passes.generating = True
            self.passes.seen = {}
        else:
            self.passes.muted += 1

    def failed(self) -> None:
        if self.mode == "stitch":
            self.passes.generating = False
            self.recorder.abort_generation()
        else:
            self.passes.muted -= 1

    # -- after it ---------------------------------------------------------------------------------------
    def after(self, call: GenerateCall, output: Any, others: list[Listener]) -> None:
        torch = attnflow.import_optional("torch", "torch")
        sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
        if self.mode == "stitch":
            self.passes.generating = False
        else:
            self.passes.muted -= 1
        if not isinstance(sequences, torch.Tensor) or sequences.ndim != 2:
            if self.mode == "stitch":
                self.recorder.abort_generation()
            raise attnflow.AdapterError(
                "generate() returned no token sequences attnflow can read (expected a (batch, length) tensor or an "
                f"output with .sequences, got {type(output).__name__})."
            )
        try:
            layout = self._layout(call, sequences, torch)
            if self.mode == "stitch":
                self.recorder.end_generation(streams=layout["streams"], metadata=layout["metadata"])
                return
            self.recorder.start_generation()
            for other in others:
                other.passes.muted += 1
            try:
                with torch.no_grad():
                    self.model(**layout["rerun"])
            except BaseException:
                self.recorder.abort_generation()
                raise
            finally:
                for other in others:
                    other.passes.muted -= 1
            self.recorder.end_generation(streams=layout["streams"], metadata=layout["metadata"])
        except attnflow.AttnflowError as exc:
            raise _keeping(exc, output, sequences) from exc

    def _layout(self, call: GenerateCall, sequences: Any, torch: Any) -> dict[str, Any]:
        """The stitched streams' masks and ids, the trace's generation metadata and the re-run's inputs."""
        ids = sequences.detach().cpu().numpy()
        prompt_ids, prompt_mask = call.tensor("input_ids"), call.tensor("attention_mask")
        eos = call.eos()
        inputs = {k: v for k, v in call.kwargs.items() if k not in _NOT_INPUTS and call.model_takes(k)}
        if self.encoder is not None:  # encoder-decoder: the decoder's prompt is its start (or given) tokens
            decoder_prompt = call.tensor("decoder_input_ids")
            first = 1 if decoder_prompt is None else int(decoder_prompt.shape[1])
            mask = generated_mask(None, first, ids[:, first:-1], eos)
            streams = {
                self.decoder: {"input_ids": ids[:, :-1], "mask": mask},
                self.encoder: {
                    "input_ids": None if prompt_ids is None else prompt_ids.detach().cpu().numpy(),
                    "mask": None if prompt_mask is None else prompt_mask.detach().cpu().numpy(),
                },
            }
            rerun = {**inputs, "input_ids": prompt_ids, "attention_mask": prompt_mask,
                     "decoder_input_ids": sequences[:, :-1], "use_cache": False}
        else:
            first = int(prompt_ids.shape[1]) if prompt_ids is not None else int(
                call.tensor("inputs_embeds").shape[1]) if call.tensor("inputs_embeds") is not None else 0
            if prompt_ids is None or ids.shape[1] <= first or not np.array_equal(
                ids[:, :first], prompt_ids.detach().cpu().numpy()
            ):
                raise attnflow.AdapterError(
                    "attnflow reads the prompt of a decoder's generate() call from input_ids, and the returned "
                    "sequences must begin with it; call generate(input_ids=..., attention_mask=...)."
                )
            own = None if prompt_mask is None else prompt_mask.detach().cpu().numpy()
            mask = generated_mask(own, first, ids[:, first:-1], eos)
            streams = {self._generated_stream(first): {"input_ids": ids[:, :-1], "mask": mask}}
            full = torch.ones_like(sequences[:, :-1])
            if prompt_mask is not None:
                full[:, :first] = prompt_mask
            rerun = {**inputs, "input_ids": sequences[:, :-1], "attention_mask": full, "use_cache": False}
            types = call.tensor("token_type_ids")
            if types is not None and types.ndim == 2 and types.shape[1] == first:
                # PaliGemma: the prompt is the prefix (0, attended both ways), what generate() adds the suffix (1)
                added = 1 if str(getattr(self.model.config, "model_type", "")).startswith("paligemma") else 0
                rerun["token_type_ids"] = torch.cat([types, torch.full_like(sequences[:, first:-1], added)], dim=1)
            if call.model_takes("position_ids"):
                positions = full.long().cumsum(-1) - 1
                rerun["position_ids"] = positions.masked_fill(full == 0, 1)
        produced = generated_mask(None, 0, ids[:, first:], eos)
        metadata = {"generation": {
            "mode": self.mode, "stream": next(iter(streams)), "first_generated": first,
            "new_tokens": int(ids.shape[1] - first), "generated_ids": ids[:, first:].tolist(),
            "lengths": produced.sum(axis=1).tolist(),  # per item, its tokens up to its end of sequence
        }}
        return {"streams": streams, "metadata": metadata, "rerun": {k: v for k, v in rerun.items() if v is not None}}


    def _generated_stream(self, first: int) -> str | None:
        """The stream generate() extends: the adapter's (``self.decoder``); for a multi-stream model whose
        language model does not say ``is_causal`` (PaliGemma's prefix attends both ways) the text stream, or the
        one named stream that ran the one-token steps (or the prompt's length in a one-step generation)."""
        if self.decoder is not None:
            return self.decoder
        named = {stream for stream in self.passes.streams.values() if stream is not None}
        if not named:
            return None
        if "text" in named:
            return "text"
        steps = self.recorder.steps if self.mode == "stitch" else []
        later = {s for step in steps[1:] for s in step.queries if s is not None}
        if not later and steps:
            later = {s for s, q in steps[0].queries.items() if s is not None and q == first}
        if len(later) == 1:
            return later.pop()
        raise attnflow.AdapterError(
            f"attnflow cannot tell which of the streams {sorted(named)} generate() extends; capture the language "
            "model alone with adapter_options={'modules': [...]}."
        )


def _self_masked_local_layers(model: Any) -> list[str]:
    """Paths of attention modules that mask a local window with their own causal table (GPT-Neo's
    ``attention_type == "local"`` with a ``bias`` buffer sliced by the key length)."""
    torch = attnflow.import_optional("torch", "torch")
    return [
        path for path, module in model.named_modules()
        if getattr(module, "attention_type", None) == "local" and isinstance(getattr(module, "bias", None), torch.Tensor)
    ]


def _fixed_cache(call: GenerateCall) -> bool:
    """Whether the generate() call gives the model a cache of fixed length (a static cache)."""
    if call.setting("cache_implementation", None) in _FIXED_CACHES:
        return True
    cache = call.kwargs.get("past_key_values", call.kwargs.get("cache"))
    return cache is not None and "Static" in type(cache).__name__


def _keeping(exc: attnflow.AttnflowError, output: Any, sequences: Any) -> attnflow.AttnflowError:
    """``exc`` (raised after generate() ran) with what it generated kept on it: ``exc.output`` (generate()'s
    return value) and ``exc.sequences``, and said so in the message."""
    try:
        error = type(exc)(
            f"{exc} (generate() had finished; its output is kept on this error as .output, its token ids as "
            ".sequences)"
        )
    except Exception:  # a subclass with other arguments: the same error, with the output on it
        error = exc
    error.output = output  # type: ignore[attr-defined]
    error.sequences = sequences  # type: ignore[attr-defined]
    return error


class GenerateCall:
    """The arguments of one ``generate()`` call, read the way ``generate`` reads them."""

    def __init__(self, model: Any, args: tuple, kwargs: dict):
        self.model = model
        self.kwargs = dict(kwargs)
        if args:  # generate(inputs=None, generation_config=None, ...)
            self.kwargs.setdefault("input_ids", args[0])
            if len(args) > 1:
                self.kwargs.setdefault("generation_config", args[1])
        if "inputs" in self.kwargs:
            self.kwargs.setdefault("input_ids", self.kwargs.pop("inputs"))
        try:
            self._parameters = set(inspect.signature(model.forward).parameters)
            self._any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            self._parameters, self._any = set(), True

    def tensor(self, name: str) -> Any:
        value = self.kwargs.get(name)
        return value if hasattr(value, "shape") else None

    def setting(self, name: str, default: Any) -> Any:
        """A generation setting: the call's keyword, else its generation_config's, else the model's."""
        if name in self.kwargs:
            return self.kwargs[name]
        for config in (self.kwargs.get("generation_config"), getattr(self.model, "generation_config", None)):
            value = getattr(config, name, None)
            if value is not None:
                return value
        return default

    def eos(self) -> list[int]:
        eos = self.setting("eos_token_id", None)
        if eos is None:
            return []
        if hasattr(eos, "tolist"):
            eos = eos.tolist()
        return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]

    def model_takes(self, name: str) -> bool:
        return name in self._parameters or (self._any and name not in ("position_ids",))


@contextmanager
def wrap_generate(model: Any, listener: Listener) -> Iterator[None]:
    """``model.generate`` reports to ``listener`` for the block (the wrapper is shared by overlapping
    attaches on the model, and removed when the last of them leaves)."""
    key = id(model)

    def turn_on() -> tuple[bool, Any]:
        had = "generate" in model.__dict__
        previous = model.__dict__.get("generate")
        model.__dict__["generate"] = _wrapper(model, model.generate, key)
        return had, previous

    def turn_off(state: tuple[bool, Any]) -> None:
        had, previous = state
        if had:
            model.__dict__["generate"] = previous
        else:
            model.__dict__.pop("generate", None)

    if not callable(getattr(model, "generate", None)):
        yield
        return
    # both switches: each is undone whatever arrives on the way in or out (a signal handler's exception)
    with switch(("transformers.generate", key), turn_on, turn_off), switch(
        ("transformers.generate listener", id(listener)), lambda: _listen(key, listener), lambda _: _unlisten(key, listener)
    ):
        yield


def _listen(key: int, listener: Listener) -> None:
    with _lock:
        _listeners.setdefault(key, []).append(listener)


def _unlisten(key: int, listener: Listener) -> None:
    with _lock:
        listeners = _listeners[key]
        listeners.remove(listener)
        if not listeners:
            del _listeners[key]


def _wrapper(model: Any, original: Any, key: int) -> Any:
    def generate(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            listeners = list(_listeners.get(key, []))
        if not listeners:
            return original(*args, **kwargs)
        call = GenerateCall(model, args, kwargs)
        for listener in listeners:
            listener.check(call)
        started: list[Listener] = []
        try:
            for listener in listeners:
                listener.before(call)
                started.append(listener)
            output = original(*args, **kwargs)
        except BaseException:
            for listener in started:
                listener.failed()
            raise
        for listener in listeners:
            listener.after(call, output, [other for other in listeners if other is not listener])
        return output

    generate.__wrapped__ = original  # type: ignore[attr-defined]
    generate.__doc__ = getattr(original, "__doc__", None)
    return generate
