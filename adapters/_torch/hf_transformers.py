"""The Hugging Face transformers adapter (transformers 5).

Models load with ``attn_implementation="sdpa"`` by default, and SDPA never materialises the attention
probabilities (``output_attentions=True`` under SDPA returns an empty tuple in transformers 5). While
attached, this adapter switches the model to ``"eager"`` with ``model.set_attn_implementation("eager")``
(the model's own eager code path and eager mask builder, so the weights are exactly what
``output_attentions=True`` under eager returns) and puts every config's implementation back on exit,
also when the forward pass raises. Overlapping attaches on one model (in threads, or left out of order)
share the switch: the last one to leave restores what the first one found.

The attention modules are the ones each model class declares for ``output_attentions``
(``_can_record_outputs["attentions"]``, and ``["cross_attentions"]`` recorded with ``kind="cross"``), so
a grouped-query model (Llama family) yields one map per query head, ``(batch, num_attention_heads, q, k)``.

torch and transformers are imported inside methods only.
"""

from __future__ import annotations

import collections
import inspect
import json
import os
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast

import numpy as np

import attnflow
from attnflow.recording import deferred_interrupts, switch

from .. import _hf_families as families
from . import _banded, _generation_torch, _qwen_vision, _reduced, _swin, _value_zeroing, _values, _vision_language
from . import _torch_common as common

