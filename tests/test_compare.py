"""attnflow.compare, ComparisonReport and the ``attnflow compare`` command line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import attnflow
from attnflow import AttentionTrace, ComparisonError, ComparisonReport, OptionError
from attnflow._compare import spearman
from attnflow.cli import main

# distinct size on every axis: layers 4, batch 2, heads 3, seq 6
LAYERS, BATCH, HEADS, SEQ = 4, 2, 3, 6


def make_trace(seed=0, *, layers=LAYERS, heads=HEADS, seq=SEQ, names=None, tokens=None, pad=True, dtype=np.float32):
    rng = np.random.default_rng(seed)
    mask = np.ones((BATCH, seq), dtype=bool)
    if pad:
        mask[1, seq - 2:] = False
    weights = []
    for _ in range(layers):
        w = rng.dirichlet(np.full(seq, 0.5), size=(BATCH, heads, seq)) * mask[:, None, None, :]
        weights.append((w / w.sum(-1, keepdims=True)).astype(dtype))
    if tokens is None:
        tokens = [[f"t{b}{i}" for i in range(seq)] for b in range(BATCH)]
    return AttentionTrace.from_arrays(
        weights, mask=mask, tokens=tokens, names=names or [f"encoder.layer.{i}.attention.self" for i in range(layers)]
    )


def jittered(trace, scale, seed=1):
    """A copy whose weights move by about ``scale`` (then renormalised), like another framework's rounding."""
    rng = np.random.default_rng(seed)
    layers = []
    for layer in trace.layers:
        w = layer.weights.astype(np.float64) * (1 + scale * rng.standard_normal(layer.weights.shape))
        w = w * trace.mask[:, None, None, :]
        layers.append(dataclasses.replace(layer, weights=(w / w.sum(-1, keepdims=True)).astype(np.float32)))
    return AttentionTrace(layers, mask=trace.mask, tokens=trace.tokens, framework="jax", model_name="port")


def perturb_head(trace, layer_index, head, amount=0.05):
    layers = list(trace.layers)
    w = layers[layer_index].weights.copy()
    w[:, head, :, 0] += amount  # more attention on the first token, rows renormalised
    w[:, head] *= trace.mask[:, None, :]
    w[:, head] /= w[:, head].sum(-1, keepdims=True)
    layers[layer_index] = dataclasses.replace(layers[layer_index], weights=w)
    return AttentionTrace(layers, mask=trace.mask, tokens=trace.tokens)


def test_identical_and_nearly_identical_traces_agree():
    a = make_trace()
    report = attnflow.compare(a, a)
    assert report.ok and bool(report) and report.failing_heads == []
    assert report.attention_max_abs == 0 and report.rollout_max_abs == 0 and report.flow_max_abs == 0
    assert report.spearman == {"rollout": 1.0, "flow": 1.0}
    close = attnflow.compare(a, jittered(a, 1e-6))
    assert close.ok, str(close)
    assert 0 < close.attention_max_abs < 1e-5


def test_a_perturbed_head_is_the_only_failing_head():
    a = make_trace()
    report = attnflow.compare(a, perturb_head(a, 2, 1))
    assert not report.ok
    assert report.failing_heads == [(2, 1)]
    assert [layer.ok for layer in report.layers] == [True, True, False, True]
    assert report.layers[2].heads[1].max_abs > 1e-3
    assert all(h.max_abs == 0 for i, layer in enumerate(report.layers) for h in layer.heads if (i, h.head) != (2, 1))
    # rollout accumulates: layers before the perturbed one agree, from it on they differ
    assert [layer.rollout_max_abs > 1e-5 for layer in report.layers] == [False, False, True, True]
    assert report.first_rollout_failure == 2
    assert report.checks["attention"] is False and report.checks["rollout"] is False
    table = report.to_table()
    assert "FAIL heads [1]" in table and "layer 3 head 1" in table and "DIFFERENT" in table


