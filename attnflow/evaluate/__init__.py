"""Faithfulness: do an explanation's token scores agree with what the model itself is sensitive to?

Reference importances come from the model through its adapter (capabilities ``ablation``: blanking tokens
out and re-running it; ``input_gradients``: gradients of the target with respect to the input embeddings).
Everything else here is numpy: Spearman's correlation per item and layer, deletion/insertion curves and
ERASER's AOPC, with a random ranking as the baseline.
"""

from ._faithfulness import DEFAULT_REFERENCES as DEFAULT_REFERENCES
from ._faithfulness import REFERENCES as REFERENCES
from ._faithfulness import evaluate_probe as evaluate_probe
from ._faithfulness import faithfulness as faithfulness
from ._leaderboard import LEADERBOARD_COLUMNS as LEADERBOARD_COLUMNS
from ._leaderboard import bootstrap_interval as bootstrap_interval
from ._leaderboard import format_leaderboard as format_leaderboard
from ._leaderboard import plot_leaderboard as plot_leaderboard
from ._probe import BLANKS as BLANKS
from ._probe import Probe as Probe
from ._probe import ProbeRequest as ProbeRequest
from ._probe import Target as Target
from ._probe import blank_error as blank_error
from ._probe import model_token_id as model_token_id
from ._probe import resolve_blank as resolve_blank
from ._probe import resolve_target as resolve_target
from ._probe import target_index as target_index
from ._probe import target_positions as target_positions
from ._report import RANDOM as RANDOM
from ._report import FaithfulnessReport as FaithfulnessReport
from ._report import plot_rows as plot_rows
from ._stats import CURVE_GRID as CURVE_GRID
from ._stats import ERASER_BINS as ERASER_BINS
from ._stats import rankdata as rankdata
from ._stats import spearman as spearman

__all__ = [
    "BLANKS", "CURVE_GRID", "DEFAULT_REFERENCES", "ERASER_BINS", "LEADERBOARD_COLUMNS", "REFERENCES", "RANDOM", "FaithfulnessReport", "Probe", "ProbeRequest",
    "Target", "blank_error", "bootstrap_interval", "evaluate_probe", "faithfulness", "format_leaderboard", "model_token_id", "plot_leaderboard", "plot_rows", "rankdata", "resolve_blank",
    "resolve_target", "spearman", "target_index", "target_positions",
]