_EAGER = "eager"
# What each model class's _can_record_outputs calls the attention maps, and the trace kind they get.
_RECORDABLE = (("attentions", "self"), ("cross_attentions", "cross"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class TransformersAdapter(attnflow.Adapter):
    """Captures Hugging Face ``PreTrainedModel``s as loaded (SDPA included) by switching them to eager.

    Options: ``modules`` (classes or module-path globs, as for the ``torch`` adapter) replaces the
    detected attention modules, for models whose class declares none; ``output_index`` (default 1) is
    where those modules return their weights.

    The trace's mask is the call's ``attention_mask`` (2-D; default all real), its token ids the call's
    ``input_ids`` (so ``tokens=tokenizer`` labels them), and ``causal`` the attention modules' own
    ``is_causal``. A model whose attention cannot be switched to eager raises
    :class:`attnflow.HiddenAttentionError`.
    """

    name = "transformers"
    framework = "transformers"
    array_library = "torch"
    extra = "transformers"
    priority = 10
    options = (
        attnflow.AdapterOption("modules", None, None, "module classes or path globs replacing the detected ones"),
        attnflow.AdapterOption("output_index", int, 1, "where those modules return their weights"),
    )
    captures = frozenset({"weights", "streams", "attn_grad", "values", "value_zeroing", "generation"})

    def claims(self, model: Any) -> bool:
        transformers = attnflow.import_optional("transformers", self.extra)
        return isinstance(common.unwrap_compiled(model), transformers.PreTrainedModel)

    def model_name(self, model: Any) -> str:
        model = common.unwrap_compiled(model)
        name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
        if not name or os.path.exists(name):  # a local directory says little; the class says more
            return type(model).__name__
        return name

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        # a torch.compile'd model: run the module it wraps (eager, exact, and no compilation wait)
        return common.run_without_grad(common.unwrap_compiled(model), args, kwargs)

    # -- capture ------------------------------------------------------------------------------------
    @contextmanager
    # override ignored: an adapter takes only the options it declares (attnflow.capture checks them first)
    def hooks(  # type: ignore[override]
        self, model: Any, recorder: attnflow.Recorder, *, modules: Any = None, output_index: int = 1,
    ) -> Iterator[None]:
        torch = attnflow.import_optional("torch", self.extra)
        transformers = attnflow.import_optional("transformers", self.extra)
        model = common.unwrap_compiled(model)
        if not isinstance(model, transformers.PreTrainedModel):
            raise attnflow.AdapterError(
                f"Adapter 'transformers' captures transformers.PreTrainedModel models; got "
                f"{type(model).__module__}.{type(model).__qualname__}. Try adapter='torch'."
            )
        if not isinstance(output_index, int) or isinstance(output_index, bool):
            raise attnflow.OptionError(f"Adapter 'transformers': output_index must be an int, got {output_index!r}.")
        shape = _Shape(model) if modules is None else None
        swin = shape.swin() if shape is not None else []
        reduced = shape.reduced() if shape is not None and not swin else []
        if swin:
            targets, generic = [(path, block, "self", 1) for path, block, _ in swin], False
            plan = families.StreamPlan({path: stream for path, _, stream in swin}, {})
        elif reduced:  # SegFormer: stages as streams, pooled keys as streams linked to their patches
            targets = [(path, m, "cross" if ratio > 1 else "self", 1) for path, m, _, _, ratio in reduced]
            generic = False
            plan = families.StreamPlan({path: _reduced.stream_of(stage) for path, _, stage, _, _ in reduced}, {})
        else:
            targets, generic = self._targets(model, transformers, torch, modules, output_index, shape)
            plan = families.plan_streams([path for path, *_ in targets], getattr(model.config, "model_type", None))
        passes = common.TorchPass(recorder, plan.streams)
        crops = _vision_language.Crops.install(model, passes, torch) if plan.multi and not modules else None
        causal = _causal_streams(targets, plan)
        signature = _signature(model)
        inject = generic and _takes(signature, "output_attentions")
        towers = dict(model.named_modules()) if plan.towers or plan.multi else {}  # read only for those
        every = shape.modules() if shape is not None else list(model.modules())

        def describe_call(args: tuple, kwargs: dict) -> dict[str, Any]:
            named = _bind(signature, args, kwargs)
            mask = _mask_array(named.get("attention_mask"), torch)
            ids = common.int_ids(named.get("input_ids"), torch)
            call: dict[str, Any] = {"metadata": {"attn_implementation": str(original), "captured_with": _EAGER}}
            call["metadata"].update(_vision_language.describe(model))
            if crops is not None and (named.get("image_sizes") is not None or not passes.generating):
                crops.start(named.get("image_sizes"))  # generate() keeps its own (below) for its prefill
            if recorder.request.values:
                call["metadata"]["values_layout"] = _values.value_map(model).layout
            passes.state.target_tokens = (mask, causal.get(None))
            if plan.multi or swin or reduced:
                passes.state.root = {"input_ids": ids, "mask": mask}
                call["streams"] = {stream: {"causal": flag} for stream, flag in causal.items() if flag}
            else:
                call.update(mask=mask, input_ids=ids, causal=causal.get(None))
                pixels = named.get("pixel_values")
                if isinstance(pixels, torch.Tensor) and not swin:
                    passes.state.single_pixels = tuple(pixels.shape)
            if inject and named.get("output_attentions") is None:
                passes.state.injected = True
                call["inject"] = {"output_attentions": True}
            return call

        def after(output: Any) -> Any:
            if passes.state.injected and not getattr(model.config, "output_attentions", False):
                return _without_attentions(output, torch)  # asked for by attnflow, not by the caller
            return None

        # vision towers whose attention returns no weights (Qwen2-VL): their probabilities, window by window
        windowed = _qwen_vision.windowed(targets, plan.streams) if plan.multi and not modules else {}
        vision_tower = next((towers[t] for t, stream in plan.towers.items() if stream == "vision"), None)
        handles: list[Any] = []
        watch = _qwen_vision.watch()
        with _eager(model, targets, transformers, every) as original, common.removing(handles), watch.closing():
            hint = _no_weights_hint(model, original)
            with deferred_interrupts():
                for path, module, kind, index in targets if not (swin or reduced) else []:
                    if path not in windowed:
                        common.register(handles, module.register_forward_hook,
                                        _layer_hook(path, module, kind, index, passes, torch, hint, crops))
                _qwen_vision.install(windowed, vision_tower, passes, torch, handles, watch)
                for path, block, stream in swin:
                    hook = _swin.block_hook(path, stream, passes, torch)
                    common.register(handles, block.register_forward_hook, hook, with_kwargs=True)
                if swin:
                    passes.finishers.append(_swin.finish)
                for path, module, stage, block, _ in reduced:
                    hook = _reduced.attention_hook(path, stage, block, passes, torch)
                    common.register(handles, module.register_forward_hook, hook, with_kwargs=True)
                if reduced:
                    passes.finishers.append(lambda p: _reduced.finish(p, model.config))
                if recorder.request.values:
                    _values.install(model, targets, passes, torch, handles)
                if recorder.request.value_zeroing:
                    _value_zeroing.install(model, targets, passes, torch, handles)
                for tower, stream in plan.towers.items():
                    hook = _tower_hook(stream, _signature(towers[tower]), passes, torch)
                    common.register(handles, towers[tower].register_forward_pre_hook, hook, with_kwargs=True)
                if plan.multi:
                    passes.finishers.append(lambda p: _finish_streams(p, model, plan, towers, crops))
                elif not (swin or reduced):
                    passes.finishers.append(lambda p: _finish_single_vision(p, model))
                common.install_pass_hooks(model, passes, describe_call, handles, after=after)
            listener = _CropsListener(
                model, passes, recorder.request.generation_mode, _generated_streams(model, plan, causal),
            )
            listener.crops = crops
            with _generation_torch.wrap_generate(model, listener):
                yield

    def _targets(
        self, model: Any, transformers: Any, torch: Any, modules: Any, output_index: int, shape: _Shape | None,
    ) -> tuple[list[tuple[str, Any, str, int]], bool]:
        """``(path, module, kind, output index)`` of every attention module to hook, and whether they were
        found by the generic search (the model declares no attention outputs). Without ``modules``, the search
        runs once per module tree (``shape`` keeps what it found); the family checks, which also read the modules'
        and the config's settings, run on every attach."""
        if modules is not None:
            match = common.selector_matcher(self.name, modules, torch)
            found = [
                (path, m, _kind_of(path, m), output_index) for path, m in model.named_modules() if match(path, m)
            ]
            if not found:
                raise common.no_match_error(self.name, model, modules)
            return found, False
        shape = shape or _Shape(model)
        searched, generic = shape.targets(transformers)
        found = _family_targets(model, searched)
        shape.note_frame_owners(found)
        if not found:
            raise attnflow.AdapterError(
                f"{type(model).__name__} declares no attention outputs (its class has no "
                "_can_record_outputs['attentions']) and has no module whose class name says Attention, so the "
                "transformers adapter cannot tell which modules compute attention. Name them: "
                "adapter_options={'modules': ['path.*.glob']} (they must return (output, weights)), or use "
                "adapter='torch' with the same option."
            )
        return found, generic

    # -- loading ------------------------------------------------------------------------------------
    def load_model(self, location: str, *, trust_remote_code: bool = False, generate: bool = False) -> tuple[Any, Any]:
        """``(model, tokenizer)`` from a local model directory, or from a hub id where there is network; for an
        image model (a ViT-family config: image and patch sizes, no vocabulary) ``(model, image processor)``,
        whose inputs :meth:`encode_images` makes.

        The model is loaded as ``AutoModel.from_pretrained`` leaves it (SDPA, eval mode); an encoder-decoder
        as ``AutoModelForSeq2SeqLM`` (which builds its decoder's inputs from ``labels``); with ``generate=True``
        a decoder as ``AutoModelForCausalLM`` (with its language-model head, for ``generate()``). A model whose
        config maps its classes onto Python files of its own (``auto_map``) is refused unless
        ``trust_remote_code=True`` (``--trust-remote-code`` on the command line), which *runs that Python*
        with your permissions: pass it only for a directory whose code you trust. Never asks on a terminal.
        A tokenizer that states no length limit gets the model's ``max_position_embeddings`` as its
        ``model_max_length``, so that :meth:`encode` can refuse texts the model cannot take.

        Raises:
            AdapterError: nothing loadable there (missing, damaged or unreadable weights, a model class
                transformers does not know, remote code not allowed); the message says which.
        """
        transformers = attnflow.import_optional("transformers", self.extra)
        location = os.fspath(location)
        path = Path(location).expanduser()
        if path.is_dir():
            source, kwargs = str(path), {}
        elif path.exists():
            raise attnflow.AdapterError(
                f"{location!r} is a file; pass the model's directory (the one holding config.json)."
            )
        elif not _HUB_ID.match(location) or location.startswith((".", "~")):
            raise attnflow.AdapterError(f"No model directory at {location!r}.")
        else:
            source, kwargs = location, ({"local_files_only": True} if _offline() else {})
        trust = {"trust_remote_code": bool(trust_remote_code)}  # explicit: transformers would otherwise prompt
        if not trust_remote_code and path.is_dir():
            _refuse_remote_code(location, path)
        try:
            config = transformers.AutoConfig.from_pretrained(source, **kwargs, **trust)
            if not trust_remote_code and getattr(config, "auto_map", None):
                _refuse_remote_code(location, None)
            auto = transformers.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else \
                transformers.AutoModelForCausalLM if generate else transformers.AutoModel
            model = auto.from_pretrained(source, **kwargs, **trust)
            if is_image_model(config):  # a ViT-family directory: its image processor stands in for a tokenizer
                tokenizer = transformers.AutoImageProcessor.from_pretrained(source, **kwargs, **trust)
            else:
                tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs, **trust)
        except attnflow.AttnflowError:
            raise
        except Exception as exc:  # safetensors, unpickling and model-class errors too: all mean "cannot load"
            if not trust_remote_code and "trust_remote_code" in str(exc):
                _refuse_remote_code(location, None, cause=exc)
            if source == location and not path.is_dir() and isinstance(exc, (OSError, ValueError)):
                where = (
                    "this machine is offline (HF_HUB_OFFLINE), so it was looked up in the local cache only"
                    if kwargs else "downloading it failed"
                )
                raise attnflow.AdapterError(
                    f"Cannot load {location!r}: it is not a local directory, and {where} ({exc}). Pass the path "
                    "of a downloaded model directory, or run where the Hugging Face hub is reachable."
                ) from exc
            raise attnflow.AdapterError(
                f"Cannot load a transformers model from {location!r}: {type(exc).__name__}: {exc}"
            ) from exc
        model.eval()
        if is_image_model(config):
            return model, tokenizer
        limit = getattr(model.config, "max_position_embeddings", None)
        if _max_tokens(tokenizer) is None and isinstance(limit, int) and limit > 0:
            tokenizer.model_max_length = limit  # the tokenizer does not say; the model's positions do
        return model, tokenizer

    def encode(
        self, tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None,
        targets: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Tokenise ``texts`` into a padded batch of torch tensors (``input_ids``, ``attention_mask``...).

        ``max_length`` truncates; without it, a text longer than the model takes (the tokenizer's
        ``model_max_length``) is an :class:`attnflow.OptionError` rather than a failing forward pass.
        ``targets`` (one per text) are the decoder's texts of an encoder-decoder, given as ``labels`` (the
        model shifts them right into its decoder inputs, as in training) with the matching
        ``decoder_attention_mask``.
        """
        encoded = self._encode_texts(tokenizer, texts, max_length)
        if targets is None:
            return encoded
        if isinstance(targets, str):
            targets = [targets]
        targets = list(targets)
        if len(targets) != len(encoded["input_ids"]):
            raise attnflow.OptionError(f"Got {len(targets)} target texts for {len(encoded['input_ids'])} texts.")
        decoded = tokenizer(text_target=targets, padding=True, truncation=max_length is not None,
                            max_length=max_length, return_tensors="pt")
        labels, mask = decoded["input_ids"], decoded["attention_mask"]
        # The decoder reads the start token then labels[:-1]: as many real positions as real labels (a text's
        # final label, its end of sequence, is predicted, never read), as when the text is encoded alone.
        return {**encoded, "labels": labels.masked_fill(mask == 0, -100), "decoder_attention_mask": mask}

    def encode_images(self, processor: Any, images: Sequence[Any]) -> dict[str, Any]:
        """``{"pixel_values": (batch, channels, height, width) tensor}`` of ``images`` (PIL images or
        ``(H, W, 3)`` arrays) through the model's image processor (what :meth:`load_model` returns for an
        image model). Refuses a processor that is a tokenizer, naming the fix."""
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or not images:
            raise attnflow.OptionError("encode_images() needs a non-empty list of images (PIL images or arrays).")
        if not callable(processor) or hasattr(processor, "convert_ids_to_tokens"):
            raise attnflow.OptionError(
                "encode_images() needs the model's image processor; this model loaded a tokenizer, so it takes text "
                "(use encode())."
            )
        try:
            encoded = processor(images=list(images), return_tensors="pt")
        except (TypeError, ValueError) as exc:
            raise attnflow.OptionError(f"The image processor cannot take these images: {exc}") from exc
        return {"pixel_values": encoded["pixel_values"]}

    def _encode_texts(self, tokenizer: Any, texts: Sequence[str], max_length: int | None) -> dict[str, Any]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise attnflow.OptionError("encode() needs at least one text.")
        if len(texts) > 1 and getattr(tokenizer, "pad_token", None) is None:
            eos = getattr(tokenizer, "eos_token", None)
            if eos is None:
                raise attnflow.AdapterError(
                    "The tokenizer has no padding token, so texts cannot be batched; encode them one at a time."
                )
            tokenizer.pad_token = eos  # the usual choice for decoder-only models; padding is masked out
        limit = _max_tokens(tokenizer)
        if max_length is None and limit is not None:
            for i, text in enumerate(texts):  # a long text is measured on a bounded prefix, never tokenised whole
                if _bounded_prefix(tokenizer, text, limit) is not text:
                    raise attnflow.OptionError(
                        f"Text {i} ({len(text):,} characters) is more than {limit} tokens long, the most the model "
                        f"takes. Shorten it, or pass max_length={limit} to explain only its first {limit} tokens "
                        f"(--max-length {limit})."
                    )
            lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
            if max(lengths) > limit:
                i = lengths.index(max(lengths))
                raise attnflow.OptionError(
                    f"Text {i} is {lengths[i]} tokens long, but the model takes at most {limit}. Shorten it, or pass "
                    f"max_length={limit} to explain only its first {limit} tokens (--max-length {limit})."
                )
        elif max_length is not None:
            texts = [_bounded_prefix(tokenizer, text, max_length) for text in texts]
        encoded = tokenizer(
            texts, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt"
        )
        return dict(encoded)

    # -- faithfulness (attnflow.faithfulness): blank-out and input gradients, in adapters/_torch/_faithfulness_torch.py
    captures = captures | {"input_gradients", "ablation"}

    def probe(self, model: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        from ._faithfulness_torch import probe

        return probe(model, request, args, kwargs)

    # -- placement (the command line's --device/--dtype; attnflow.cli imports no framework)
    def place(self, model: Any, inputs: Any, *, device: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
        """``(model, inputs)`` on torch ``device`` (``cpu``, ``cuda:1``, ``mps``...) and in ``dtype`` (a torch
        dtype name; floating inputs such as pixels are cast too). Either may be None (left as it is); with both
        None, checks only that ``device`` exists on this machine (the command line asks before loading)."""
        torch = attnflow.import_optional("torch", self.extra)
        if device is not None and device != "cpu":
            kind = device.split(":")[0]
            backend: Any = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None),
                       "xpu": getattr(torch, "xpu", None)}.get(kind)
            available = backend is not None and backend.is_available()
            if available and kind in ("cuda", "xpu") and ":" in device:
                available = int(device.split(":")[1]) < backend.device_count()
            if not available:
                raise attnflow.OptionError(f"--device {device}: this machine has no such device; use --device cpu.")
        cast = None if dtype is None else getattr(torch, dtype, None)
        if dtype is not None and not isinstance(cast, torch.dtype):
            raise attnflow.OptionError(f"--dtype {dtype!r} is not a torch dtype (float32, float16, bfloat16, float64).")
        if model is not None and (device is not None or cast is not None):
            model = model.to(**{k: v for k, v in (("device", device), ("dtype", cast)) if v is not None})
        if inputs is not None and (device is not None or cast is not None):
            moved = {}
            for key, value in inputs.items():
                if isinstance(value, torch.Tensor):
                    value = value.to(device) if device is not None else value
                    value = value.to(cast) if cast is not None and value.is_floating_point() else value
                moved[key] = value
            inputs = moved
        return model, inputs


class _CropsListener(_generation_torch.Listener):
    """The generate() listener, telling LLaVA-Next's anyres crops the call's ``image_sizes``: ``generate()`` encodes
    the images before its first forward call and hands that call no ``image_sizes``."""

    crops: _vision_language.Crops | None = None

    def before(self, call: _generation_torch.GenerateCall) -> None:
        super().before(call)
        if self.crops is not None and self.mode == "stitch":
            self.crops.start(call.kwargs.get("image_sizes"))


# -- helpers -------------------------------------------------------------------------------------------
class _Kept:
    """What the searches found in one module tree, by position in its walk (never the modules themselves: a module
    holding its model would keep the model alive through the cache); None: not searched yet."""

    __slots__ = ("tree", "swin", "reduced", "targets", "generic", "owners")

    def __init__(self, walk: tuple[tuple[str, Any], ...]):
        self.tree = tuple((path, weakref.ref(module), type(module)) for path, module in walk)
        self.swin: list[tuple[Any, ...]] | None = None
        self.reduced: list[tuple[Any, ...]] | None = None
        self.targets: list[tuple[Any, ...]] | None = None
        self.generic = False
        self.owners: list[tuple[int, int]] | None = None  # (attention module, the model reducing its mask)

    def fits(self, walk: tuple[tuple[str, Any], ...]) -> bool:
        return len(self.tree) == len(walk) and all(
            path == kept and ref() is module and type(module) is cls
            for (kept, ref, cls), (path, module) in zip(self.tree, walk)
        )


#: model -> what the searches found in its module tree as it was then (checked against the tree on every attach).
_KEPT: weakref.WeakKeyDictionary[Any, _Kept] = weakref.WeakKeyDictionary()


class _Shape:
    """A model's module tree at attach time, and what searching it finds: searched once per tree, not per attach.

    The searches (Swin blocks, SegFormer's reductions, the declared or the generic attention modules, the audio
    models that reduce a mask to frames) walk the whole tree several times, which costs more than a short forward
    pass's hooks. What they find is kept per model in a ``WeakKeyDictionary`` keyed by the model object: an entry
    goes when its model is freed, so a new model at the same address never finds an old entry (an ``id`` key
    could). Each attach walks the tree once (``named_modules(remove_duplicate=False)``: every path, also a module
    shared at a second path) and reuses the entry only if every module is the same object (a weak reference: a
    freed module never matches, not even one whose address a new module took), of the same class, at the same
    path: a module replaced, added, removed or shared anew, or a class swapped, is searched again. Besides the tree,
    the searches read class declarations (``_can_record_outputs``), the methods marking Swin blocks and audio
    models, and two module attributes set when a model is built and not meant to change: an attention module's
    ``is_cross_attention`` and SegFormer's ``sequence_reduction_ratio`` (setting either on a built model keeps
    the earlier search's answer until the tree changes). What can change between attaches (configs and their
    attention implementations, ``attention_type``, ``is_causal``, the family checks) is read on every attach."""

    def __init__(self, model: Any):
        self.model = model
        self.walk = tuple(model.named_modules(remove_duplicate=False))
        kept = _KEPT.get(model)  # (an unhashable module cannot be walked by named_modules above either)
        if kept is None or not kept.fits(self.walk):
            kept = _KEPT[model] = _Kept(self.walk)
        self.kept = kept
        self._positions: dict[str, int] | None = None

    def modules(self) -> list[Any]:
        """Every module once, in ``model.modules()``'s order."""
        return list({id(module): module for _, module in self.walk}.values())

    def swin(self) -> list[tuple[str, Any, str]]:
        found = self._found("swin", lambda: _swin.swin_blocks(self.model))
        return cast(list[tuple[str, Any, str]], found)

    def reduced(self) -> list[tuple[str, Any, int, int, int]]:
        found = self._found("reduced", lambda: _reduced.segformer_blocks(self.model))
        return cast(list[tuple[str, Any, int, int, int]], found)

    def targets(self, transformers: Any) -> tuple[list[tuple[str, Any, str, int]], bool]:
        """The declared attention modules (else the generic search's), before the family checks; and whether
        they come from the generic search."""

        def search() -> list[tuple[str, Any, str, int]]:
            declared = _declared_attention_modules(self.model, transformers)
            self.kept.generic = not declared
            return declared or _generic_attention_modules(self.model)

        found = self._found("targets", search)
        return cast(list[tuple[str, Any, str, int]], found), self.kept.generic

    def note_frame_owners(self, found: list[tuple[str, Any, str, int]]) -> None:
        """Note each found attention module's frame owner (:func:`_frame_owners`), again on every attach: another
        model sharing the module may have noted its own since."""
        if self.kept.owners is None:
            pairs = _frame_owners(self.model, found)
            positions = [(self._position(p, m), self._position(q, o)) for p, m, q, o in pairs]
            if any(i is None or j is None for i, j in positions):
                for _, module, _, owner in pairs:
                    _FRAME_OWNERS[module] = weakref.ref(owner)
                return
            self.kept.owners = cast(list[tuple[int, int]], positions)
        for module, owner in self.kept.owners:
            _FRAME_OWNERS[self.walk[module][1]] = weakref.ref(self.walk[owner][1])

    def _found(self, slot: str, search: Callable[[], list[Any]]) -> list[tuple[Any, ...]]:
        """``search()``'s ``(path, module, ...)`` items, or what it found in this tree before; kept as ``(position
        in the walk, ...)`` unless an item is not in the walk at its path (then the next attach searches again)."""
        kept = getattr(self.kept, slot)
        if kept is not None:
            return [(*self.walk[position], *rest) for position, *rest in kept]
        found = search()
        positions = [self._position(path, module) for path, module, *_ in found]
        if None not in positions:
            setattr(self.kept, slot, [(i, *rest) for i, (_, _, *rest) in zip(positions, found)])
        return found

    def _position(self, path: str, module: Any) -> int | None:
        if self._positions is None:
            self._positions = {p: i for i, (p, _) in enumerate(self.walk)}
        position = self._positions.get(path)
        return position if position is not None and self.walk[position][1] is module else None


