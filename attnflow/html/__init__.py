"""One self-contained interactive HTML page of an explanation: no network, no CDN, data and a small
hand-written script inline, so it works offline and from an email attachment.

The page shows the text with each token highlighted by the selected method (click a token to explain it
instead), a layer slider, every method side by side, a map of explained x input tokens (the decoder x
encoder view of an encoder-decoder, the generated x prompt view of a decoder), and, when the trace is
given, the per-head attention of each layer as lines between tokens (bertviz-style).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._payload import build_payload as build_payload
from ._payload import decode_log16 as decode_log16
from ._payload import encode_log16 as encode_log16
from ._payload import encode_u8row as encode_u8row


def to_html(explanation: Any, trace: Any | None = None, *, title: str | None = None,
            prompt_length: int | None = None) -> str:
    """The page as one HTML string (see the module docstring).

    Args:
        explanation: an `attnflow.Explanation`; every method, layer, item and explained token it
            holds is in the page (scores as 16-bit log codes, within 0.05%).
        trace: the `attnflow.AttentionTrace` it was computed from, for the per-head view (8 bits per
            weight, scaled per row); None leaves that view out.
        title: the page's heading (default: model and methods).
        prompt_length: for a decoder, how many tokens are the prompt (the map then marks generated x
            prompt); default the explanation's ``metadata["prompt_length"]``.
    """
    from ._page import render_page

    return render_page(build_payload(explanation, trace, title=title, prompt_length=prompt_length))


def write_html(explanation: Any, path: str | os.PathLike[str], trace: Any | None = None, **kwargs: Any) -> Path:
    """Write `to_html` to ``path`` atomically; returns the path."""
    from .._tensorfile import atomic_write

    page = to_html(explanation, trace, **kwargs).encode("utf-8")
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(page), what="HTML page")
    return Path(path)


def notebook_frame(page: str, height: int = 720) -> str:
    """The page inside an ``<iframe srcdoc>`` for Jupyter, so its script and style stay apart from the notebook's."""
    import html

    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" style="width:100%;height:{int(height)}px;border:0" '
            'title="attnflow explanation"></iframe>')


__all__ = ["build_payload", "decode_log16", "encode_log16", "encode_u8row", "notebook_frame", "to_html", "write_html"]
