"""attnflow's built-in adapters, installed as ``attnflow.adapters``.

Each module holds one framework or model family and is registered through the ``attnflow.adapters``
entry-point group in attnflow's pyproject, exactly as a third-party adapter would be. Modules import
their framework lazily, inside methods.

Public beside the adapters: the family path maps that value-side methods read (``ValueMap`` and
``register_value_map`` for PyTorch/transformers, ``FlaxValueMap`` and ``register_flax_value_map`` for Flax NNX,
``PenzaiValueMap`` and ``register_penzai_value_map`` for penzai models).
"""

from ._flax_methods import FlaxValueMap as FlaxValueMap
from ._flax_methods import register_flax_value_map as register_flax_value_map
from ._penzai_methods import PenzaiValueMap as PenzaiValueMap
from ._penzai_methods import register_penzai_value_map as register_penzai_value_map
from ._values import ValueMap as ValueMap
from ._values import register_value_map as register_value_map

__all__ = [
    "FlaxValueMap", "PenzaiValueMap", "ValueMap", "register_flax_value_map", "register_penzai_value_map",
    "register_value_map",
]