def _declared_attention_modules(model: Any, transformers: Any) -> list[tuple[str, Any, str, int]]:
    """The modules whose outputs ``output_attentions=True`` would collect, found the way transformers'
    own output capturing does (each nested PreTrainedModel uses its own declaration)."""
    found: list[tuple[str, Any, str, int]] = []
    seen: set[int] = set()

    def walk(module: Any, path: str, specs: list[tuple[str, Any, str | None, str | None, int]]) -> None:
        for child_name, child in module.named_children():
            child_path = f"{path}.{child_name}" if path else child_name
            child_specs = _specs(child) if isinstance(child, transformers.PreTrainedModel) else specs
            walk(child, child_path, child_specs)
        dotted = "." + path
        for kind, target_class, class_name, layer_name, index in specs:
            hit = (target_class is not None and isinstance(module, target_class)) or (
                class_name is not None and dotted.endswith(class_name)
            )
            if hit and layer_name is not None:
                hit = "." + layer_name.strip(".") + "." in dotted + "."
            if hit and id(module) not in seen:
                seen.add(id(module))
                found.append((path, module, kind, index))

    walk(model, "", _specs(model))
    return found


def _specs(model: Any) -> list[tuple[str, Any, str | None, str | None, int]]:
    """``(kind, target_class, class_name, layer_name, index)`` from a model's ``_can_record_outputs``."""
    declared = getattr(model, "_can_record_outputs", None) or {}
    specs: list[tuple[str, Any, str | None, str | None, int]] = []
    for key, kind in _RECORDABLE:
        entries = declared.get(key)
        if entries is None:
            continue
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, str):
                specs.append((kind, None, entry, None, 1))
            elif isinstance(entry, type):
                specs.append((kind, entry, None, None, 1))
            else:  # transformers.utils.output_capturing.OutputRecorder
                specs.append((
                    kind, getattr(entry, "target_class", None), getattr(entry, "class_name", None),
                    getattr(entry, "layer_name", None), getattr(entry, "index", 1),
                ))
    return specs


