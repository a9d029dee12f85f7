"""Import Google DeepMind's ``gemma`` (3.3.0) in the test environment, which has no TensorFlow.

``pip install gemma==3.3.0`` cannot be resolved against this project's pins: its dependency kauldron
requires xmanager, whose releases need ``protobuf<7`` (the pins have protobuf 7), and the resolver
backtracks for more than 15 minutes. ``make install`` therefore installs gemma and kauldron with
``--no-deps`` plus the eleven light packages ``gemma.gm.nn`` really imports (pinned in
``constraints.txt``), and not TensorFlow (1.8 GB).

What is stubbed, and why: kauldron's ``kauldron/typing/array_types.py`` does ``import tensorflow as tf`` at
module level, only to name ``tf.Tensor`` in its ``TfArray``/``TfFloat``... typing aliases (used in
``isinstance`` checks and annotations). This module imports gemma with a stand-in ``tensorflow`` module
whose only content is an empty ``Tensor`` class, inserted into ``sys.modules`` only while importing and
removed right afterwards, so nothing else in the test session (transformers checks for TensorFlow) ever
sees it. No TensorFlow code runs in the gemma code the tests use (``gm.nn.Transformer`` and its
``Attention``). When a real TensorFlow is importable, it is used and nothing is stubbed. attnflow's gemma
adapter depends on none of this: it only looks at classes of an already imported gemma.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

#: The modules the tests use, imported while the stand-in is present (kauldron imports lazily).
_MODULES = ("gemma.gm", "gemma.gm.nn", "gemma.gm.nn._modules", "gemma.gm.nn._transformer", "kauldron.kd",
            "kauldron.modules.misc", "kauldron.typing")


def _stand_in() -> types.ModuleType:
    module = types.ModuleType("tensorflow")
    module.__doc__ = "attnflow test stand-in: tensorflow is not installed (see tests/gemma_import.py)"

    class Tensor:  # never instantiated: kauldron.typing only names it in isinstance-able aliases
        pass

    module.Tensor = Tensor  # type: ignore[attr-defined]
    module.__version__ = "0.0.0+attnflow-stub"  # type: ignore[attr-defined]
    return module


def import_gemma() -> Any:
    """``gemma.gm``, imported once (with real TensorFlow when one is importable)."""
    if "gemma.gm.nn._modules" in sys.modules:
        return sys.modules["gemma.gm"]
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        for name in _MODULES:
            importlib.import_module(name)
        return sys.modules["gemma.gm"]
    sys.modules["tensorflow"] = _stand_in()
    try:
        for name in _MODULES:
            importlib.import_module(name)
        import kauldron.kd as kd

        kd.nn.Identity  # noqa: B018  (resolves kauldron's lazy import of its modules now)
        return sys.modules["gemma.gm"]
    finally:
        del sys.modules["tensorflow"]
