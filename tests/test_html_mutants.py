"""What a mutation pass over attnflow/html/ found untested (issue 20, point 7): the payload fields the
viewer's script reads (each checked against values computed here, and named in view.js), the per-head
view when some layers are not shown, the log16 codes at the ends of the range, the notes and the header of
the page, the notebook frame, and the refusals of a trace that is not the explanation's.

The page is read back in Python as tests/test_html.py does (tests/html_page.py); no browser.
"""

from __future__ import annotations

import html
import re
from importlib import resources

import numpy as np
import pytest
from html_page import page_data, read_array
from plot_traces import decoder_trace, encoder_trace, seq2seq_trace, softmax

import attnflow
from attnflow import AttentionTrace, Stream
from attnflow.html import decode_log16, encode_log16, encode_u8row, notebook_frame
from attnflow.html._page import data_block

VIEW_JS = resources.files("attnflow.html").joinpath("view.js").read_text(encoding="utf-8")


def test_every_payload_field_the_viewer_reads_holds_the_explanations_values():
    trace = seq2seq_trace()
    explanation = attnflow.explain(trace, ["raw", "rollout"])
    data, raw = page_data(explanation.to_html(trace))
    for key in ("stream_layers", "special", "sources", "inputs", "title", "kind", "heads"):
        assert re.search(rf"\b{key}\b", VIEW_JS), key  # the script reads it under this name
    assert data["version"] == 1 and data["blob_size"] == len(raw)
    assert data["stream_layers"] == [2, 3, 4, 5]  # the layers whose queries are the decoder's, in model order
    assert [m["title"] for m in data["methods"]] == ["raw attention (heads fused)", "attention rollout"]
    assert [m["layers"] for m in data["methods"]] == [list(explanation.layer_indices(m)) for m in ("raw", "rollout")]
    assert data["methods"][1]["inputs"] == list(explanation.layers("rollout")) == ["encoder", "decoder"]  # per stream
    assert [(la["index"], la["kind"], la["heads"]) for la in data["layers"]] == [
        (0, "self", 2), (1, "self", 2), (2, "self", 2), (3, "cross", 2), (4, "self", 2), (5, "cross", 2)]
    item = data["items"][0]
    assert item["streams"]["encoder"]["special"] == [True, False, False, False, False, True]
    assert item["streams"]["decoder"]["special"] == [True, False, False, False]
    assert item["sources"] == list(range(4))  # every decoder token is explained, in order
    assert len(item["heads"]) == len(data["layers"]) == trace.num_layers


def test_special_tokens_and_sources_of_a_padded_item():
    trace = encoder_trace()
    explanation = attnflow.explain(trace, "raw", sources=[0, 8, 3])
    data, _ = page_data(explanation.to_html())
    second = data["items"][1]  # 9 real tokens of 13
    assert second["streams"]["tokens"]["special"] == [True] + [False] * 7 + [True]
    assert second["streams"]["tokens"]["positions"] == list(range(9))
    assert second["sources"] == [0, 8, 3] and second["source_labels"] == ["[CLS]", "[SEP]", "sat"]
    assert data["stream_layers"] is None and data["layers"] is None


def two_towers(seed=3):
    """CLIP-like: text (5 tokens, 2 heads) and image (4 tokens, 3 heads) towers, their layers interleaved."""
    rng = np.random.default_rng(seed)
    text, image = np.ones((1, 5), bool), np.ones((1, 4), bool)
    weights = [softmax(rng, (1, 3, 4, 4), image), softmax(rng, (1, 2, 5, 5), text),
               softmax(rng, (1, 3, 4, 4), image), softmax(rng, (1, 2, 5, 5), text)]
    return AttentionTrace.from_arrays(
        weights, layer_streams=["image", "text", "image", "text"],
        streams=[Stream("image", tokens=[list("abcd")]), Stream("text", tokens=[list("vwxyz")])],
    )


def test_the_per_head_view_holds_exactly_the_layers_of_the_explained_streams():
    trace = two_towers()
    explanation = attnflow.explain(trace, "raw", stream="text")
    data, raw = page_data(explanation.to_html(trace))
    assert [layer["index"] for layer in data["layers"]] == [1, 3] and data["stream_layers"] == [1, 3]
    heads = data["items"][0]["heads"]
    assert len(heads) == 2
    for desc, index in zip(heads, (1, 3)):
        expected = np.asarray(trace.layers[index].weights[0], dtype=np.float64)
        got = read_array(desc, raw)
        assert got.shape == expected.shape == (2, 5, 5)
        assert np.all(np.abs(got - expected) <= expected.max(-1, keepdims=True) / 510 + 1e-7)
    # the encoder of an encoder-decoder: the decoder's cross layers onto it are not its layers
    encoder = attnflow.explain(seq2seq_trace(), "raw", stream="encoder")
    data, _ = page_data(encoder.to_html(seq2seq_trace()))
    assert [layer["index"] for layer in data["layers"]] == [0, 1] and len(data["items"][0]["heads"]) == 2


def test_a_trace_that_is_not_the_explanations_is_refused_with_the_reason():
    explanation = attnflow.explain(seq2seq_trace(), "raw")
    with pytest.raises(attnflow.OptionError, match=r"\(it has no stream 'encoder'\); pass the trace the explanation "
                                                   r"was computed from, or leave trace= out \(the page then has no "
                                                   r"per-head view\)\."):
        explanation.to_html(decoder_trace())
    with pytest.raises(attnflow.OptionError, match="got str"):
        explanation.to_html("nope")
    trace = encoder_trace()
    relabelled = AttentionTrace.from_arrays(
        [layer.weights for layer in trace.layers], mask=trace.mask, special=trace.special,
        tokens=[[t.upper() for t in item] for item in trace.tokens],
    )
    with pytest.raises(attnflow.OptionError, match="its 'tokens' tokens differ"):
        attnflow.explain(trace, "raw").to_html(relabelled)


