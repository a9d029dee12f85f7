"""attnflow.plot labels what it shows (issue 23, point 5): an encoder-decoder flow graph labels each stream
with its own tokens and says what the decoder's rows are; repeated tokens carry their positions; one
title per picture. Read back from the Figure objects."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from plot_traces import encoder_trace, seq2seq_trace  # noqa: E402

import attnflow  # noqa: E402
from attnflow import plot  # noqa: E402
from attnflow.plot._figure import positioned  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    matplotlib.pyplot.close("all")


def ticks(axis):
    return [t.get_text() for t in axis.get_ticklabels()]


def titles(figure):
    """Every title text in the figure: the suptitle and each axes' (non-empty) title."""
    found = [figure._suptitle.get_text()] if figure._suptitle is not None else []
    return found + [ax.get_title() for ax in figure.axes if ax.get_title()]


def test_encoder_decoder_flow_graph_labels_each_stream_with_its_own_tokens():
    trace = seq2seq_trace()
    figure = plot.flow_graph(trace, stream="decoder", source=-1, top_k=5)
    left, right = figure.axes[0], figure.axes[1]
    assert ticks(left.yaxis) == ["[CLS]", "das", "ist", "ein", "test", "[SEP]"]
    assert ticks(right.yaxis)[:4] == ["<s>", "this", "is", "a"] and not any(ticks(right.yaxis)[4:])
    assert left.get_ylabel() == "encoder token"
    assert right.get_ylabel() == "decoder: input token at each position"
    predicted = plot.flow_graph(trace, stream="decoder", source=-1, top_k=5, predicted=["this", "is", "a", "test"])
    assert ticks(predicted.axes[1].yaxis)[:4] == ["this", "is", "a", "test"]
    assert predicted.axes[1].get_ylabel() == "decoder: the token each position predicts"
    with pytest.raises(attnflow.OptionError, match="one predicted token per position"):
        plot.flow_graph(trace, stream="decoder", predicted=["x"])


def test_repeated_tokens_carry_their_positions_everywhere():
    trace = encoder_trace()
    explanation = attnflow.explain(trace, ["raw", "rollout"])
    expected = ["[CLS]", "the₁", "keys", "to", "the₄", "cab", "##inet", "are", "on", "the₉", "table", ".", "[SEP]"]
    assert ticks(plot.heatmap(explanation).axes[0].xaxis) == expected
    assert ticks(plot.heatmap(explanation).axes[0].yaxis) == expected
    assert ticks(plot.token_bars(explanation).axes[0].yaxis) == expected
    assert ticks(plot.flow_graph(trace, top_k=3).axes[0].yaxis) == expected
    assert ticks(plot.head_grid(trace, 0).axes[0].yaxis) == expected
    legend = [line.get_label() for line in plot.flow_graph(trace, top_k=50).axes[0].lines]
    assert not any(label.endswith("→ the") for label in legend)
    # positions of the shown tokens, not of the list: special tokens left out keep "the₁"
    assert ticks(plot.heatmap(explanation, exclude_special=True).axes[0].xaxis)[:1] == ["the₁"]
    assert positioned(["a", "b", "a"], [5, 6, 17]) == ["a₅", "b", "a₁₇"]


def test_one_panel_pictures_have_a_single_title():
    explanation = attnflow.explain(encoder_trace(), ["raw", "rollout"])
    for figure in (plot.heatmap(explanation, "rollout"), plot.token_bars(explanation, "rollout")):
        assert len(titles(figure)) == 1 and "rollout" in titles(figure)[0]
    both = plot.heatmap(explanation)
    assert len([ax for ax in both.axes if ax.get_title()]) == 2  # two panels: each names its method
