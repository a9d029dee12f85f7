"""The old import path of this package (``attnflow.capture``), kept for one release.

``attnflow.capture`` is the function users call; the package moved to ``attnflow.recording`` so that both
resolve. `alias` loads every submodule of the package and registers it under the old name too, so
``from attnflow.capture._recorder import Recorder`` gives the very module ``attnflow.recording._recorder`` is.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys


def alias(package: str, old: str) -> None:
    """Register ``package`` and each of its submodules in ``sys.modules`` under the ``old`` prefix as well."""
    root = importlib.import_module(package)
    for info in pkgutil.iter_modules(root.__path__):
        importlib.import_module(f"{package}.{info.name}")
    for name, module in list(sys.modules.items()):
        if name == package or name.startswith(package + "."):
            sys.modules.setdefault(old + name[len(package):], module)