def test_the_default_title_names_the_model_or_says_model():
    trace = encoder_trace()
    nameless = AttentionTrace.from_arrays([layer.weights for layer in trace.layers], mask=trace.mask,
                                          tokens=trace.tokens)
    page = attnflow.explain(nameless, ["raw", "rollout"]).to_html()
    data, _ = page_data(page)
    assert data["title"] == "model: raw, rollout"
    assert "<p>Model ? (numpy), explained stream\n<b>tokens</b>" in page
    named = attnflow.explain(trace, ["raw", "rollout"])
    assert page_data(named.to_html())[0]["title"] == "synthetic-encoder: raw, rollout"
    assert "<p>Model synthetic-encoder (numpy)" in named.to_html()


def test_the_pages_notes_and_settings():
    trace = decoder_trace()
    explanation = attnflow.explain(trace, ["raw", "rollout"])
    with_heads, without = explanation.to_html(trace), explanation.to_html()
    settings = html.escape(explanation.options.describe())
    assert f"; settings: {settings}.</p>" in with_heads
    first = "Scores are stored as 16-bit logarithmic codes (within 0.05% of each value)"
    assert f"<p>{first}; per-head attention with 8 bits per weight (within 0.2% of each row&#x27;s largest " \
           "weight).</p><p>“Exclude special tokens” leaves out CLS/SEP/BOS-like tokens and renormalises the rest of " \
           "the row to sum 1 over the remaining tokens of all input streams: the shares then are not the model&#x27;s, " \
           "but shares among ordinary tokens.</p><p>Methods computed only after the last layer (flow, by default) " \
           "keep showing that layer when the slider moves.</p>" in with_heads
    assert f"<p>{first}.</p><p>“Exclude special tokens”" in without and "per-head attention with" not in without


def test_prompt_length_and_trace_reach_the_page_and_its_file(tmp_path):
    trace = decoder_trace()
    explanation = attnflow.explain(trace, "raw")
    assert page_data(explanation.to_html(prompt_length=2))[0]["prompt_length"] == 2
    assert page_data(explanation.to_html())[0]["prompt_length"] == 4  # from the trace's metadata
    page = explanation.to_html(trace, path=tmp_path / "p.html")
    data, _ = page_data((tmp_path / "p.html").read_text(encoding="utf-8"))
    assert page_data(page)[0] == data and len(data["layers"]) == trace.num_layers
    with pytest.raises(attnflow.AttnflowError, match="Cannot write the HTML page"):
        explanation.to_html(path=tmp_path)


def test_the_notebook_frame_holds_the_page_exactly():
    page = attnflow.explain(encoder_trace(), "raw").to_html()
    frame = notebook_frame(page)
    match = re.fullmatch(r'<iframe srcdoc="([^"]*)" style="width:100%;height:720px;border:0" '
                         r'title="attnflow explanation"></iframe>', frame, re.S)
    assert match and html.unescape(match.group(1)) == page
    assert "height:300px" in notebook_frame(page, height=300)


def test_log16_codes_at_both_ends_of_the_range_and_for_one_magnitude():
    values = np.array([[1e-13, -1e-13, 0.5], [1.0, 0.0, -1.0]])
    codes, lo, step = encode_log16(values)
    assert codes.dtype == np.uint16 and codes.shape == (2, 3)
    # smallest magnitude: code 1 (positive) / 32769 (negative); largest: 32767 / 65535; zero: 0
    assert codes.tolist()[0][:2] == [1, 32769] and codes.tolist()[1] == [32767, 0, 65535]
    assert lo == pytest.approx(np.log(1e-13)) and step == pytest.approx(-np.log(1e-13) / 32766)
    back = decode_log16(codes, lo, step)
    ends = np.array([[1, 1, 0], [1, 1, 1]], bool)
    np.testing.assert_allclose(back[ends], values[ends], rtol=1e-9)
    assert back[0, 2] == pytest.approx(0.5, rel=step / 2)
    same = np.array([0.25, -0.25, 0.0, 0.25])  # one magnitude: no range to spread over
    codes, lo, step = encode_log16(same)
    np.testing.assert_allclose(decode_log16(codes, lo, step), same, rtol=1e-12)
    codes, lo, step = encode_log16(np.zeros((2, 3)))
    assert codes.dtype == np.uint16 and codes.shape == (2, 3) and not codes.any()
    np.testing.assert_array_equal(decode_log16(codes, lo, step), np.zeros((2, 3)))


def test_u8row_row_maxima_are_float32():
    codes, maxima = encode_u8row(np.array([[0.2, 0.8], [0.0, 0.0], [0.5, 0.25]]))
    assert codes.dtype == np.uint8 and maxima.dtype == np.float32
    assert codes.tolist() == [[64, 255], [0, 0], [255, 128]]
    np.testing.assert_array_equal(maxima, np.float32([0.8, 0.0, 0.5]))


def test_the_data_block_refuses_what_json_parse_cannot_read():
    assert data_block({"a": [1, 2], "b": "x"}) == '{"a":[1,2],"b":"x"}'
    with pytest.raises(ValueError):
        data_block({"lo": float("nan")})
