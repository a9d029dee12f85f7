"""attnflow's built-in adapters, installed as ``attnflow.adapters``.

Grouped by framework: ``attnflow.adapters._torch`` (PyTorch: plain modules, transformers, timm, TransformerLens,
nnsight, and what their methods share) and ``attnflow.adapters._jax`` (JAX: Flax linen and NNX, penzai, gemma,
flaxmodels). Each adapter is registered through the ``attnflow.adapters`` entry-point group in attnflow's
pyproject, exactly as a third-party adapter would be, and imports its framework lazily, inside methods.

Public here: the family path maps that value-side methods read (``ValueMap`` and ``register_value_map`` for
PyTorch/transformers, ``FlaxValueMap`` and ``register_flax_value_map`` for Flax, ``PenzaiValueMap`` and
``register_penzai_value_map`` for penzai models).

The modules' paths before the grouping (``attnflow.adapters.hf_transformers``, ``attnflow.adapters._values``...)
still import, for one release: each resolves to the very module at its new path (see `_moved`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

from ._jax._flax_methods import FlaxValueMap as FlaxValueMap
from ._jax._flax_methods import register_flax_value_map as register_flax_value_map
from ._jax._penzai_methods import PenzaiValueMap as PenzaiValueMap
from ._jax._penzai_methods import register_penzai_value_map as register_penzai_value_map
from ._torch._values import ValueMap as ValueMap
from ._torch._values import register_value_map as register_value_map

__all__ = [
    "FlaxValueMap", "PenzaiValueMap", "ValueMap", "register_flax_value_map", "register_penzai_value_map",
    "register_value_map",
]

_MOVED_TO = {
    "_torch": (
        "_banded", "_faithfulness_torch", "_generation_torch", "_hf_families", "_nnsight", "_qwen_vision", "_reduced",
        "_swin", "_torch_common", "_value_zeroing", "_values", "_vision_language", "hf_transformers", "timm_vit",
        "torch_hooks", "transformer_lens",
    ),
    "_jax": (
        "_faithfulness_flax", "_flax_common", "_flax_methods", "_generation_jax", "_penzai_methods", "flax_linen",
        "flax_nnx", "flaxmodels", "gemma", "penzai",
    ),
}
_moved = {f"{__name__}.{name}": f"{__name__}.{group}.{name}" for group, names in _MOVED_TO.items() for name in names}


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a module's path before the grouping as the module at its new path (the same object)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _moved:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(_moved[spec.name])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system has just set the module's __spec__ to the old path's: the module keeps its own
        module.__spec__ = module.__spec__.loader_state if module.__spec__ is not None else None


if not any(isinstance(finder, _OldPath) for finder in sys.meta_path):
    sys.meta_path.append(_OldPath())
