"""The HTML page's data, read back in Python: every score of every method, layer, item and explained token
at 3 significant digits, per-head weights within 8-bit precision, a self-contained file under 2 MB for a
128-token MiniLM explanation."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from html_page import hostile_explanation, page_data, read_array, same_to_3_digits
from plot_traces import decoder_trace, encoder_trace, seq2seq_trace

import attnflow
from attnflow.html import decode_log16, encode_log16


def test_log16_keeps_three_significant_digits_over_the_whole_range():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.random(500), 10.0 ** rng.uniform(-12, 0, 500), -rng.random(50), [0.0, 1.0, 1e-30]])
    codes, lo, step = encode_log16(values)
    back = decode_log16(codes, lo, step)
    big = np.abs(values) >= np.abs(values).max() * np.exp(-30)
    np.testing.assert_allclose(back[big], values[big], rtol=5e-4)
    assert (back[~big] == 0).all() and back[-3] == 0.0


def check_page(explanation, trace, page):
    data, raw = page_data(page)
    assert data["format"] == "attnflow.html" and data["explained"] == explanation.stream
    for b, item in enumerate(data["items"]):
        positions = explanation.sources[b]
        real = np.flatnonzero(explanation.streams[explanation.stream].mask[b][positions])
        assert item["source_labels"] == [explanation.source_tokens(b)[i] for i in real]
        for method in explanation.methods:
            full = explanation.layers(method)
            by_stream = full if isinstance(full, dict) else {explanation.input_streams[0]: full}
            for name, array in by_stream.items():
                valid = explanation.streams[name].valid_index(b)
                assert item["streams"][name]["tokens"] == [explanation.tokens(name)[b][p] for p in valid]
                expected = np.asarray(array)[:, b][:, real][:, :, valid]
                same_to_3_digits(read_array(item["scores"][method][name], raw), expected)
        if trace is None:
            assert item["heads"] is None
            continue
        for desc, layer in zip(item["heads"], data["layers"]):
            weights = trace.layers[layer["index"]].weights[b]
            rows = trace.streams[layer["query"]].valid_index(b)
            cols = trace.streams[layer["key"]].valid_index(b)
            expected = np.asarray(weights, dtype=np.float64)[:, rows][:, :, cols]
            got = read_array(desc, raw)
            bound = expected.max(axis=-1, keepdims=True) / 510 + 1e-7  # half an 8-bit step of the row's largest
            assert np.all(np.abs(got - expected) <= bound)
    return data


@pytest.mark.parametrize("make", [encoder_trace, decoder_trace, seq2seq_trace])
def test_every_score_and_head_weight_is_in_the_page(make):
    trace = make()
    explanation = attnflow.explain(trace)
    data = check_page(explanation, trace, explanation.to_html(trace))
    assert [m["name"] for m in data["methods"]] == ["raw", "rollout", "flow"]
    assert len(data["layers"]) == trace.num_layers
    if trace.model_name == "synthetic-decoder":
        assert data["causal"] and data["prompt_length"] == 4
    if trace.model_name == "synthetic-seq2seq":
        assert data["streams"] == ["decoder", "encoder"]


def test_the_page_with_flow_at_every_layer_holds_each_layers_max_flow():
    """The page asked for flow at every layer (``explain(..., all_layers=True)``, as the CLI's --html does with
    every layer): each layer's flow in the page is the per-pair igraph max-flow from that layer's nodes on the
    paper's network, row-normalised, to the page's 3 digits."""
    from test_flow import igraph_level_flows

    rng = np.random.default_rng(41)
    layers, heads, seq = 4, 3, 6
    weights = [rng.dirichlet(np.full(seq, 0.5), size=(1, heads, seq)) for _ in range(layers)]
    trace = attnflow.AttentionTrace.from_arrays(weights)
    explanation = attnflow.explain(trace, ["rollout", "flow"], all_layers=True)
    page = explanation.to_html(trace)
    check_page(explanation, trace, page)
    data, raw = page_data(page)
    assert [m["layers"] for m in data["methods"]] == [list(range(layers))] * 2
    mixed = [0.5 * w[0].mean(axis=0) + 0.5 * np.eye(seq) for w in weights]
    expected = igraph_level_flows([a / a.sum(axis=-1, keepdims=True) for a in mixed])
    same_to_3_digits(read_array(data["items"][0]["scores"]["flow"]["tokens"], raw),
                     expected / expected.sum(axis=-1, keepdims=True))


def test_page_without_trace_and_with_some_sources(tmp_path):
    trace = encoder_trace()
    explanation = attnflow.explain(trace, ["rollout", "flow"], sources=[0, 3])
    page = explanation.to_html(path=tmp_path / "page.html", title="two tokens")
    assert (tmp_path / "page.html").read_text(encoding="utf-8") == page
    data = check_page(explanation, None, page)
    assert data["layers"] is None and data["title"] == "two tokens"
    assert "Per-head weights are not in this page" in page
    frame = explanation._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and "&lt;!DOCTYPE html&gt;" in frame


def test_the_page_reaches_nothing_outside_itself():
    explanation = attnflow.explain(encoder_trace(), "rollout")
    page = explanation.to_html()
    assert "default-src 'none'" in page  # the content security policy blocks every fetch
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert not re.search(r"https?://", page)
    assert page.count("<script") == 2  # the data block and the inline script; nothing loaded


def test_comment_and_script_openers_in_labels_leave_only_the_pages_script_tags():
    """A label ``<!--<script>`` in the JSON block would switch the HTML parser to "script data escaped" and the
    block would swallow the viewer's script; ``</script>`` would end the block early. The data block holds
    no ``<``, ``>`` or ``&`` at all, and its JSON gives back every string exactly."""
    trace, explanation, labels, title = hostile_explanation()
    page = explanation.to_html(trace, title=title)
    assert len(re.findall(r"<script\b", page, re.I)) == 2 and len(re.findall(r"</script", page, re.I)) == 2
    assert "<!--" not in page and "-->" not in page
    block = re.search(r'<script type="application/json" id="attnflow-data">(.*?)</script>', page, re.S).group(1)
    assert not set("<>&") & set(block)
    data, _ = page_data(page)
    assert data["items"][0]["streams"]["tokens"]["tokens"] == labels
    assert data["items"][0]["source_labels"] == labels
    assert data["title"] == title and data["model"] == "m<!--<script>-->"
    assert [layer["name"] for layer in data["layers"]] == ["<!--<script>.0", "</script>.1"]
    assert f"<title>{html.escape(title)}</title>" in page


def test_a_trace_that_is_not_the_explanations_is_refused():
    explanation = attnflow.explain(encoder_trace(seed=0), "raw")
    with pytest.raises(attnflow.OptionError, match="does not belong to the explanation"):
        explanation.to_html(decoder_trace())
    with pytest.raises(attnflow.OptionError, match="AttentionTrace"):
        explanation.to_html(trace="nope")


@pytest.mark.slow
def test_minilm_128_tokens_page_is_under_2_mb(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir)
    text = " ".join(["attention flow and rollout quantify how information moves through transformer layers"] * 20)
    inputs = tokenizer([text], return_tensors="pt", truncation=True, max_length=128)
    trace = attnflow.capture(model, tokens=tokenizer, **inputs)
    assert trace.seq_len == 128
    explanation = attnflow.explain(trace)  # all 128 explained tokens, raw and rollout after each of the 6 layers
    page = explanation.to_html(trace)
    size = len(page.encode("utf-8"))
    assert size < 2 * 1024 * 1024, size
    check_page(explanation, trace, page)