def test_tolerances_decide_the_verdict():
    a = make_trace()
    b = jittered(a, 1e-3)
    assert not attnflow.compare(a, b).ok
    loose = attnflow.compare(a, b, atol=0.05)
    assert loose.ok and loose.tolerances["rollout_atol"] == 0.05 and loose.tolerances["flow_atol"] == 0.05
    assert not attnflow.compare(a, b, atol=0.05, rollout_atol=1e-9).ok
    assert not attnflow.compare(a, b, atol=0.05, mean_atol=1e-9).checks["attention"]
    bf16 = AttentionTrace(
        [dataclasses.replace(layer, source_dtype="bfloat16") for layer in b.layers], mask=b.mask, tokens=b.tokens
    )
    assert attnflow.compare(a, bf16).tolerances["atol"] == 1e-2  # the less precise dtype sets the default


def test_flow_can_be_skipped_and_sources_chosen():
    a = make_trace()
    b = jittered(a, 1e-6)
    skipped = attnflow.compare(a, b, flow=False)
    assert skipped.flow_max_abs is None and "flow" not in skipped.checks and "flow" not in skipped.spearman
    assert "flow skipped" in skipped.to_table()
    several = attnflow.compare(a, b, flow_sources=[0, -1])
    assert several.sources == [0, -1] and several.flow_max_abs is not None


def test_mismatches_raise_naming_the_first():
    a = make_trace()
    with pytest.raises(ComparisonError, match=r"Layer counts differ: A has 4 .* B has 3"):
        attnflow.compare(a, make_trace(layers=3))
    with pytest.raises(ComparisonError, match=r"Token counts differ: A has 6 tokens, B has 5"):
        attnflow.compare(a, make_trace(seq=5))
    other_heads = AttentionTrace(
        [*a.layers[:2], dataclasses.replace(a.layers[2], weights=a.layers[2].weights[:, :2]), a.layers[3]],
        mask=a.mask, tokens=a.tokens,
    )
    with pytest.raises(ComparisonError, match=r"Layer 2 .*head counts differ, 3 in A and 2 in B"):
        attnflow.compare(a, other_heads)
    tokens = [list(row) for row in a.tokens]
    tokens[1][3] = "other"
    relabelled = AttentionTrace(a.layers, mask=a.mask, tokens=tokens)
    with pytest.raises(ComparisonError, match=r"batch item 1, position 3 is 't13' in A but 'other' in B"):
        attnflow.compare(a, relabelled)
    with pytest.raises(ComparisonError, match="Masks differ"):
        attnflow.compare(a, make_trace(pad=False))
    with pytest.raises(ComparisonError, match="Batch sizes differ"):
        attnflow.compare(a, a.select(0))


def test_align_tokens_ignores_label_differences():
    a = make_trace()
    ids = make_trace(tokens=[[str(100 + i) for i in range(SEQ)]] * BATCH)
    assert attnflow.compare(a, ids, align="tokens").ok
    assert attnflow.compare(a, ids, align="index+tokens").ignore_tokens


def test_align_by_numbers_pairs_torch_and_jax_names():
    a = make_trace()
    jax_names = [f"encoder/layer_{i}/attention" for i in range(LAYERS)]
    b = make_trace(names=jax_names)
    report = attnflow.compare(a, b, align="numbers")
    assert report.ok and [(layer.name_a, layer.name_b) for layer in report.layers][3] == (
        "encoder.layer.3.attention.self", "encoder/layer_3/attention",
    )
    # a trace that captured only some layers: the others are listed, not compared
    subset = AttentionTrace([b.layers[1], b.layers[3]], mask=b.mask, tokens=b.tokens)
    partial = attnflow.compare(a, subset, align="numbers", flow=False)
    assert [layer.name_a for layer in partial.layers] == ["encoder.layer.1.attention.self", "encoder.layer.3.attention.self"]
    assert partial.unmatched_a == ("encoder.layer.0.attention.self", "encoder.layer.2.attention.self")
    assert partial.layers[0].heads[0].max_abs == 0
    assert not partial.ok and partial.checks["layers"] is False  # missing layers are a difference
    allowed = attnflow.compare(a, subset, align="numbers", flow=False, allow_unmatched=True)
    assert "layers" not in allowed.checks and allowed.unmatched_a == partial.unmatched_a


