"""The adapter contract: what a framework or model-family adapter implements (it fills a :class:`Recorder`)."""

from __future__ import annotations

import abc
import importlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from ._errors import AdapterError, MissingDependencyError
from ._recorder import Recorder


def import_optional(module: str, extra: str) -> Any:
    """Import an optional framework, or raise :class:`MissingDependencyError` naming the extra to install.

    Adapters call this instead of a top-level ``import torch`` so that ``import attnflow`` stays light.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"This needs {module!r}, which is not installed ({exc}). Install it with: "
            f"pip install 'attnflow[{extra}]'"
        ) from exc


class Adapter(abc.ABC):
    """Base class of every adapter: a built-in one or a third party's.

    Subclasses set the class attributes and implement :meth:`claims` and :meth:`hooks`. Register an
    instance with :func:`attnflow.register_adapter`, or through the ``attnflow.adapters`` entry-point
    group (value: ``"package.module:AdapterClass"``). Import the framework inside methods (use
    :func:`attnflow.import_optional`), never at module top level: entry points are loaded by
    ``attnflow.capture`` on machines that may not have your framework.
    """

    #: Unique adapter name, e.g. ``"transformers"``; what users pass as ``adapter=``.
    name: ClassVar[str] = ""
    #: Top-level module the models come from (``"torch"``, ``"flax"``). The adapter is asked to claim a
    #: model only when this module has already been imported: no model can exist otherwise.
    framework: ClassVar[str] = ""
    #: The array library the model computes in (``"torch"``, ``"jax"``), stored as ``trace.framework``;
    #: empty means the same as ``framework``.
    array_library: ClassVar[str] = ""
    #: The pip extra that installs the framework (``pip install 'attnflow[EXTRA]'``).
    extra: ClassVar[str] = ""
    #: Adapters with higher priority are asked first (model-family adapters above generic ones).
    priority: ClassVar[int] = 0

    @abc.abstractmethod
    def claims(self, model: Any) -> bool:
        """Whether this adapter can capture ``model``; cheap, no forward pass."""

    @abc.abstractmethod
    def hooks(self, model: Any, recorder: Recorder, **options: Any) -> AbstractContextManager[None]:
        """A context manager that installs the capture on ``model`` and fully undoes it on exit,
        also when the body raises."""

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one forward pass for :func:`attnflow.capture`; by default ``model(*args, **kwargs)``."""
        return model(*args, **kwargs)

    def model_name(self, model: Any) -> str:
        """A short name for the model, stored in the trace."""
        return type(model).__name__

    # Optional: adapters that can load a model from a path power the command line (explain, batch).
    def load_model(self, location: str) -> tuple[Any, Any]:
        """Load ``(model, tokenizer)`` from a local directory (or a hub id where there is network)."""
        raise AdapterError(
            f"Adapter {self.name!r} cannot load models by path; load the model yourself and use "
            "attnflow.capture(), or pick an adapter that can (e.g. --adapter transformers)."
        )

    def encode(self, tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None) -> dict[str, Any]:
        """Tokenise ``texts`` (padded batch) into the keyword arguments the model's forward takes."""
        raise AdapterError(
            f"Adapter {self.name!r} cannot tokenise text; pick an adapter that can (e.g. transformers)."
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} framework={self.framework!r}>"

