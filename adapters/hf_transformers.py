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

import inspect
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attnflow
from attnflow._switches import deferred_interrupts, switch

from . import _torch_common as common

_EAGER = "eager"
_OPTIONS = ("modules", "output_index")
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

    def claims(self, model: Any) -> bool:
        transformers = attnflow.import_optional("transformers", self.extra)
        return isinstance(model, transformers.PreTrainedModel)

    def model_name(self, model: Any) -> str:
        name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
        if not name or os.path.exists(name):  # a local directory says little; the class says more
            return type(model).__name__
        return name

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        return common.run_without_grad(model, args, kwargs)

    # -- capture ------------------------------------------------------------------------------------
    @contextmanager
    def hooks(
        self, model: Any, recorder: attnflow.Recorder, *, modules: Any = None, output_index: int = 1,
        **unknown: Any,
    ) -> Iterator[None]:
        torch = attnflow.import_optional("torch", self.extra)
        transformers = attnflow.import_optional("transformers", self.extra)
        common.check_unknown_options(self.name, unknown, _OPTIONS)
        if not isinstance(model, transformers.PreTrainedModel):
            raise attnflow.AdapterError(
                f"Adapter 'transformers' captures transformers.PreTrainedModel models; got "
                f"{type(model).__module__}.{type(model).__qualname__}. Try adapter='torch'."
            )
        if not isinstance(output_index, int) or isinstance(output_index, bool):
            raise attnflow.OptionError(f"Adapter 'transformers': output_index must be an int, got {output_index!r}.")
        targets = self._targets(model, transformers, torch, modules, output_index)
        passes = common.PassRecorder(recorder)
        self_modules = [module for _, module, kind, _ in targets if kind == "self"]
        causal_flags = {getattr(module, "is_causal", None) for module in self_modules}
        causal = causal_flags.pop() if len(causal_flags) == 1 and None not in causal_flags else None
        signature = _signature(model)

        def describe_call(args: tuple, kwargs: dict) -> dict[str, Any]:
            named = _bind(signature, args, kwargs)
            mask = named.get("attention_mask")
            mask_array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
            return {
                "mask": mask_array,
                "input_ids": common.int_ids(named.get("input_ids"), torch),
                "causal": causal,
                "metadata": {"attn_implementation": str(original), "captured_with": _EAGER},
            }

        handles: list[Any] = []
        with _eager(model, targets, transformers) as original, common.removing(handles):
            with deferred_interrupts():
                common.install_root_hooks(model, passes, describe_call, handles)
                for path, module, kind, index in targets:
                    handles.append(module.register_forward_hook(_layer_hook(path, kind, index, passes, torch)))
                common.install_root_end_hooks(model, passes, handles)
            yield

    def _targets(
        self, model: Any, transformers: Any, torch: Any, modules: Any, output_index: int
    ) -> list[tuple[str, Any, str, int]]:
        """``(path, module, kind, output index)`` of every attention module to hook."""
        if modules is not None:
            match = common.selector_matcher(self.name, modules, torch)
            found = [
                (path, m, "cross" if getattr(m, "is_cross_attention", False) else "self", output_index)
                for path, m in model.named_modules()
                if match(path, m)
            ]
            if not found:
                raise common.no_match_error(self.name, model, modules)
            return found
        found = _declared_attention_modules(model, transformers)
        if not found:
            raise attnflow.AdapterError(
                f"{type(model).__name__} declares no attention outputs (its class has no "
                "_can_record_outputs['attentions']), so the transformers adapter cannot tell which modules compute "
                "attention. Name them: adapter_options={'modules': ['encoder.layer.*.attention.self']} (they must "
                "return (output, weights)), or use adapter='torch' with the same option."
            )
        return found

    # -- loading ------------------------------------------------------------------------------------
    def load_model(self, location: str, *, trust_remote_code: bool = False) -> tuple[Any, Any]:
        """``(model, tokenizer)`` from a local model directory, or from a hub id where there is network.

        The model is loaded as ``AutoModel.from_pretrained`` leaves it (SDPA, eval mode). A model whose
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
        try:
            model = transformers.AutoModel.from_pretrained(source, **kwargs, **trust)
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs, **trust)
        except Exception as exc:  # safetensors, unpickling and model-class errors too: all mean "cannot load"
            if not trust_remote_code and "trust_remote_code" in str(exc):
                raise attnflow.AdapterError(
                    f"{location!r} contains its own Python code for the model (auto_map in its config), and "
                    "attnflow does not run a model directory's code unless asked to. If you trust it, pass "
                    "trust_remote_code=True (attnflow explain/batch --trust-remote-code), which runs that code "
                    "with your permissions."
                ) from exc
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
        limit = getattr(model.config, "max_position_embeddings", None)
        if _max_tokens(tokenizer) is None and isinstance(limit, int) and limit > 0:
            tokenizer.model_max_length = limit  # the tokenizer does not say; the model's positions do
        return model, tokenizer

    def encode(self, tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None) -> dict[str, Any]:
        """Tokenise ``texts`` into a padded batch of torch tensors (``input_ids``, ``attention_mask``...).

        ``max_length`` truncates; without it, a text longer than the model takes (the tokenizer's
        ``model_max_length``) is an :class:`attnflow.OptionError` rather than a failing forward pass.
        """
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
            lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
            if max(lengths) > limit:
                i = lengths.index(max(lengths))
                raise attnflow.OptionError(
                    f"Text {i} is {lengths[i]} tokens long, but the model takes at most {limit}. Shorten it, or pass "
                    f"max_length={limit} to explain only its first {limit} tokens (--max-length {limit})."
                )
        encoded = tokenizer(
            texts, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt"
        )
        return dict(encoded)


# -- helpers -------------------------------------------------------------------------------------------
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
    specs = []
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


def _implementations(model: Any, transformers: Any) -> list[tuple[Any, Any]]:
    """Every config the model's attention dispatch reads (sub-configs and nested models' configs), with
    its current implementation, to put back on exit."""
    configs: dict[int, Any] = {}
    pending = [model.config] + [
        m.config for m in model.modules() if isinstance(m, transformers.PreTrainedModel) and hasattr(m, "config")
    ]
    while pending:
        config = pending.pop()
        if config is None or id(config) in configs:
            continue
        configs[id(config)] = config
        for key in getattr(config, "sub_configs", None) or {}:
            pending.append(getattr(config, key, None))
    return [(config, config._attn_implementation) for config in configs.values()]


def _restore(saved: list[tuple[Any, Any]]) -> None:
    # Set each config's own value (not through the recursive setter): this is exactly the saved state.
    for config, implementation in saved:
        if config._attn_implementation != implementation:
            config._attn_implementation_internal = implementation


@contextmanager
def _eager(model: Any, targets: list[tuple[str, Any, str, int]], transformers: Any) -> Iterator[Any]:
    """The model on eager attention for the block; yields the implementation its config had before any
    attach. Each config's implementation is a reference-counted switch, so overlapping attaches on one
    model (or on a model and its base model) leave every config as the first of them found it."""
    with ExitStack() as held:
        originals = {
            id(config): held.enter_context(switch(
                ("transformers.attn_implementation", id(config)),
                lambda config=config: config._attn_implementation,
                lambda implementation, config=config: _restore([(config, implementation)]),
            ))
            for config, _ in _implementations(model, transformers)
        }
        _switch_to_eager(model, targets, transformers)
        yield originals[id(model.config)]


def _switch_to_eager(model: Any, targets: list[tuple[str, Any, str, int]], transformers: Any) -> None:
    before = model.config._attn_implementation
    try:
        model.set_attn_implementation(_EAGER)
    except (ValueError, ImportError, KeyError) as exc:
        raise _hidden_error(model, before, f"set_attn_implementation('eager') failed: {exc}") from exc
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


def _layer_hook(path: str, kind: str, index: int, passes: common.PassRecorder, torch: Any) -> Any:
    def hook(module: Any, args: tuple, output: Any) -> None:
        weights = output[index] if isinstance(output, (tuple, list)) and len(output) > index else None
        if weights is None:
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", "unknown")
            raise attnflow.HiddenAttentionError(
                f"{path} ({type(module).__name__}) returned no attention weights under attn_implementation="
                f"{implementation!r}; its attention hides them. Load the model with "
                "attn_implementation='eager', or capture modules that return their weights with adapter='torch'."
            )
        if not isinstance(weights, torch.Tensor) or weights.ndim != 4:
            shape = tuple(weights.shape) if hasattr(weights, "shape") else type(weights).__name__
            raise attnflow.AdapterError(
                f"{path} ({type(module).__name__}) returned {shape} as its attention; expected (batch, heads, "
                "query, key). Pass adapter_options={'output_index': ...} if the weights sit elsewhere."
            )
        array, source_dtype = common.to_numpy(weights)
        passes.add(path, array, kind=kind, source_dtype=source_dtype, training=module.training)

    return hook


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
