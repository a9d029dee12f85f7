"""Capturing attention: the Adapter contract, the Recorder adapters fill, the adapter registry, and
capture()/attach()."""

from .._errors import CaptureUnavailableError as CaptureUnavailableError
from .._kinds import KINDS as KINDS
from .._kinds import CaptureKind as CaptureKind
from .._switches import deferred_interrupts as deferred_interrupts
from .._switches import switch as switch
from ._adapter import CAPABILITIES as CAPABILITIES
from ._adapter import Adapter as Adapter
from ._adapter import AdapterOption as AdapterOption
from ._adapter import import_optional as import_optional
from ._capture import attach as attach
from ._capture import capture as capture
from ._generation import GenerationStep as GenerationStep
from ._generation import StepLayer as StepLayer
from ._generation import generated_mask as generated_mask
from ._plan import CapturePlan as CapturePlan
from ._plan import capture_plan as capture_plan
from ._recorder import NO_TARGET as NO_TARGET
from ._recorder import CaptureRequest as CaptureRequest
from ._recorder import Recorder as Recorder
from ._registry import get_adapter as get_adapter
from ._registry import list_adapters as list_adapters
from ._registry import register_adapter as register_adapter
from ._registry import unregister_adapter as unregister_adapter
from ._selectors import module_selector as module_selector

__all__ = [
    "CAPABILITIES", "KINDS", "NO_TARGET", "Adapter", "AdapterOption", "CaptureKind", "CapturePlan", "CaptureRequest",
    "CaptureUnavailableError", "GenerationStep", "Recorder", "StepLayer", "attach", "capture", "capture_plan",
    "deferred_interrupts", "generated_mask", "get_adapter", "import_optional", "list_adapters", "module_selector",
    "register_adapter", "switch", "unregister_adapter",
]