def test_align_by_names():
    a = make_trace(names=[f"encoder/layer_{i}/attention" for i in range(LAYERS)])
    b = make_trace(names=[f"Encoder.Layer.{i}.Attention" for i in range(LAYERS)])
    assert [layer.name_b for layer in attnflow.compare(a, b, align="names").layers] == b.layer_names
    with pytest.raises(ComparisonError, match="pairs no layer"):
        attnflow.compare(a, make_trace(names=[f"x{i}" for i in range(LAYERS)]), align="names")
    with pytest.raises(OptionError, match="not understood"):
        attnflow.compare(a, b, align="fuzzy")


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    for _ in range(20):
        x = rng.integers(0, 5, size=9).astype(float)  # many ties
        y = x + rng.normal(scale=2.0, size=9)
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # a constant array has no ranking: undefined (NaN), as scipy and faithfulness say (one Spearman for both)
    assert np.isnan(spearman([1, 1, 1], [2, 2, 2])) and np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    from attnflow.evaluate import spearman as faithfulness_spearman

    assert faithfulness_spearman is __import__("attnflow._ranks", fromlist=["spearman"]).spearman
    # rounding noise between equal scores is not a reordering once it is below the tie tolerance
    noisy_a, noisy_b = [0.2, 0.2 + 1e-9, 0.2 - 1e-9, 0.4], [0.2 - 1e-9, 0.2, 0.2 + 1e-9, 0.4]
    assert spearman(noisy_a, noisy_b) < 0.5 and spearman(noisy_a, noisy_b, tie_tol=1e-6) == 1.0


def test_constant_scores_make_spearman_undefined_not_failed():
    """Uniform attention without the residual gives every token the same score: no ranking, so the check can neither
    pass nor fail on it."""
    weights = [np.full((2, 3, 5, 5), 0.2) for _ in range(LAYERS)]
    a = AttentionTrace.from_arrays(weights, tokens=[list("abcde")] * 2)
    report = attnflow.compare(a, a, residual=0.0)
    assert all(np.isnan(value) for value in report.spearman.values()) and report.ok
    assert "undefined (constant scores)" in report.to_table()


def test_spearman_check_fails_on_reordered_scores():
    a = make_trace(pad=False)
    b = AttentionTrace([dataclasses.replace(layer, weights=layer.weights[:, :, :, ::-1].copy()) for layer in a.layers],
                       tokens=a.tokens, mask=a.mask)
    report = attnflow.compare(a, b, atol=1.0)  # tolerances wide open: only Spearman can object
    assert report.spearman["rollout"] < 0.95 and not report.checks["spearman"] and not report.ok
    assert attnflow.compare(a, b, atol=1.0, min_spearman=None).ok


def test_report_to_dict_is_json_and_complete():
    a = make_trace()
    report = attnflow.compare(a, perturb_head(a, 0, 2))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["failing_heads"] == [[0, 2]]
    assert len(data["layers"]) == LAYERS and len(data["layers"][0]["heads"]) == HEADS
    assert data["layers"][0]["heads"][2]["ok"] is False and data["layers"][1]["ok"] is True
    assert data["tolerances"]["atol"] == 1e-5 and set(data["spearman"]) == {"rollout", "flow"}
    assert isinstance(report, ComparisonReport) and str(report) == report.to_table()
    assert report.head_matrix().shape == (LAYERS, HEADS)


