"""Every error attnflow raises on purpose, in one place; all derive from [`AttnflowError`][attnflow.AttnflowError].

``attnflow.AttnflowError`` stays at the top level; the other classes live here (``attnflow.errors.TraceError``).
The top-level names of the others (``attnflow.TraceError``...) still work for one release.
"""

from ._errors import AdapterError as AdapterError
from ._errors import AdapterRegistrationError as AdapterRegistrationError
from ._errors import AttnflowError as AttnflowError
from ._errors import CaptureUnavailableError as CaptureUnavailableError
from ._errors import ComparisonError as ComparisonError
from ._errors import FlowTooLargeError as FlowTooLargeError
from ._errors import HiddenAttentionError as HiddenAttentionError
from ._errors import MethodError as MethodError
from ._errors import MissingDependencyError as MissingDependencyError
from ._errors import OptionError as OptionError
from ._errors import TraceError as TraceError
from ._errors import TraceFileError as TraceFileError
from .batch import OutputInUseError as OutputInUseError

__all__ = [
    "AdapterError", "AdapterRegistrationError", "AttnflowError", "CaptureUnavailableError", "ComparisonError",
    "FlowTooLargeError", "HiddenAttentionError", "MethodError", "MissingDependencyError", "OptionError",
    "OutputInUseError", "TraceError", "TraceFileError",
]