def _configs(model: Any, transformers: Any, modules: list[Any]) -> list[Any]:
    """Every config the model's attention dispatch reads (sub-configs and nested models' configs); ``modules``: the
    model's modules (one walk of the tree serves the whole attach)."""
    configs: dict[int, Any] = {}
    pending = [model.config] + [
        m.config for m in modules if isinstance(m, transformers.PreTrainedModel) and hasattr(m, "config")
    ]
    while pending:
        config = pending.pop()
        if config is None or id(config) in configs:
            continue
        configs[id(config)] = config
        for key in getattr(config, "sub_configs", None) or {}:
            pending.append(getattr(config, key, None))
    return list(configs.values())


def _restore(saved: list[tuple[Any, Any]]) -> None:
    # Set each config's own value (not through the recursive setter): this is exactly the saved state.
    for config, implementation in saved:
        if config._attn_implementation != implementation:
            config._attn_implementation_internal = implementation


@contextmanager
def _eager(
    model: Any, targets: list[tuple[str, Any, str, int]], transformers: Any, modules: list[Any],
) -> Iterator[Any]:
    """The model on eager attention for the block; yields the implementation its config had before any
    attach. Each config's implementation is a reference-counted switch, so overlapping attaches on one
    model (or on a model and its base model) leave every config as the first of them found it. ``modules``: the
    model's modules."""
    # `again` closes `held` (again) when an exception (a signal handler's) arrives as the block is left, before
    # `held` is closed; both on one line, so that nothing can arrive between the two exits
    with ExitStack() as again, ExitStack() as held:
        again.callback(held.close)
        originals = {
            id(config): held.enter_context(switch(
                ("transformers.attn_implementation", id(config)),
                # misc ignored: mypy infers no type for a lambda whose default binds the loop's config
                lambda config=config: config._attn_implementation,  # type: ignore[misc]
                lambda implementation, config=config: _restore([(config, implementation)]),  # type: ignore[misc]
            ))
            for config in _configs(model, transformers, modules)
        }
        _switch_to_eager(model, targets, transformers, modules)
        yield originals[id(model.config)]


