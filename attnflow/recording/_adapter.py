"""The adapter contract: what a framework or model-family adapter implements (it fills a [`Recorder`][attnflow.recording.Recorder])."""

from __future__ import annotations

import abc
import dataclasses
import importlib
import inspect
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar

from .._errors import AdapterError, AttnflowError, MissingDependencyError, OptionError
from .._kinds import CAPABILITIES as _CAPABILITIES
from ._recorder import Recorder

#: What an adapter can declare it captures (``Adapter.captures``): the capture kinds
#: (`attnflow._kinds.KINDS`: weights, attn_grad, values, value_zeroing, input_gradients, ablation) and
#: the features ``streams`` and ``generation``.
CAPABILITIES = _CAPABILITIES
"""What an adapter can declare it captures (``Adapter.captures``): the capture kinds
(`attnflow._kinds.KINDS`: weights, attn_grad, values, value_zeroing, input_gradients, ablation) and
the features ``streams`` and ``generation``."""


@dataclasses.dataclass(frozen=True)
class AdapterOption:
    """One option an adapter takes (``attach(model, NAME=value)`` / ``capture(..., adapter_options=...)``).

    Attributes:
        name: the keyword.
        types: the accepted types (checked with ``isinstance`` before the adapter sees the value); None: any.
        default: the value when not given (documentation; the adapter's ``hooks`` signature applies it).
        help: one line for error messages and docs.
    """

    name: str
    types: type | tuple[type, ...] | None = None
    default: Any = None
    help: str = ""


def import_optional(module: str, extra: str) -> Any:
    """Import an optional framework, or raise [`MissingDependencyError`][attnflow.MissingDependencyError] naming the extra to install.

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

    Subclasses set the class attributes and implement [`claims`][attnflow.recording.Adapter.claims] and [`hooks`][attnflow.recording.Adapter.hooks]. Register an
    instance with `attnflow.register_adapter`, or through the ``attnflow.adapters`` entry-point
    group (value: ``"package.module:AdapterClass"``). Import the framework inside methods (use
    `attnflow.import_optional`), never at module top level: entry points are loaded by
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
    #: The options ``hooks`` takes, checked centrally (unknown names and wrong types are refused before the
    #: adapter runs). None: undeclared, everything is passed on.
    options: ClassVar[tuple[AdapterOption, ...] | None] = None
    #: What the adapter captures (see `CAPABILITIES`); every adapter captures ``"weights"``.
    captures: ClassVar[frozenset[str]] = frozenset({"weights"})

    @abc.abstractmethod
    def claims(self, model: Any) -> bool:
        """Whether this adapter can capture ``model``; cheap, no forward pass."""

    def accepts(self, model: Any) -> bool:
        """Whether this adapter could capture ``model`` when told which modules to hook (with its
        options), although [`claims`][attnflow.recording.Adapter.claims] is False; by default the same as [`claims`][attnflow.recording.Adapter.claims]."""
        return self.claims(model)

    @abc.abstractmethod
    def hooks(self, model: Any, recorder: Recorder, **options: Any) -> AbstractContextManager[None]:
        """A context manager that installs the capture on ``model`` and fully undoes it on exit,
        also when the body raises."""

    def run(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one forward pass for [`attnflow.capture`][attnflow.recording.capture]; by default ``model(*args, **kwargs)``."""
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

    def encode(
        self, tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None,
        targets: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Tokenise ``texts`` (padded batch) into the keyword arguments the model's forward takes;
        ``targets``: the decoder's texts, for encoder-decoder models."""
        raise AdapterError(
            f"Adapter {self.name!r} cannot tokenise text; pick an adapter that can (e.g. transformers)."
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} framework={self.framework!r}>"


def check_adapter_options(adapter: Adapter, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` checked against what ``adapter`` declares: one place that refuses unknown names (listing
    the valid ones) and values of the wrong type."""
    declared = adapter.options
    if declared is None:
        return dict(options)
    known = {option.name: option for option in declared}
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(f"{o.name} ({o.help})" if o.help else o.name for o in declared) or "none"
        raise OptionError(f"Adapter {adapter.name!r} got unknown option(s) {unknown}; it takes: {valid}.")
    for name, value in options.items():
        types = known[name].types
        if types is not None and value is not None and not isinstance(value, types):
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise OptionError(f"Adapter {adapter.name!r}: option {name!r} must be {names}, got {value!r}.")
    return dict(options)


def load_model(
    adapter: Any, location: str | os.PathLike[str], *, trust_remote_code: bool = False, generate: bool = False,
) -> tuple[Any, Any]:
    """``adapter.load_model(location)``, passing ``trust_remote_code=True`` and ``generate=True`` (a model
    that can ``generate()``) only when asked (adapters that cannot take them refuse then); any failure of an
    adapter's own loader becomes an [`AdapterError`][attnflow.AdapterError]."""
    kwargs: dict[str, Any] = {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if generate:
        if "generate" not in inspect.signature(adapter.load_model).parameters:
            raise AdapterError(
                f"Adapter {adapter.name!r} cannot load a model for generation; use --adapter transformers, or load "
                "the model yourself and call generate() inside attnflow.attach()."
            )
        kwargs["generate"] = True
    try:
        return adapter.load_model(location, **kwargs)
    except AttnflowError:
        raise
    except Exception as exc:  # a third-party adapter's own error (a TypeError for trust_remote_code too)
        raise AdapterError(
            f"Adapter {adapter.name!r} could not load {os.fspath(location)!r}: {type(exc).__name__}: {exc}"
        ) from exc
