"""The one self-contained HTML page: the payload as inline JSON, the hand-written script and style inline,
and a content security policy that lets the page reach nothing outside itself."""

from __future__ import annotations

import html
import json
from importlib import resources
from typing import Any

#: Inline script and style only; no fetches, images or fonts from anywhere (data: and blob: URLs only).
POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
          "connect-src data: blob:")


def _asset(name: str) -> str:
    return resources.files("attnflow.html").joinpath(name).read_text(encoding="utf-8")


#: What the JSON text of the data block never holds literally: ``<`` (so no ``</script>``, ``<!--`` or
#: ``<script`` can change the HTML parser's state inside the block), ``>`` and ``&`` (so no ``-->`` and no
#: character reference), as JSON escapes that ``JSON.parse`` reads back to the same characters.
_JSON_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026"}


def data_block(payload: dict[str, Any]) -> str:
    """The payload's JSON as it sits inside the page's ``<script type="application/json">`` element."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).translate(_JSON_ESCAPES)


def render_page(payload: dict[str, Any]) -> str:
    """The complete page for a payload from `build_payload`."""
    data = data_block(payload)
    title = html.escape(payload["title"])
    options = html.escape(payload["options"])
    heads = payload["layers"] is not None
    notes = [
        "Scores are stored as 16-bit logarithmic codes (within 0.05% of each value)"
        + ("; per-head attention with 8 bits per weight (within 0.2% of each row's largest weight)." if heads else "."),
        "“Exclude special tokens” leaves out CLS/SEP/BOS-like tokens and renormalises the rest of the row to sum 1 over "
        "the remaining tokens of all input streams: the shares then are not the model's, but shares among ordinary tokens.",
        "Methods computed only after the last layer (flow, by default) keep showing that layer when the slider moves.",
    ]
    note_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{POLICY}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>
{_asset("view.css")}
</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p>Model {html.escape(payload["model"] or "?")} ({html.escape(payload["framework"] or "?")}), explained stream
<b>{html.escape(payload["explained"])}</b>; settings: {options}.</p>
<details id="storage-notes"><summary>How this page stores and shows the numbers</summary>
{note_html}
</details>
</header>
<div id="controls">
<span id="methods"></span>
<span title="layers numbered from 1: layer l = after the l-th attention layer of the explained stream">after layer <input type="range" id="layer" min="0" max="0" step="1" value="0"> <b id="layer-value"></b></span>
<label><input type="checkbox" id="exclude-special"> exclude special tokens (renormalise)</label>
<label><input type="checkbox" id="shared-scale" checked> one colour scale for all methods</label>
<label><input type="checkbox" id="log-scale"> log colours</label>
<span><select id="item"></select></span>
</div>
<div id="status">Loading…</div>
<main>
<section id="text-panel"><h2>Text</h2>
<p class="note">Each token's background shows how much the explained token (outlined) draws on it. Click a token to explain it instead.</p>
<div id="text"></div><p class="note" id="scale-note"></p></section>
<section id="compare-panel"><h2>Methods side by side</h2>
<div id="compare-wrap"><table id="compare"></table></div></section>
<section id="map-panel"><h2>Map</h2>
<p class="note">input stream: <select id="map-stream"></select></p>
<p class="note" id="map-caption"></p>
<div id="map-legend"><span class="lo"></span><canvas id="map-legend-bar" width="160" height="10"></canvas><span class="hi"></span> <span class="kind"></span></div>
<canvas id="map" width="10" height="10"></canvas></section>
<section id="heads-panel"><h2>Attention heads</h2>
<p>layer <select id="head-layer"></select>
<label><input type="checkbox" id="only-source" checked> only the explained token's lines</label></p>
<div id="head-buttons"></div><p class="note"></p><canvas id="heads" width="10" height="10"></canvas></section>
<section id="model-panel"><h2>Model view</h2>
<p class="note">Every layer × head of this text's attention (rows: layers, columns: heads; each thumbnail query × key, darker = more weight, scaled to each row's largest). Click one to open it in the heads view.</p>
<div id="model"></div></section>
</main>
<script type="application/json" id="attnflow-data">{data}</script>
<script>
{_asset("view.js")}
</script>
</body>
</html>
"""
