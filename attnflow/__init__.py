"""attnflow: attention rollout and attention flow for PyTorch and JAX/Flax models.

Capture a model's attention into an [`AttentionTrace`][attnflow.AttentionTrace], then compute [`raw`][attnflow.raw],
[`rollout`][attnflow.rollout] and [`flow`][attnflow.flow] (Abnar & Zuidema, ACL 2020) on a framework-free core.
Importing attnflow imports no deep-learning framework; adapters load theirs when used.
"""

from . import errors as errors
from . import plot as plot
from ._compare import ComparisonReport as ComparisonReport
from ._compare import compare as compare
from ._errors import AdapterError as AdapterError
from ._errors import AdapterRegistrationError as AdapterRegistrationError
from ._errors import AttnflowError as AttnflowError
from ._errors import ComparisonError as ComparisonError
from ._errors import FlowTooLargeError as FlowTooLargeError
from ._errors import HiddenAttentionError as HiddenAttentionError
from ._errors import MethodError as MethodError
from ._errors import MissingDependencyError as MissingDependencyError
from ._errors import OptionError as OptionError
from ._errors import TraceError as TraceError
from ._errors import TraceFileError as TraceFileError
from ._explanation import Explanation as Explanation
from ._explanation import explain as explain
from ._files import load as load
from ._files import save as save
from ._models import packaged_model_dir as packaged_model_dir
from ._version import __version__ as __version__
from .batch import OutputInUseError as OutputInUseError
from .batch import run_batch as run_batch
from .methods import flow as flow
from .methods import flow_network as flow_network
from .methods import fuse_heads as fuse_heads
from .methods import raw as raw
from .methods import rollout as rollout
from .methods._kit import LayerMethod as LayerMethod
from .methods._kit import RoutedMethod as RoutedMethod
from .methods._options import Options as Options
from .methods._registry import Method as Method
from .methods._registry import get_method as get_method
from .methods._registry import list_methods as list_methods
from .methods._registry import register_method as register_method
from .methods._registry import unregister_method as unregister_method
from .recording._adapter import Adapter as Adapter
from .recording._adapter import AdapterOption as AdapterOption
from .recording._adapter import import_optional as import_optional
from .recording._capture import attach as attach
from .recording._capture import capture as capture
from .recording._recorder import Recorder as Recorder
from .recording._registry import get_adapter as get_adapter
from .recording._registry import list_adapters as list_adapters
from .recording._registry import register_adapter as register_adapter
from .recording._registry import unregister_adapter as unregister_adapter
from .trace import AttentionTrace as AttentionTrace
from .trace import LayerAttention as LayerAttention
from .trace import Link as Link
from .trace import Stream as Stream

__all__ = [
    "Adapter", "AdapterError", "AdapterOption", "AdapterRegistrationError", "AttentionTrace", "AttnflowError",
    "ComparisonError", "ComparisonReport", "Explanation", "FlowTooLargeError", "HiddenAttentionError", "LayerAttention",
    "LayerMethod", "Link", "Method", "MethodError", "MissingDependencyError", "OptionError", "Options", "OutputInUseError", "Recorder",
    "RoutedMethod", "Stream", "TraceError",
    "TraceFileError", "attach", "capture", "compare", "explain", "flow", "flow_network", "fuse_heads", "get_adapter",
    "get_method", "import_optional", "list_adapters", "list_methods", "load", "packaged_model_dir", "plot", "raw",
    "register_adapter", "register_method", "rollout", "run_batch", "save", "unregister_adapter", "unregister_method",
]

# Faithfulness evaluation (attnflow.evaluate): blank-out and input-gradient references, Spearman, AOPC.
from .evaluate import FaithfulnessReport as FaithfulnessReport  # noqa: E402
from .evaluate import faithfulness as faithfulness  # noqa: E402

__all__ += ["FaithfulnessReport", "faithfulness"]

# ``attnflow.capture`` is the function; the package of the adapter contract is ``attnflow.recording``. Until the
# next release the package also answers to its old import path (``from attnflow.capture import switch``): every
# submodule is registered under both names, so no module is ever loaded twice.
from . import recording as recording  # noqa: E402
from .recording import _aliases  # noqa: E402

_aliases.alias("attnflow.recording", "attnflow.capture")
