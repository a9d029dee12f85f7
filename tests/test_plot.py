"""attnflow.plot: every view draws exactly the explanation's (or trace's) numbers, with the settings it says."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from plot_traces import decoder_trace, encoder_trace, renormalised, seq2seq_trace  # noqa: E402

import attnflow  # noqa: E402
from attnflow import plot  # noqa: E402
from attnflow.plot._figure import MAX_INCHES, MAX_LABELS  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    trace = encoder_trace()
    return trace, attnflow.explain(trace)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    matplotlib.pyplot.close("all")


def heading(figure):
    return " ".join(figure._suptitle.get_text().split())


def images(figure):
    return [ax.images[0] for ax in figure.axes if ax.images]


def test_heatmap_draws_each_methods_scores_on_one_scale(encoder):
    trace, explanation = encoder
    figure = plot.heatmap(explanation, ["raw", "rollout", "flow"], batch_index=1)
    drawn = images(figure)
    assert len(drawn) == 3
    real = np.flatnonzero(trace.mask[1])  # item 1 is padded: only its 9 real tokens are drawn
    for image, method in zip(drawn, ["raw", "rollout", "flow"]):
        expected = explanation[method][1][np.ix_(real, real)]
        np.testing.assert_allclose(np.asarray(image.get_array()), expected, atol=1e-12)
    tops = {(image.norm.vmin, image.norm.vmax) for image in drawn}
    largest = max(float(explanation[m][1][np.ix_(real, real)].max()) for m in ("raw", "rollout", "flow"))
    assert len(tops) == 1 and next(iter(tops)) == (0.0, pytest.approx(largest))
    text = heading(figure)
    assert "after layer 3 of 3" in text and "paper defaults" in text and "special tokens" not in text


def test_heatmap_own_scales_log_and_limits(encoder):
    _, explanation = encoder
    own = images(plot.heatmap(explanation, ["raw", "flow"], shared_scale=False))
    assert own[0].norm.vmax != own[1].norm.vmax
    assert own[0].norm.vmax == pytest.approx(explanation["raw"][0].max())
    logged = images(plot.heatmap(explanation, "rollout", log=True, vmin=1e-3, vmax=0.5))[0]
    assert isinstance(logged.norm, LogNorm) and (logged.norm.vmin, logged.norm.vmax) == (1e-3, 0.5)
    with pytest.raises(attnflow.OptionError, match="vmin"):
        plot.heatmap(explanation, "rollout", vmin=0.5, vmax=0.1)
    with pytest.raises(attnflow.OptionError, match="log scale needs vmin > 0"):
        plot.heatmap(explanation, "rollout", log=True, vmin=0.0)
    with pytest.raises(attnflow.OptionError, match="dpi"):
        plot.heatmap(explanation, "rollout", dpi=0)


def test_exclude_special_renormalises_and_says_so(encoder):
    trace, explanation = encoder
    figure = plot.heatmap(explanation, "rollout", exclude_special=True)
    shown = np.asarray(images(figure)[0].get_array())
    ordinary = ~trace.special[0]
    full = explanation["rollout"][0]
    expected = np.stack([renormalised(full[i], ordinary) for i in np.flatnonzero(ordinary)])
    np.testing.assert_allclose(shown, expected, atol=1e-12)
    np.testing.assert_allclose(shown.sum(axis=1), 1.0, atol=1e-12)
    assert "special tokens excluded, rows renormalised" in heading(figure)


def test_layer_picks_the_scores_after_that_layer(encoder):
    _, explanation = encoder
    shown = np.asarray(images(plot.heatmap(explanation, "rollout", layer=1))[0].get_array())
    np.testing.assert_allclose(shown, explanation.layers("rollout")[1, 0], atol=1e-12)
    with pytest.raises(attnflow.OptionError, match="computed after the layers \\[2\\]"):
        plot.heatmap(explanation, "flow", layer=0)
    with pytest.raises(attnflow.OptionError, match="holds"):
        plot.heatmap(explanation, "nonsense")


def test_long_inputs_stay_within_the_size_cap_with_thinned_labels():
    rng = np.random.default_rng(3)
    n = 300
    weights = [np.exp(rng.standard_normal((1, 1, n, n))) for _ in range(2)]
    weights = [w / w.sum(-1, keepdims=True) for w in weights]
    trace = attnflow.AttentionTrace.from_arrays(weights, tokens=[[f"tok{i}" for i in range(n)]])
    explanation = attnflow.explain(trace, ["raw", "rollout"])
    for figure in (plot.heatmap(explanation), plot.token_bars(explanation), plot.text_highlight(explanation)):
        width, height = figure.get_size_inches()
        assert width <= MAX_INCHES[0] + 1e-9 and height <= MAX_INCHES[1] + 1e-9
    figure = plot.heatmap(explanation)
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert 1 < len(labels) <= MAX_LABELS and labels[0] == "tok0"


def test_token_bars_are_the_explained_tokens_scores(encoder):
    trace, explanation = encoder
    figure = plot.token_bars(explanation, ["rollout", "flow"], source="keys")
    position = trace.tokens[0].index("keys")
    for ax, method in zip(figure.axes, ["rollout", "flow"]):
        widths = [patch.get_width() for patch in ax.patches]
        np.testing.assert_allclose(widths, explanation[method][0, position], atol=1e-12)
    assert figure.axes[0].get_xlim() == figure.axes[1].get_xlim()  # one shared score axis
    assert "what 'keys' draws on" in heading(figure)
    with pytest.raises(attnflow.OptionError, match="No explained token reads 'door'"):
        plot.token_bars(explanation, source="door")


def test_text_highlight_colours_each_token_by_its_score(encoder):
    trace, explanation = encoder
    figure = plot.text_highlight(explanation, "rollout", source=2, exclude_special=True, cmap="Reds")
    texts = [t for t in figure.axes[0].texts if (t.get_gid() or "").startswith("token-")]
    ordinary = ~trace.special[0]
    expected = renormalised(explanation["rollout"][0, 2], ordinary)
    assert [t.get_text() for t in texts] == ["the", "keys", "to", "the", "cab", "inet", "are", "on", "the", "table", "."]
    colours = matplotlib.colormaps["Reds"]
    top = expected.max()
    for t, value in zip(texts, expected):
        np.testing.assert_allclose(t.get_bbox_patch().get_facecolor(), colours(value / top), atol=1e-9)
    boxed = [t.get_text() for t in texts if t.get_bbox_patch().get_linewidth() > 0]
    assert boxed == ["keys"]  # the explained token
    # the word cabinet is not split across lines, and "##" joins it without a space
    lines = plot._tokens._layout([("ab", True)] * 30 + [("cab", True), ("inet", False)], 20)
    assert all(sum(len(text) for _, _, text in line) <= 20 for line in lines)
    assert [text for _, _, text in lines[-1]][-2:] == ["cab", "inet"]


def test_head_grid_shows_every_head_of_a_layer(encoder):
    trace, _ = encoder
    figure = plot.head_grid(trace, 1, batch_index=1)
    drawn = images(figure)
    real = np.flatnonzero(trace.mask[1])
    assert len(drawn) == 2
    for h, image in enumerate(drawn):
        np.testing.assert_allclose(np.asarray(image.get_array()), trace.layers[1].weights[1, h][np.ix_(real, real)])
    assert len({image.norm.vmax for image in drawn}) == 1
    grid = plot.head_grid(trace)
    assert len(images(grid)) == 3 * 2


def test_flow_paths_are_a_valid_flow_decomposition(encoder):
    trace, _ = encoder
    found = plot.flow_paths(trace, source=0, top_k=1000)
    graph = found.graph
    capacity = {edge.tuple: edge["capacity"] for edge in graph.es}
    used: dict[tuple[int, int], float] = {}
    for width, path in found.paths:
        chain = path
        assert path[0] == found.source
        assert graph.vs[path[-1]]["input"]
        for edge in zip(chain, chain[1:]):
            assert edge in capacity  # every step is an edge of the network
            used[edge] = used.get(edge, 0.0) + width
    assert all(used[e] <= capacity[e] + 1e-9 for e in used)
    # all paths together carry the whole maximum flow, and it reaches the inputs as `received` says
    assert sum(w for w, _ in found.paths) == pytest.approx(found.total, abs=1e-9)
    assert sum(found.received.values()) == pytest.approx(found.total, abs=1e-9)
    # no input token gets more than its own max-flow (attnflow.flow), and the joint flow is at least the largest
    single = attnflow.flow(trace, sources=[0], normalize=False)[0, 0]
    for vertex, amount in found.received.items():
        assert amount <= single[graph.vs[vertex]["position"]] + 1e-9
    assert found.total >= single.max() - 1e-9
    widths = [w for w, _ in found.paths]
    assert widths == sorted(widths, reverse=True)


def test_flow_graph_draws_the_top_paths(encoder):
    trace, _ = encoder
    figure = plot.flow_graph(trace, source=-1, top_k=4, batch_index=1)
    lines = [line for line in figure.axes[0].lines if not line.get_label().startswith("_")]
    assert len(lines) == 4
    assert "attention flow paths from 'L3:[SEP]'" in heading(figure)
    kept = plot.flow_graph(trace, top_k=50, exclude_special=True)
    labels = [line.get_label() for line in kept.axes[0].lines if not line.get_label().startswith("_")]
    assert labels and not any("[CLS]" in label or "[SEP]" in label for label in labels)
    assert "renormalised" in heading(kept)
    with pytest.raises(attnflow.OptionError, match="top_k"):
        plot.flow_paths(trace, top_k=0)


def test_generation_map_rows_are_generated_tokens_over_the_prompt():
    trace = decoder_trace()
    explanation = attnflow.explain(trace, ["raw", "rollout"])
    figure = plot.generation_map(explanation, "rollout")  # prompt_length from the trace's metadata: 4
    shown = np.asarray(images(figure)[0].get_array())
    np.testing.assert_allclose(shown, explanation["rollout"][0][4:, :4], atol=1e-12)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["Ġon", "Ġthe", "Ġmat", "."]
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["<s>", "Ġthe", "Ġcat", "Ġsat"]
    wide = np.asarray(images(plot.generation_map(explanation, "rollout", prompt_length=3, include_generated=True))[0]
                      .get_array())
    np.testing.assert_allclose(wide, explanation["rollout"][0][3:, :], atol=1e-12)
    with pytest.raises(attnflow.OptionError, match="not causal"):
        plot.generation_map(attnflow.explain(encoder_trace(), "raw"), prompt_length=3)
    with pytest.raises(attnflow.OptionError, match="prompt_length must be between 1 and 7"):
        plot.generation_map(explanation, prompt_length=8)


def test_encoder_decoder_map_is_decoder_by_encoder():
    trace = seq2seq_trace()
    explanation = attnflow.explain(trace, ["rollout", "flow"])
    figure = plot.encoder_decoder_map(explanation)
    for image, method in zip(images(figure), ["rollout", "flow"]):
        np.testing.assert_allclose(np.asarray(image.get_array()), explanation.scores(method, "encoder")[0], atol=1e-12)
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["[CLS]", "das", "ist", "ein", "test", "[SEP]"]
    with pytest.raises(attnflow.OptionError, match="draws on no other stream"):
        plot.encoder_decoder_map(attnflow.explain(encoder_trace(), "raw"))


def test_save_writes_png_svg_and_pdf_with_text_kept_as_text(encoder, tmp_path):
    _, explanation = encoder
    figure = plot.text_highlight(explanation, "rollout")
    written = plot.save(figure, tmp_path / "text", formats="png,svg,pdf", dpi=80)
    assert [p.name for p in written] == ["text.png", "text.svg", "text.pdf"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written[2].read_bytes()[:5] == b"%PDF-"
    assert "cabinet" not in written[1].read_text() and ">keys<" in written[1].read_text()
    assert plot.save(figure, tmp_path / "one.svg")[0].name == "one.svg"
    with pytest.raises(attnflow.OptionError, match="choose from png, svg, pdf"):
        plot.save(figure, tmp_path / "x", formats="png,gif")