def _switch_to_eager(
    model: Any, targets: list[tuple[str, Any, str, int]], transformers: Any, modules: list[Any],
) -> None:
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation(_EAGER)
    except (ValueError, ImportError, KeyError) as exc:
        raise _hidden_error(model, before, f"set_attn_implementation('eager') failed: {exc}") from exc
    for config in _configs(model, transformers, modules):
        # some classes (Falcon) only log that they cannot switch; their attention reads the config at call time
        if config._attn_implementation != _EAGER:
            config._attn_implementation_internal = _EAGER
    for path, module, _, _ in targets:
        config = getattr(module, "config", None)
        implementation = getattr(config, "_attn_implementation", _EAGER) if config is not None else _EAGER
        if implementation != _EAGER:
            raise _hidden_error(
                model, implementation,
                f"module {path or type(module).__name__!r} still uses {implementation!r} after "
                "set_attn_implementation('eager') (its attention does not dispatch through transformers' "
                "AttentionInterface, so it cannot be switched)",
            )
    if model.config._attn_implementation != _EAGER:
        raise _hidden_error(
            model, model.config._attn_implementation,
            "transformers refused to switch it to 'eager' (its attention modules do not dispatch through "
            "transformers' AttentionInterface)",
        )


def _hidden_error(model: Any, implementation: Any, why: str) -> attnflow.HiddenAttentionError:
    return attnflow.HiddenAttentionError(
        f"{type(model).__name__} computes attention with {implementation!r}, which does not expose the attention "
        f"weights, and {why}. Load the model with eager attention, e.g. "
        "AutoModel.from_pretrained(path, attn_implementation='eager'); or, if its attention modules can return "
        "their weights, capture it with adapter='torch' and adapter_options={'modules': [...]}."
    )


def _no_weights_hint(model: Any, original: Any) -> str:
    """What to say when an attention module returns no weights although its config now says eager."""
    can_switch = getattr(model, "_can_set_attn_implementation", lambda: True)()
    if can_switch or original == _EAGER:
        return (
            "its forward returns no weights even under eager (attnflow runs the model on eager while attached, so "
            "loading it with eager changes nothing). Record the probabilities it computes instead (softmax-level "
            "capture): adapter='torch', adapter_options={'modules': [{modules!r}], 'layout': 'bhqk'}."
        )
    return (
        f"{type(model).__name__} was loaded with attn_implementation={original!r}, and transformers cannot switch it "
        "(its attention does not go through transformers' AttentionInterface); attnflow set its config to 'eager', "
        "but this module still computes attention without weights. Load the model with "
        "attn_implementation='eager' if the class supports it, or capture modules that return their weights with "
        "adapter='torch' and adapter_options={'modules': [...]}."
    )


