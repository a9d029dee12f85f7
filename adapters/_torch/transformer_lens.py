"""TransformerLens: ``HookedTransformer`` captured through its own hook points, with no options.

Each block's ``attn.hook_pattern`` outputs the pattern the block attends with, ``(batch, heads, query, key)``:
the adapter records it with a forward hook (a plain PyTorch hook, so TransformerLens' own ``add_hook``,
``run_with_cache`` and ``reset_hooks`` neither see nor remove it) as layer ``blocks.{l}.attn``. The trace is
what ``model.run_with_cache(...)`` holds as ``cache["pattern", l]``.

* **Tokens** come from the embedding's input, whatever the model was given (token ids, or text it tokenised
  itself); ``tokens=model.tokenizer`` labels them.
* **Padding** is the ``attention_mask`` the attention blocks receive: the one passed to the model, or the one
  TransformerLens derives itself (left padding, ``padding_side="left"``); with none, every token is real.
* **Causality** is the model's ``cfg.attention_dir``.

``model.generate(...)`` inside ``attach`` runs unrecorded (its cached steps attend from the new tokens only,
and it calls ``forward`` past the module's hooks); once it returns token ids, one forward pass over the
finished sequences but their last token is captured: the trace of the whole generation, as
``generation="rerun"`` does for Hugging Face models (metadata ``"generation"`` says where the new tokens begin).
A generation returning text is not recorded (a warning says so; pass token ids). A forward pass given a
``past_kv_cache`` directly is refused before it runs.

Given ``modules=`` (and ``layout=``), the model is captured by the generic ``torch`` adapter instead, which takes
those options. transformer_lens and torch are imported inside methods only.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attnflow
from attnflow.recording import deferred_interrupts, switch

from . import _torch_common as common


class TransformerLensAdapter(attnflow.Adapter):
    """TransformerLens ``HookedTransformer`` models, through ``blocks.{l}.attn.hook_pattern``."""

    name = "transformer_lens"
    framework = "transformer_lens"
    array_library = "torch"
    extra = "interop"
    priority = 20
    # The torch adapter's options: given, they hand the model to it (e.g. modules=[...hook_pattern]).
    options = (
        attnflow.AdapterOption("modules", None, None, "hand the model to the torch adapter with these modules"),
        attnflow.AdapterOption("output_index", int, 1, "torch adapter: where selected modules return weights"),
        attnflow.AdapterOption("layout", str, None, "torch adapter: record the softmax selected modules compute"),
    )
    captures = frozenset({"weights", "attn_grad"})

    def claims(self, model: Any) -> bool:
        return _hooked_transformer(common.unwrap(model)) is not None

    def model_name(self, model: Any) -> str:
        model = common.unwrap(model)
        return str(getattr(getattr(model, "cfg", None), "model_name", "") or type(model).__name__)

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        return common.run_without_grad(common.unwrap(model), args, kwargs)

    @contextmanager
    def hooks(self, model: Any, recorder: attnflow.Recorder, **options: Any) -> Iterator[None]:
        torch = attnflow.import_optional("torch", "torch")
        model = common.unwrap(model)
        if _hooked_transformer(model) is None:
            raise attnflow.AdapterError(
                f"Adapter 'transformer_lens' captures transformer_lens.HookedTransformer models; got "
                f"{type(model).__module__}.{type(model).__qualname__}. Try adapter='torch' with modules=[...]."
            )
        if options:
            if options.get("modules") is None:
                raise attnflow.OptionError(
                    f"Adapter 'transformer_lens' needs no options; {sorted(options)} are the torch adapter's, used "
                    "with modules= (e.g. modules=['blocks.*.attn.hook_pattern'])."
                )
            from .torch_hooks import TorchAdapter

            with TorchAdapter().hooks(model, recorder, **options):
                yield
            return
        cfg = model.cfg
        if getattr(cfg, "use_attention_sinks", False):
            raise attnflow.AdapterError(
                f"{type(model).__name__} uses attention sinks (cfg.use_attention_sinks): its pattern rows put part of "
                "their weight on a learned sink and sum to less than 1 over the tokens, which attention rollout and "
                "flow cannot route. Capture a model without sinks, or record the scores with run_with_cache."
            )
        causal = getattr(cfg, "attention_dir", "causal") == "causal"
        passes = common.TorchPass(recorder)

        generation: dict[str, Any] = {}  # what the generate() wrapper tells the re-run pass

        def describe_call(args: tuple, kwargs: dict) -> dict[str, Any]:
            if kwargs.get("past_kv_cache") is not None:
                raise attnflow.AdapterError(
                    "TransformerLens was called with past_kv_cache: the pattern attends from the new tokens only, "
                    "which is not a trace of the sequence. Call model.generate(...) inside attach (it captures one "
                    "pass over the generated sequence), or run one forward pass over the whole sequence."
                )
            first = kwargs.get("input", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            mask = mask.detach().cpu().numpy().astype(bool) if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
            passes.state.target_tokens = (mask, causal)  # target=: each item's last real token
            metadata = {"generation": generation.pop("metadata")} if "metadata" in generation else {}
            return {"input_ids": _ids(first, torch), "causal": causal, "metadata": metadata}

        def embed_hook(module: Any, args: tuple, kwargs: dict) -> None:
            if passes.active and not passes.paused:
                tokens = kwargs.get("tokens", args[0] if args else None)
                passes.recorder.describe_stream(None, input_ids=_ids(tokens, torch), overwrite=True)

        def mask_hook(module: Any, args: tuple, kwargs: dict) -> None:
            mask = kwargs.get("attention_mask")
            if passes.active and not passes.paused and isinstance(mask, torch.Tensor) and mask.ndim == 2:
                real = mask.detach().cpu().numpy().astype(bool)
                passes.recorder.describe_stream(None, mask=real)
                passes.state.target_tokens = (real, causal)

        handles: list[Any] = []
        with common.removing(handles):
            with deferred_interrupts():
                for index, block in enumerate(model.blocks):
                    name = f"blocks.{index}.attn"
                    common.register(handles, block.attn.hook_pattern.register_forward_hook, _pattern_hook(name, passes))
                    if index == 0:
                        common.register(handles, block.attn.register_forward_pre_hook, mask_hook, with_kwargs=True)
                if hasattr(model, "embed"):
                    common.register(handles, model.embed.register_forward_pre_hook, embed_hook, with_kwargs=True)
                common.install_pass_hooks(model, passes, describe_call, handles)
            with _listening(model, (passes, generation)):
                yield


def _hooked_transformer(model: Any) -> Any:
    """``transformer_lens.HookedTransformer`` if ``model`` is one (transformer_lens already imported), else None."""
    import sys

    lens = sys.modules.get("transformer_lens")
    cls = getattr(lens, "HookedTransformer", None) if lens is not None else None
    return cls if cls is not None and isinstance(model, cls) else None


def _pattern_hook(name: str, passes: common.TorchPass) -> Any:
    def hook(module: Any, args: tuple, output: Any) -> None:
        passes.add(name, output, kind="self", training=module.training, name=name)

    return hook


def _ids(value: Any, torch: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        value = value[None]
    return common.int_ids(value, torch)


# -- generate() -----------------------------------------------------------------------------------------------------
_lock = threading.Lock()
_listeners: dict[int, list[tuple[common.TorchPass, dict[str, Any]]]] = {}


@contextmanager
def _listening(model: Any, listener: tuple[common.TorchPass, dict[str, Any]]) -> Iterator[None]:
    """While attached, ``model.generate`` is an instance attribute wrapping the class's (one wrapper shared by
    overlapping attaches; removed when the last leaves) that tells every attach of the model."""
    with deferred_interrupts():
        with _lock:
            _listeners.setdefault(id(model), []).append(listener)
        try:
            wrapping = switch(("attnflow.transformer_lens.generate", id(model)), lambda: _wrap(model), _unwrap)
            wrapping.__enter__()
        except BaseException:
            _forget(model, listener)
            raise
    try:
        yield
    finally:
        with deferred_interrupts():
            try:
                wrapping.__exit__(None, None, None)
            finally:
                _forget(model, listener)


def _forget(model: Any, listener: Any) -> None:
    with _lock:
        listeners = _listeners.get(id(model), [])
        if listener in listeners:
            listeners.remove(listener)
        if not listeners:
            _listeners.pop(id(model), None)


def _wrap(model: Any) -> tuple[Any, bool, Any]:
    own = "generate" in vars(model)
    previous = vars(model).get("generate")
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            listeners = list(_listeners.get(id(model), []))
        for passes, _ in listeners:
            passes.muted += 1
        try:
            output = original(*args, **kwargs)
        finally:
            for passes, _ in listeners:
                passes.muted -= 1
        _rerun(model, listeners, args, kwargs, output)
        return output

    vars(model)["generate"] = generate
    return model, own, previous


def _unwrap(state: tuple[Any, bool, Any]) -> None:
    model, own, previous = state
    if own:
        vars(model)["generate"] = previous
    else:
        vars(model).pop("generate", None)


def _rerun(model: Any, listeners: list, args: tuple, kwargs: dict, output: Any) -> None:
    """One recorded forward pass over the generated sequences but their last token."""
    torch = attnflow.import_optional("torch", "torch")
    ids = _ids(output, torch)
    if ids is None:
        warnings.warn(
            "attnflow: TransformerLens generate() returned text, so no pass over the generated tokens was recorded; "
            "pass token ids (model.to_tokens(text)) to generate() inside attach.", RuntimeWarning, stacklevel=3,
        )
        return
    prompt = kwargs.get("input", args[0] if args else None)
    first = int(prompt.shape[-1]) if isinstance(prompt, torch.Tensor) else None
    sequences = output if output.ndim == 2 else output[None]
    for _, generation in listeners:
        generation["metadata"] = {"mode": "rerun", "stream": "tokens", "first_generated": first,
                                  "new_tokens": None if first is None else int(sequences.shape[-1]) - first}
    with torch.no_grad():
        model(sequences[:, :-1])
