"""explain(), Explanation and the method registry (built-ins and third-party methods alike)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

import attnflow
from attnflow import AttentionTrace, Method, MethodError, OptionError, Options, TraceFileError
from attnflow.methods import _registry

# distinct sizes: layers 4, batch 2, heads 3, seq 6
LAYERS, BATCH, HEADS, SEQ = 4, 2, 3, 6


def sample_trace(seed=0, tokens=None):
    rng = np.random.default_rng(seed)
    weights = [rng.dirichlet(np.full(SEQ, 0.5), size=(BATCH, HEADS, SEQ)) for _ in range(LAYERS)]
    for w in weights:  # item 1 has 5 real tokens
        w[1, :, :, 5] = 0
        w[1] /= w[1].sum(-1, keepdims=True)
    mask = np.ones((BATCH, SEQ), bool)
    mask[1, 5] = False
    labels = tokens or [["[CLS]", "play", "##ing", "dog", "##s", "[SEP]"], ["[CLS]", "un", "##til", "now", "[SEP]", "[PAD]"]]
    special = np.array([[1, 0, 0, 0, 0, 1], [1, 0, 0, 0, 1, 0]], bool)
    return AttentionTrace.from_arrays(weights, mask=mask, tokens=labels, special=special)


@pytest.fixture
def fresh_methods():
    with _registry.METHODS.fresh():
        yield


def test_explain_equals_the_functions():
    trace = sample_trace()
    options = Options(residual=0.3, head_fusion="max")
    e = attnflow.explain(trace, ["raw", "rollout", "flow"], sources=[0, -1], options=options)
    rollout = attnflow.rollout(trace, residual=0.3, head_fusion="max", all_layers=True)
    flow = attnflow.flow(trace, residual=0.3, head_fusion="max", sources=[0, -1])
    np.testing.assert_allclose(e["flow"], flow, atol=0)
    assert e.layers("rollout").shape == (LAYERS, BATCH, 2, SEQ) and e.layer_indices("flow") == (LAYERS - 1,)
    np.testing.assert_allclose(e.layers("rollout")[:, 0, 0], rollout[:, 0, 0], atol=0)
    np.testing.assert_allclose(e.layers("rollout")[:, 1, 1], rollout[:, 1, 4], atol=0)  # -1 of item 1 is position 4
    raw_last = attnflow.raw(trace, -1, head_fusion="max")
    np.testing.assert_allclose(e["raw"][:, 0], raw_last[:, 0], atol=0)
    assert e.sources.tolist() == [[0, 5], [0, 4]] and e.source_tokens(1) == ["[CLS]", "[SEP]"]
    every = attnflow.explain(trace, "flow", sources=[0], all_layers=True)
    np.testing.assert_allclose(every.layers("flow")[:, :, 0], attnflow.flow(trace, sources=[0], all_layers=True)[:, :, 0])
    assert attnflow.list_methods()[:3] == ("raw", "rollout", "flow")


def test_encoder_decoder_explanation_is_keyed_by_input_stream():
    from test_streams import encoder_decoder

    trace, *_ = encoder_decoder(np.random.default_rng(3))
    e = attnflow.explain(trace, ["raw", "rollout", "flow"], sources=[-1])
    assert set(e["rollout"]) == {"encoder", "decoder"} and e.input_streams == ["encoder", "decoder"]
    np.testing.assert_allclose(e["rollout"]["encoder"][:, 0], attnflow.rollout(trace)["encoder"][[0, 1], [3, 2]])
    assert e.layers("raw")["encoder"].shape == (4, 2, 1, 7)
    # raw's self layers have no encoder columns, its cross layers no decoder columns
    assert not e.layers("raw")["encoder"][0].any() and not e.layers("raw")["decoder"][1].any()


def test_save_load_round_trip_and_damage(tmp_path):
    e = attnflow.explain(sample_trace(), sources=[0], options=Options(layers=(1, 4), heads={0: [2, 0]}))
    path = tmp_path / "e.safetensors"
    attnflow.save(e, path)
    loaded = attnflow.load(path)
    assert isinstance(loaded, attnflow.Explanation) and loaded.methods == e.methods
    assert loaded.options == e.options and loaded.options.layers == (1, 4)
    for method in e.methods:
        np.testing.assert_array_equal(loaded.layers(method), e.layers(method))
        assert loaded.layer_indices(method) == e.layer_indices(method)
    assert loaded.tokens() == e.tokens() and loaded.source_tokens(0) == ["[CLS]"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFileError, match="checksum"):
        attnflow.load(path)


def test_words_are_summed_from_subword_conventions_and_word_ids():
    e = attnflow.explain(sample_trace(), ["rollout"], sources=[0])
    words = e.aggregate("words")
    assert words.tokens() == [["[CLS]", "playing", "dogs", "[SEP]"], ["[CLS]", "until", "now", "[SEP]"]]
    r = e["rollout"]
    expected0 = [r[0, 0, 0], r[0, 0, 1] + r[0, 0, 2], r[0, 0, 3] + r[0, 0, 4], r[0, 0, 5]]
    np.testing.assert_allclose(words["rollout"][0, 0], expected0, atol=1e-15)
    np.testing.assert_allclose(words["rollout"][1, 0], [r[1, 0, 0], r[1, 0, 1] + r[1, 0, 2], r[1, 0, 3], r[1, 0, 4]])
    assert words.source_tokens(0) == ["[CLS]"]
    by_ids = e.aggregate("words", word_ids=[[None, 0, 1, 1, 1, None], [None, 0, 0, 0, None, None]])
    np.testing.assert_allclose(by_ids["rollout"][0, 0, :3], [r[0, 0, 0], r[0, 0, 1], r[0, 0, 2:5].sum()])
    sentencepiece = sample_trace(tokens=[["<s>", "▁play", "ing", "▁dog", "s", "</s>"]] * 2)
    pieces = attnflow.explain(sentencepiece, ["rollout"], sources=[0]).aggregate("words")
    assert pieces.tokens()[0] == ["<s>", "playing", "dogs", "</s>"]
    with pytest.raises(OptionError, match="'words'"):
        e.aggregate("sentences")


def test_heads_selection_is_per_head_rollout():
    trace = sample_trace(1)
    picked = attnflow.rollout(trace, heads={0: [2], 3: [0, 1]})
    replaced = [layer.weights for layer in trace.layers]
    replaced[0] = replaced[0][:, [2]]
    replaced[3] = replaced[3][:, [0, 1]]
    expected = attnflow.rollout(AttentionTrace.from_arrays(replaced, mask=trace.mask))
    np.testing.assert_allclose(picked, expected, atol=1e-14)
    one_head = attnflow.explain(trace, ["rollout"], options=Options(heads=1))
    single = AttentionTrace.from_arrays([layer.weights[:, [1]] for layer in trace.layers], mask=trace.mask)
    np.testing.assert_allclose(one_head["rollout"], attnflow.rollout(single), atol=1e-14)
    with pytest.raises(OptionError, match="heads \\[3\\] out of range"):
        attnflow.rollout(trace, heads=[3])


class Uniform(attnflow.LayerMethod):
    """A method of a third party, on the kit: uniform scores over the real input tokens (padded rows and
    columns stay 0, as every method's do; attnflow.testing.check_method holds it to that)."""

    name = "uniform"
    row_sum = "one"

    def layer_scores(self, trace, layer, item, options):
        q = trace.valid_index(item, trace.layers[layer].query_stream).size
        k = trace.valid_index(item, trace.layers[layer].key_stream).size
        return np.full((q, k), 1.0 / k)


class NeedsGrads(Uniform):
    name = "needs_grads"
    needs = ("weights", "attn_grad")


def test_third_party_method_registers_like_a_builtin(fresh_methods):
    attnflow.register_method(Uniform)
    e = attnflow.explain(sample_trace(), ["uniform", "rollout"], sources=[0])
    np.testing.assert_allclose(e["uniform"][1, 0, :5], 0.2)
    with pytest.raises(MethodError, match="already registered"):
        attnflow.register_method(Uniform)
    attnflow.register_method(NeedsGrads)
    with pytest.raises(MethodError, match=r"needs 'attn_grad'.*target="):
        attnflow.explain(sample_trace(), ["needs_grads"])
    with pytest.raises(OptionError, match="gives no edge weights"):
        attnflow.explain(sample_trace(), ["rollout"], options=Options(weights="uniform"))
    with pytest.raises(OptionError, match="No method named 'nope'.*rollout"):
        attnflow.explain(sample_trace(), ["nope"])


def test_bad_methods_are_refused_naming_the_definition(fresh_methods):
    class NoName(Uniform):
        name = "has space"

    with pytest.raises(MethodError, match="NoName.name"):
        attnflow.register_method(NoName)

    class BadNeeds(Uniform):
        name = "bad_needs"
        needs = ("attn_grad",)

    with pytest.raises(MethodError, match="including 'weights'"):
        attnflow.register_method(BadNeeds)

    class BadSignature(Method):
        name = "bad_signature"

        def compute(self, trace, options):  # type: ignore[override]
            return {}

    with pytest.raises(MethodError, match=r"lacks \['stream', 'sources', 'all_layers'\]"):
        attnflow.register_method(BadSignature)
    with pytest.raises(MethodError, match="not a subclass"):
        attnflow.register_method(dict)


def test_entry_point_methods(fresh_methods, tmp_path, monkeypatch):
    info = tmp_path / "attnflow_fake_methods-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: attnflow_fake_methods\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[attnflow.methods]\nconstant = fake_methods_mod:Constant\nrollout = fake_methods_mod:Shadow\n"
        "broken = fake_methods_mod:Broken\n"
    )
    (tmp_path / "fake_methods_mod.py").write_text(textwrap.dedent("""
        import numpy as np
        import attnflow

        class Constant(attnflow.Method):
            name = "constant"
            def compute(self, trace, options, *, stream, sources, all_layers):
                rows = trace.streams[stream].length if sources is None else len(sources)
                return {stream: np.full((1, trace.batch_size, rows, trace.streams[stream].length), 0.5)}

        class Shadow(Constant):
            name = "rollout"

        class Broken(attnflow.Method):
            name = "broken"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning) as caught:
        names = attnflow.list_methods()
    messages = " | ".join(str(w.message) for w in caught)
    assert "constant" in names and "broken" not in names and "built-in" in messages
    assert type(attnflow.get_method("rollout")).__module__ == "attnflow.methods._builtin"
    assert attnflow.explain(sample_trace(), ["constant"])["constant"][0, 0, 0] == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head_fusion": "median"}, "head_fusion"),
        ({"residual": 2}, "residual"),
        ({"heads": "all"}, "heads"),
        ({"heads": {0: []}}, "non-empty"),
        ({"heads": [1, 1]}, "twice"),
        ({"flow_solver": "fast"}, "flow_solver"),
        ({"max_seconds": float("nan")}, "max_seconds"),
        ({"normalize": "yes"}, "normalize"),
    ],
)
def test_options_are_validated(kwargs, message):
    with pytest.raises(OptionError, match=message):
        Options(**kwargs)


def test_options_round_trip_through_dicts():
    for options in (Options(), Options(layers=(1, 3)), Options(layers=[0, 2]), Options(layers=slice(1, None)),
                    Options(heads={1: [0, 2]}), Options(heads=[1], weights="attention", normalize=False)):
        assert Options.from_dict(options.to_dict()) == options
    assert Options().replace(residual=0.2).residual == 0.2
    with pytest.raises(OptionError, match="no settings"):
        Options().replace(colour="red")
