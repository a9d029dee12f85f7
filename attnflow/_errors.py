"""The exception hierarchy. Every error attnflow raises on purpose derives from AttnflowError."""

from __future__ import annotations


class AttnflowError(Exception):
    """Base class of every error attnflow raises on purpose."""


class TraceError(AttnflowError, ValueError):
    """An AttentionTrace (or the arrays given to build one) is malformed."""


class TraceFileError(AttnflowError, OSError):
    """A saved trace cannot be read: missing, truncated, corrupted or of another format."""


class OptionError(AttnflowError, ValueError):
    """An option given to a method is out of range or of the wrong kind."""


class FlowTooLargeError(AttnflowError):
    """The attention-flow problem would take too long; raise ``max_seconds`` or narrow ``sources``."""


class AdapterError(AttnflowError):
    """No adapter can capture this model, or an adapter failed while capturing."""


class AdapterRegistrationError(AdapterError, TypeError):
    """An adapter handed to the registry does not follow the Adapter contract."""


class HiddenAttentionError(AdapterError):
    """The model computes attention in a way that hides the weights (SDPA, flash) and cannot be switched."""


class MissingDependencyError(AttnflowError, ImportError):
    """An optional framework or package is not installed; the message names the extra to install."""


class ComparisonError(AttnflowError, ValueError):
    """Two traces cannot be compared (different layers, heads, tokens)."""


class MethodError(AttnflowError, TypeError):
    """A method is broken (registration) or cannot run on this trace (it lacks what the method needs)."""


class CaptureUnavailableError(AdapterError):
    """An adapter cannot capture one kind (``kind``: a row of the capture-kinds table, e.g. ``"values"``) for
    this model, although it declares it: e.g. value vectors of a family it has no path map for. Raised while
    the hooks are installed; ``methods="all"`` then skips the methods that need the kind."""

    def __init__(self, message: str, *, kind: str):
        super().__init__(message)
        self.kind = kind