def test_cli_compare_exit_codes_and_outputs(tmp_path, capsys):
    a = make_trace()
    a.save(tmp_path / "a.safetensors")
    jittered(a, 1e-7).save(tmp_path / "same.safetensors")
    perturb_head(a, 3, 0).save(tmp_path / "bad.safetensors")
    make_trace(layers=2).save(tmp_path / "short.safetensors")

    assert main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "same.safetensors")]) == 0
    assert "verdict: OK" in capsys.readouterr().out

    png, page, js = tmp_path / "diff.png", tmp_path / "diff.html", tmp_path / "report.json"
    code = main([
        "compare", str(tmp_path / "a.safetensors"), str(tmp_path / "bad.safetensors"),
        "--png", str(png), "--html", str(page), "--json", str(js),
    ])
    out = capsys.readouterr().out
    assert code == 1 and "DIFFERENT" in out and "layer 4 head 0" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert "data:image/png;base64," in page.read_text() and "differ beyond tolerance" in page.read_text()
    assert json.loads(js.read_text())["failing_heads"] == [[3, 0]]

    assert main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "bad.safetensors"), "--atol", "1"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "short.safetensors")]) == 1
    assert "Layer counts differ" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "short.safetensors"),
                 "--align", "numbers", "--no-flow"]) == 1
    assert "layers only one trace has" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "short.safetensors"),
                 "--align", "numbers", "--no-flow", "--allow-unmatched"]) == 0


def test_encoder_decoder_traces_compare_per_stream():
    from test_streams import encoder_decoder

    trace, weights, streams, enc_mask, dec_mask = encoder_decoder(np.random.default_rng(40))
    same = attnflow.compare(trace, trace)
    assert same.ok and same.flow_max_abs == 0.0 and set(same.spearman) == {"rollout", "flow"}
    perturbed = [w.copy() for w in weights]
    perturbed[4][:, 1] = np.roll(perturbed[4][:, 1], 1, axis=-1)  # cross layer of decoder block 0, head 1
    perturbed[4] *= np.broadcast_to(enc_mask[:, None, None, :], perturbed[4].shape)
    perturbed[4] /= perturbed[4].sum(-1, keepdims=True)
    other = AttentionTrace.from_arrays(
        perturbed, layer_streams=streams, streams={"encoder": {"mask": enc_mask}, "decoder": {"mask": dec_mask}}
    )
    report = attnflow.compare(trace, other, flow=False)
    assert not report.ok and report.failing_heads == [(4, 1)]
    assert report.layers[3].rollout_max_abs == 0.0 and report.layers[4].rollout_max_abs > 1e-3
    shorter, *_ = encoder_decoder(np.random.default_rng(41), dec_real=(4, 2))
    with pytest.raises(ComparisonError, match="Masks of stream 'decoder' differ"):
        attnflow.compare(trace, shorter, flow=False)


def test_compare_further_methods_from_the_registry():
    """Gradient and value-side methods compared like rollout: equal traces agree, a changed model does not."""
    import copy

    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=13, hidden_size=15, num_hidden_layers=2, num_attention_heads=3,
                                     intermediate_size=11, num_labels=4, max_position_embeddings=16)
    model = transformers.BertForSequenceClassification(config).eval()
    inputs = {"input_ids": torch.randint(0, 13, (2, 7), generator=torch.Generator().manual_seed(1))}
    a = attnflow.capture(model, target=1, values=True, **inputs)
    b = attnflow.capture(model, target=1, values=True, **inputs)
    methods = ["grad_rollout", "norm", "alti"]
    report = attnflow.compare(a, b, methods=methods, flow=False)
    assert report.ok and set(report.methods) == set(methods) and max(report.methods.values()) == 0.0
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.bert.encoder.layer[-1].attention.output.dense.weight.mul_(1.5)  # values change, attention does not
    c = attnflow.capture(changed, target=1, values=True, **inputs)
    report = attnflow.compare(a, c, methods=methods, flow=False)
    assert report.checks["attention"] and not report.checks["methods"] and not report.ok
    expected = np.abs(attnflow.explain(a, ["norm"])["norm"] - attnflow.explain(c, ["norm"])["norm"]).max()
    assert report.methods["norm"] == pytest.approx(expected) and report.methods["norm"] > 1e-3
    assert "methods max|diff|" in report.to_table() and report.to_dict()["methods"]["alti"] > 0
    with pytest.raises(attnflow.MethodError, match="needs 'attn_grad'"):
        attnflow.compare(attnflow.capture(model, **inputs), a, methods=["grad_rollout"], flow=False)
