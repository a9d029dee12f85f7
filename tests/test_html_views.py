"""The page labels what it shows (issue 23, point 5): the map's column labels (positions on repeated
tokens), colour legend and tooltips, several heads overlaid, the model view (a thumbnail per layer x head,
click to open) in headless Chromium; the storage disclaimers folded into a <details> element."""

from __future__ import annotations

import json
import re

from html_page import page_data
from plot_traces import decoder_trace, seq2seq_trace
from test_html_browser import browser, console_errors, open_page  # noqa: F401  (the browser fixture)

import attnflow


def test_the_disclaimers_sit_in_a_details_element():
    trace = decoder_trace()
    page = attnflow.explain(trace, ["raw", "rollout"]).to_html(trace)
    folded = re.search(r'<details id="storage-notes"><summary>[^<]+</summary>(.*?)</details>', page, re.S)
    assert folded, "no <details> with the notes"
    for note in ("16-bit logarithmic codes", "8 bits per weight", "Exclude special tokens", "keep showing that layer"):
        assert note in folded.group(1)
        assert page.count(note) == 1 or note == "8 bits per weight"  # nowhere else in the header


def test_map_labels_legend_tooltips_heads_and_model_view(browser, tmp_path):  # noqa: F811
    trace = seq2seq_trace()
    path = tmp_path / "seq2seq.html"
    attnflow.explain(trace, ["rollout", "flow"], stream="decoder").to_html(trace, path=path)
    data, _ = page_data(path.read_text(encoding="utf-8"))
    open_page(browser, path)
    js = browser.execute_script
    assert json.loads(js("return document.getElementById('map').dataset.columns")) == \
        ["[CLS]", "das", "ist", "ein", "test", "[SEP]"]
    assert json.loads(js("return document.getElementById('map').dataset.rows")) == ["<s>", "this", "is", "a"]
    assert js("return document.querySelector('#map-legend .lo').textContent") == "0"
    top = float(js("return document.getElementById('map-legend').dataset.top"))
    assert 0 < top <= 1 and js("return document.querySelector('#map-legend .hi').textContent") == f"{top:.4f}"
    dark = js("const c = document.getElementById('map-legend-bar'); return Array.from(c.getContext('2d')"
              ".getImageData(c.width - 1, 5, 1, 1).data)")
    assert dark[1] < 100  # the ramp's end is the darkest colour, drawn
    tip = js("""const c = document.getElementById('map'); const r = c.getBoundingClientRect();
        const s = r.width / c.width, cell = (c.width - 90 - 4) / 6;
        c.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + (90 + 1.5 * cell) * s,
                                                     clientY: r.top + (64 + 0.5 * cell) * s}));
        return c.title;""")
    assert tip.startswith("<s> → das: ")
    # the model view: one thumbnail per shown layer x head; clicking one opens that layer and head
    thumbs = browser.find_elements("css selector", "#model canvas.thumb")
    assert len(thumbs) == sum(layer["heads"] for layer in data["layers"]) == len(data["layers"]) * 2
    target = next(t for t in thumbs if t.get_attribute("data-layer") == str(len(data["layers"]) - 1)
                  and t.get_attribute("data-head") == "1")
    target.click()
    heads = browser.find_element("id", "heads")
    assert heads.get_attribute("data-layer") == str(len(data["layers"]) - 1) and heads.get_attribute("data-heads") == "1"
    assert js("return document.getElementById('head-layer').value") == str(len(data["layers"]) - 1)
    assert "on" in target.get_attribute("class").split()
    # several heads overlaid: head 0 added to head 1, each button on
    browser.find_element("css selector", "#head-buttons button[data-head='0']").click()
    assert browser.find_element("id", "heads").get_attribute("data-heads") == "0,1"
    on = [b.get_attribute("data-head") for b in browser.find_elements("css selector", "#head-buttons button.on")]
    assert on == ["0", "1"]
    assert console_errors(browser) == []


def test_repeated_tokens_in_the_map_carry_their_positions(browser, tmp_path):  # noqa: F811
    trace = decoder_trace()
    path = tmp_path / "decoder.html"
    attnflow.explain(trace, ["raw"]).to_html(trace, path=path)
    open_page(browser, path)
    columns = json.loads(browser.execute_script("return document.getElementById('map').dataset.columns"))
    assert columns == ["<s>", "Ġthe₁", "Ġcat", "Ġsat", "Ġon", "Ġthe₅", "Ġmat", "."]
    assert console_errors(browser) == []
