"""Pictures of attention and explanations, as matplotlib Figures to compose, show or save.

Every view returns a ``matplotlib.figure.Figure``; `save` writes it as PNG, SVG and/or PDF.
matplotlib is imported only when a view is drawn, so ``import attnflow`` stays light.

Views of an `attnflow.Explanation`: `heatmap` (explained x input tokens, one panel per
method), `token_bars`, `text_highlight`, `encoder_decoder_map`, `generation_map`,
`image_overlay`. Views of an `attnflow.AttentionTrace`: `head_grid`, `flow_graph`
(with the paths from `flow_paths`). Each takes ``exclude_special`` (special tokens left out, rows
renormalised, said in the title), ``shared_scale``, ``log``, ``vmin``/``vmax``, ``dpi`` and ``title``.
"""

from ._figure import FORMATS as FORMATS
from ._figure import parse_formats as parse_formats
from ._figure import save as save
from ._flowgraph import FlowPaths as FlowPaths
from ._flowgraph import flow_graph as flow_graph
from ._flowgraph import flow_paths as flow_paths
from ._image import image_overlay as image_overlay
from ._image import load_image as load_image
from ._image import patch_scores as patch_scores
from ._image import upsample_bilinear as upsample_bilinear
from ._matrices import encoder_decoder_map as encoder_decoder_map
from ._matrices import generation_map as generation_map
from ._matrices import head_grid as head_grid
from ._matrices import heatmap as heatmap
from ._scores import ScoreMatrix as ScoreMatrix
from ._scores import score_matrix as score_matrix
from ._tokens import text_highlight as text_highlight
from ._tokens import token_bars as token_bars

__all__ = [
    "FORMATS", "FlowPaths", "ScoreMatrix", "encoder_decoder_map", "flow_graph", "flow_paths", "generation_map",
    "head_grid", "heatmap", "image_overlay", "load_image", "parse_formats", "patch_scores", "save", "score_matrix",
    "text_highlight", "token_bars", "upsample_bilinear",
]
