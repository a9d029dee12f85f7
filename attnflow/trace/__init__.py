"""The common format: token streams, attention layers, links, and the files they are saved in."""

from ._file import load as load
from ._file import save as save
from ._stream import Link as Link
from ._stream import Stream as Stream
from ._trace import AttentionTrace as AttentionTrace
from ._trace import LayerAttention as LayerAttention

__all__ = ["AttentionTrace", "LayerAttention", "Link", "Stream", "load", "save"]