def _layer_hook(
    path: str, module: Any, kind: str, index: int, passes: common.TorchPass, torch: Any, hint: str,
    crops: _vision_language.Crops | None = None,
) -> Any:
    # what the module is does not change while attached: looked up once per attach, not per call
    banded, scores, main_rows = _banded.is_banded(module), module in _SCORES, _MAIN_ROWS.get(module)

    def hook(module: Any, args: tuple, output: Any) -> None:
        if banded:
            weights = _banded.dense(path, module, output, _mask_length(passes, passes.stream_of(path)), torch)
        else:
            weights = _weights_at(output, index, torch)
            if scores and isinstance(weights, torch.Tensor):
                weights = torch.softmax(weights, dim=-1)  # the module returned its scores (ProphetNet)
                if main_rows is not None:
                    weights = weights[:, :, : weights.shape[2] // main_rows]  # the main stream's queries
        if weights is None:
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", "unknown")
            fix = hint.replace("{modules!r}", repr(re.sub(r"\.\d+(\.|$)", r".*\1", path)))
            if _qwen_vision.packs_windows(module):
                fix = (
                    "it splits packed images at cu_seqlens and returns only its output. For Qwen2-VL and Qwen2.5-VL, "
                    "leave out modules=: the transformers adapter then records such a vision tower window by window "
                    "itself; for another family, capture its language model alone, e.g. adapter_options={'modules': "
                    "['model.language_model.layers.*.self_attn']}."
                )
            raise attnflow.HiddenAttentionError(
                f"{path} ({type(module).__name__}) returned no attention weights under attn_implementation="
                f"{implementation!r}; {fix}"
            )
        if not isinstance(weights, torch.Tensor) or weights.ndim != 4:
            shape = tuple(weights.shape) if hasattr(weights, "shape") else type(weights).__name__
            raise attnflow.AdapterError(
                f"{path} ({type(module).__name__}) returned {shape} as its attention; expected (batch, heads, "
                "query, key). Pass adapter_options={'output_index': ...} if the weights sit elsewhere."
            )
        if crops is not None and passes.stream_of(path) == "vision" and not (passes.muted or passes.paused):
            weights = crops.group(path, weights, passes.request.gradients)  # LLaVA-Next: crops into images
        _fit_frame_mask(module, path, kind, int(weights.shape[-1]), passes, torch)
        if passes.stream_of(path) is None:
            if passes.state.single_length is None:  # an image's patch count, below
                passes.state.single_length = int(weights.shape[-1])
        recorded = passes.add(path, weights, kind=kind, training=module.training)
        if recorded >= 0:
            passes.state.indices.setdefault(path, []).append(recorded)

    return hook


#: Attention classes that return their scores (masked, before the softmax) as their "attention weights":
#: attnflow records the softmax of them, which is exactly what the module multiplies its values by.
_RETURNS_SCORES = frozenset({"ProphetNetAttention", "XLMProphetNetAttention"})
_SCORES: weakref.WeakSet[Any] = weakref.WeakSet()
#: ProphetNet's cross-attention runs the main stream's queries and the n-gram predict streams' queries together:
#: module -> how many streams its query rows hold (the main stream's come first).
_MAIN_ROWS: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _family_targets(model: Any, found: list[tuple[str, Any, str, int]]) -> list[tuple[str, Any, str, int]]:
    """The attention modules as found, adjusted for families whose attention is not one map per layer: n-gram
    self-attention (ProphetNet) is captured on its main stream (output 1: the main stream's tokens over the main
    stream's keys; the predict streams never feed it); block-sparse attention (BigBird) is refused."""
    adjusted = []
    for path, module, kind, index in found:
        name = type(module).__name__
        sparse = [type(m).__name__ for m in module.modules() if "BlockSparse" in type(m).__name__]
        if sparse or getattr(module, "attention_type", None) == "block_sparse":
            name = sparse[0] if sparse else name
            config = getattr(model, "config", None)
            block, random = getattr(config, "block_size", None), getattr(config, "num_random_blocks", None)
            full = "" if block is None or random is None else (
                f" (BigBird itself runs full attention on sequences of at most {(5 + 2 * random) * block} tokens)"
            )
            raise attnflow.AdapterError(
                f"{type(model).__name__} runs block-sparse attention ({path} is {name}, attention_type="
                f"'block_sparse'): each query attends to blocks of keys (its window, global and random blocks), and "
                "the dense probabilities transformers returns for it leave the random blocks' share out (rows sum to "
                "0.8-1.0), so attnflow cannot reconstruct them exactly. Capture it with full attention: load it with "
                f"attention_type=\"original_full\" (from_pretrained(path, attention_type=\"original_full\")){full}."
            )
        ratio = _reduced.ratio_of(module)
        if ratio > 1:
            own = [other for other, m, _, _ in found if _reduced.ratio_of(m) == 1]
            fix = (
                "Capture the layers whose keys are their own tokens (reduction 1) alone: adapter_options={'modules': "
                f"{own!r}}}" if own else "No layer of this model attends over its own tokens"
            )
            raise attnflow.AdapterError(
                f"{type(model).__name__} runs spatial-reduction attention ({path} reduces its keys by {ratio}): its patch "
                f"queries attend to keys pooled over {ratio}x{ratio} patches by a strided convolution, so its keys "
                "are not its tokens, and attnflow links pooled keys to their patches only for SegFormer's layout "
                f"(stages.<i>.blocks.<j>.attention, found without modules=). {fix}."
            )
        if "Ngram" in name and index == -1:
            index = 1  # (output, main stream probabilities, predict streams' probabilities)
        if name in _RETURNS_SCORES:
            _SCORES.add(module)
            ngram = getattr(getattr(model, "config", None), "ngram", None)
            if kind == "cross" and isinstance(ngram, int) and ngram > 0:
                _MAIN_ROWS[module] = ngram + 1  # its queries are the main stream then each predict stream
        adjusted.append((path, module, kind, index))
    return adjusted


#: Attention module -> the model that maps its input samples onto the module's positions (audio models with a
#: convolutional feature extractor: Wav2Vec2, HuBERT, WavLM, Data2VecAudio, SEW, UniSpeech...).
_FRAME_OWNERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _frame_owners(model: Any, found: list[tuple[str, Any, str, int]]) -> list[tuple[str, Any, str, Any]]:
    """``(path, module, owner's path, owner)``: for each attention module found, the innermost model on its path
    that reduces a per-sample ``attention_mask`` to its frames (``_get_feature_vector_attention_mask``), for
    :func:`_fit_frame_mask`; modules without one are left out."""
    modules = dict(model.named_modules())
    owners = []
    for path, module, _, _ in found:
        parts = path.split(".")
        for end in range(len(parts), -1, -1):
            prefix = ".".join(parts[:end])
            owner = modules.get(prefix)
            if callable(getattr(owner, "_get_feature_vector_attention_mask", None)):
                owners.append((path, module, prefix, owner))
                break
    return owners


def _fit_frame_mask(module: Any, path: str, kind: str, keys: int, passes: common.TorchPass, torch: Any) -> None:
    """Where a stream's ``attention_mask`` is per input sample but its attention runs over frames, describe the
    frame mask the model itself derives (``_get_feature_vector_attention_mask``, the convolutional feature
    extractor's output lengths), once per stream and pass. Without such a model the recorder refuses the mask."""
    if kind == "cross":
        return
    stream = passes.stream_of(path)
    done = passes.state.frame_masks
    if stream in done:
        return
    if stream is None:
        mask = (passes.state.target_tokens or (None, None))[0]
    else:
        mask = passes.state.stream_masks.get(stream)
    reference = _FRAME_OWNERS.get(module)
    owner = reference() if reference is not None else None
    if mask is None or mask.ndim != 2 or mask.shape[1] == keys or owner is None:
        return
    derive = owner._get_feature_vector_attention_mask
    given = torch.as_tensor(np.asarray(mask, dtype=np.int64))
    with torch.no_grad():
        if "add_adapter" in inspect.signature(derive).parameters:
            frames = derive(keys, given, add_adapter=False)  # the adapter runs after the encoder, as in forward
        else:
            frames = derive(keys, given)
    derived = frames.detach().cpu().numpy().astype(bool)
    done.add(stream)
    passes.recorder.describe_stream(stream, mask=derived, overwrite=True)
    if stream is None:
        passes.state.target_tokens = (derived, (passes.state.target_tokens or (None, None))[1])


def _weights_at(output: Any, index: int, torch: Any) -> Any:
    """The weights a module returned at ``index``; for the generic search (index -1, "last"), the last 4-D tensor
    where the last element is something else (LED's decoder returns its cache after the weights)."""
    if not isinstance(output, (tuple, list)) or not -len(output) <= index < len(output):
        return None
    weights = output[index]
    if index == -1 and weights is not None and not isinstance(weights, torch.Tensor):
        tensors = [item for item in output[1:] if isinstance(item, torch.Tensor) and item.ndim == 4]
        return tensors[-1] if tensors else weights
    return weights


def _mask_length(passes: common.TorchPass, stream: str | None) -> int | None:
    """How many positions the stream's padding mask (the call's, or its tower's) covers; None without one."""
    if stream is None:
        mask = (passes.state.target_tokens or (None, None))[0]
    else:
        mask = passes.state.stream_masks.get(stream)
    return None if mask is None or np.ndim(mask) != 2 else int(np.shape(mask)[1])


def _kind_of(path: str, module: Any) -> str:
    return "cross" if getattr(module, "is_cross_attention", False) or families.is_cross_path(path) else "self"


def _generic_attention_modules(model: Any) -> list[tuple[str, Any, str, int]]:
    """For classes that declare no attention outputs: the innermost modules whose class name says they
    compute attention; each returns its probabilities last in its output tuple (checked on every call)."""
    candidates = {
        path: module for path, module in model.named_modules()
        if path and any(word in type(module).__name__ for word in ("Attention", "Attn"))
    }
    inner = [
        (path, module) for path, module in candidates.items()
        if not any(other.startswith(path + ".") for other in candidates)
    ]
    return [(path, module, _kind_of(path, module), -1) for path, module in inner]


def _causal_streams(targets: list[tuple[str, Any, str, int]], plan: families.StreamPlan) -> dict[str | None, bool]:
    """Per stream: True when every self-attention module of it says ``is_causal`` (else causality is
    detected from the weights, which catches models causal through their mask, such as CLIP's text tower)."""
    flags: dict[str | None, set] = {}
    for path, module, kind, _ in targets:
        if kind == "self":
            flags.setdefault(plan.streams.get(path), set()).add(getattr(module, "is_causal", None) is True)
    return {stream: found == {True} for stream, found in flags.items()}


#: The fields ``output_attentions=True`` adds to a model's output.
_ATTENTION_FIELDS = ("attentions", "cross_attentions", "encoder_attentions", "decoder_attentions")


def _without_attentions(output: Any, torch: Any) -> Any:
    """The output the caller would have had without attnflow's ``output_attentions=True``: a new object of the
    same class without the attention fields (a ``ModelOutput`` keeps a key set to None, so it is rebuilt), or the
    tuple without its tuples of attention maps (``return_dict=False``); None: ``output`` is left as it is."""
    if isinstance(output, dict) and any(output.get(key) is not None for key in _ATTENTION_FIELDS):
        kept = {key: value for key, value in output.items() if key not in _ATTENTION_FIELDS}
        try:
            return type(output)(**kept)
        except TypeError:  # a class that cannot be rebuilt from its fields: drop them in place
            base = collections.OrderedDict if isinstance(output, collections.OrderedDict) else dict
            for key in _ATTENTION_FIELDS:
                if key in output:
                    base.__delitem__(output, key)
                    object.__setattr__(output, key, None)
            return None
    if isinstance(output, tuple) and not hasattr(output, "_fields"):

        def maps(item: Any) -> bool:
            return isinstance(item, (tuple, list)) and len(item) > 0 and all(
                isinstance(t, torch.Tensor) and t.ndim == 4 for t in item)

        if any(maps(item) for item in output):
            return tuple(item for item in output if not maps(item))
    return None


def _generated_streams(model: Any, plan: families.StreamPlan, causal: dict[str | None, bool]) -> tuple[Any, Any]:
    """``(generated stream, encoder stream)`` of ``generate()``: the decoder and encoder of an encoder-decoder,
    else the causal stream of a multi-stream model (LLaVA's text), else the only stream (None, None)."""
    model_type = getattr(model.config, "model_type", None)
    if getattr(model.config, "is_encoder_decoder", False) and plan.multi:
        towers = families.towers_for(model_type)
        return towers["decoder"], towers["encoder"]
    if plan.multi:
        return next((s for s, flag in causal.items() if s is not None and flag), None), None
    return None, None


def _mask_array(mask: Any, torch: Any) -> Any:
    return mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None


def _tower_hook(stream: str, signature: inspect.Signature | None, passes: common.TorchPass, torch: Any) -> Any:
    """A tower's forward pre-hook: the stream's token ids and padding mask, and the pixel input's shape."""

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        if not passes.active:
            return
        named = _bind(signature, args, kwargs)
        mask = _mask_array(named.get("attention_mask"), torch)
        passes.state.stream_masks[stream] = mask
        passes.recorder.describe_stream(stream, input_ids=common.int_ids(named.get("input_ids"), torch), mask=mask)
        if stream == "decoder":  # an encoder-decoder's logits are the decoder's
            passes.state.target_tokens = (mask, True)
        pixels = named.get("pixel_values")
        if isinstance(pixels, torch.Tensor):
            passes.state.pixels[stream] = (tuple(pixels.shape), module)

    return hook


def _finish_streams(
    passes: common.TorchPass, model: Any, plan: families.StreamPlan, towers: dict[str, Any],
    crops: _vision_language.Crops | None = None,
) -> None:
    """What is known only once every layer ran: vision streams' patch grids (LLaVA-Next's crops: their labels),
    the root's ids for a stream that got embeddings (LLaVA's language model), and LLaVA-style links from image
    tokens to patches."""
    recorder = passes.recorder
    root = passes.state.root or {}
    for stream, length in passes.seen.items():
        if crops is not None and stream == "vision" and stream in passes.state.pixels:
            crops.describe(passes, passes.state.pixels[stream][1])
        elif stream in passes.state.pixels:
            shape, tower = passes.state.pixels[stream]
            config = getattr(tower, "config", None) or getattr(model.config, "vision_config", None)
            layout = families.vision_layout(length, shape, getattr(config, "patch_size", None))
            if layout is not None:
                special, grid = layout
                recorder.describe_stream(stream, special=np.broadcast_to(special, (shape[0], length)), grid=grid)
        ids = root.get("input_ids")
        if ids is not None and ids.shape[1] == length and stream != "vision":
            recorder.describe_stream(stream, input_ids=ids, mask=root.get("mask"))
    _link_image_tokens(passes, model, root.get("input_ids"))


def _finish_single_vision(passes: common.TorchPass, model: Any) -> None:
    """A plain ViT-family model (one stream, pixel inputs): its prefix tokens (CLS, distillation, registers)
    are special, the rest is the patch grid; labels ``[CLS]``, ``[PREFIX1]``... and ``r{row}c{col}``."""
    shape, length = passes.state.single_pixels, passes.state.single_length
    if shape is None or length is None:
        return
    layout = families.vision_layout(length, shape, getattr(model.config, "patch_size", None))
    if layout is None:
        return
    special, (rows, cols) = layout
    prefix = int(special.sum())
    labels = ["[CLS]" if i == 0 else f"[PREFIX{i}]" for i in range(prefix)]
    labels += [f"r{r}c{c}" for r in range(rows) for c in range(cols)]
    passes.recorder.describe_stream(
        None, special=np.broadcast_to(special, (shape[0], length)), grid=(rows, cols), tokens=[labels] * shape[0],
    )


def is_image_model(config: Any) -> bool:
    """A ViT-family config: image and patch sizes and no text vocabulary (CLIP-like pairs are not)."""
    return (getattr(config, "image_size", None) is not None and getattr(config, "patch_size", None) is not None
            and getattr(config, "vocab_size", None) is None)


def _link_image_tokens(passes: common.TorchPass, model: Any, input_ids: Any) -> None:
    """Vision-language models: the vision patches feeding each image token, as a link (see
    :mod:`attnflow.adapters._torch._vision_language`)."""
    _vision_language.link_image_tokens(passes, model, input_ids)


def _takes(signature: inspect.Signature | None, name: str) -> bool:
    if signature is None:
        return False
    return name in signature.parameters or any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


def _signature(model: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _bind(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (positional ones included)."""
    if signature is None:
        return dict(kwargs)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    named = dict(bound.arguments)
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            named.update(named.pop(param.name, {}) or {})
    return named


def _max_tokens(tokenizer: Any) -> int | None:
    """The most tokens the tokenizer says its model takes, or None (transformers uses a huge number for unset)."""
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def _offline() -> bool:
    if any(os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE") for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.is_offline_mode()) if hasattr(constants, "is_offline_mode") else bool(constants.HF_HUB_OFFLINE)


#: The files of a model directory that can map classes onto the directory's own Python code (``auto_map``).
_CODE_MAPS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def _refuse_remote_code(location: str, path: Path | None, cause: Exception | None = None) -> None:
    """Refuse a model whose config (or tokenizer/processor config) has ``auto_map``, whatever its
    ``model_type``: transformers would load its built-in class for a known type, but the directory asks for
    its own code, and attnflow runs none unless ``trust_remote_code=True``. ``path``: a local directory,
    whose files are read as plain JSON before anything loads (None: ``cause`` or the config said so)."""
    found = []
    for name in _CODE_MAPS if path is not None else ():
        try:
            document = json.loads((cast(Path, path) / name).read_text(encoding="utf-8"))  # the loop runs with a path
        except (OSError, ValueError):
            continue  # missing or unreadable: transformers reports it
        if isinstance(document, dict) and document.get("auto_map"):
            found.append(name)
    if path is not None and not found:
        return
    where = f" ({', '.join(found)})" if found else ""
    raise attnflow.AdapterError(
        f"{location!r} contains its own Python code for the model (auto_map in its config{where}), and attnflow "
        "does not run a model directory's code unless asked to, even where transformers has a built-in class for "
        "its model_type. If you trust it, pass trust_remote_code=True (attnflow explain/batch/evaluate "
        "--trust-remote-code), which runs that code with your permissions."
    ) from cause


#: Characters per token a long text's first measured prefix allows (generous: most tokens are far shorter).
_CHARS_PER_TOKEN = 16
_WHITESPACE = re.compile(r"\s")


def _bounded_prefix(tokenizer: Any, text: str, tokens: int) -> str:
    """``text`` itself, or a prefix of it ending before a whitespace that tokenises to more than ``tokens`` + 2
    tokens: truncating either to ``tokens`` gives the same ids (the words before the cut tokenise as in the whole
    text), so a 10 MB line costs a tokenisation of a few times the needed characters, not of the whole line."""
    chars = tokens * _CHARS_PER_TOKEN + 256
    while chars < len(text):
        cut = max((m.start() for m in _WHITESPACE.finditer(text, chars // 2, chars)), default=-1)
        if cut > 0 and len(tokenizer(text[:cut])["input_ids"]) > tokens + 2:
            return text[:cut]
        chars *= 4
    return text
