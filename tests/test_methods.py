"""The methods beyond raw attention, each against an implementation written here from its paper.

The references take the model's own eager attention and hidden states (``output_attentions``,
``output_hidden_states``) and its parameters, and recompute every quantity with the papers' formulas, so
they share nothing with attnflow's capture hooks or its method code. Sizes differ on every axis: batch 2,
tokens 7 (item 1 has 5 real), heads 3, head size 5 (hidden 15), layers 3, feed-forward 11, vocabulary 13.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers

import attnflow
from attnflow import AttentionTrace, LayerAttention, MethodError, Options

BATCH, TOKENS, HEADS, HEAD, LAYERS, FFN, VOCAB, CLASSES = 2, 7, 3, 5, 3, 11, 13, 4
HIDDEN = HEADS * HEAD
TOL = 1e-5


def inputs(left=False):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    if left:
        mask[1, :2] = 0
    else:
        mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def bert_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, num_labels=CLASSES, initializer_range=0.4, max_position_embeddings=16,
    )
    return transformers.BertForSequenceClassification(config).eval()


def gpt2_lm():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                                     n_positions=16, initializer_range=0.4)
    return transformers.GPT2LMHeadModel(config).eval()


def llama_lm():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=24, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=16, initializer_range=0.4,
    )
    return transformers.LlamaForCausalLM(config).eval()


def eager(model, kwargs, *, grad_target=None):
    """The model's own attention and hidden states under eager; with ``grad_target(output)``, the gradient of
    that score with respect to each attention map too (autograd, retain_grad)."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    out = reference(**kwargs, output_attentions=True, output_hidden_states=True)
    grads = None
    if grad_target is not None:
        for a in out.attentions:
            a.retain_grad()
        grad_target(out).backward()
        grads = [a.grad.detach().double().numpy() for a in out.attentions]
    return reference, [a.detach().double().numpy() for a in out.attentions], \
        [h.detach().double().numpy() for h in out.hidden_states], grads


def real(mask, b):
    return np.flatnonzero(mask[b].numpy())


def np_params(module):
    return {name: p.detach().double().numpy() for name, p in module.named_parameters()}


def layer_norm(z, weight, bias, eps):
    return (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + eps) * weight + bias


# -- references written from the papers ------------------------------------------------------------------------
def bert_blocks(model, kwargs):
    """Per layer and item of a BERT: attention, values f^h(x_j) = (x_j W_V^h + b_V^h) W_O^h, the layer input x,
    the norm's parameters, over the item's real tokens."""
    reference, attentions, hidden, _ = eager(model, kwargs)
    blocks = []
    for li, layer in enumerate(reference.bert.encoder.layer):
        p_self, p_out = np_params(layer.attention.self), np_params(layer.attention.output)
        per_item = []
        for b in range(BATCH):
            keep = real(kwargs["attention_mask"], b)
            x = hidden[li][b][keep]
            v = x @ p_self["value.weight"].T + p_self["value.bias"]  # (n, HIDDEN)
            w_o = p_out["dense.weight"].T  # rows: heads x head size
            f = np.stack([v[:, h * HEAD:(h + 1) * HEAD] @ w_o[h * HEAD:(h + 1) * HEAD] for h in range(HEADS)])
            a = attentions[li][b][:, keep][:, :, keep]
            per_item.append({
                "a": a, "f": f, "x": x, "b_o": p_out["dense.bias"], "gamma": p_out["LayerNorm.weight"],
                "beta": p_out["LayerNorm.bias"], "eps": layer.attention.output.LayerNorm.eps,
            })
        blocks.append(per_item)
    return blocks


def kobayashi_norm(block):
    """‖Σ_h α^h_ij f^h(x_j)‖ (Kobayashi et al., 2020)."""
    return np.linalg.norm(np.einsum("hij,hjd->ijd", block["a"], block["f"]), axis=-1)


def alti_shares(block):
    """T_i(x_j) and y_i for a post-LN block, with the norm's exact statistics (Ferrando et al., 2022)."""
    n = block["x"].shape[0]
    moved = np.einsum("hij,hjd->ijd", block["a"], block["f"])
    z = moved.copy()
    z[np.arange(n), np.arange(n)] += block["x"]
    z_total = block["x"] + moved.sum(1) + block["b_o"]  # the norm's input
    sigma = np.sqrt(z_total.var(-1) + block["eps"])
    shares = (z - z.mean(-1, keepdims=True)) * block["gamma"] / sigma[:, None, None]
    y = layer_norm(z_total, block["gamma"], block["beta"], block["eps"])
    return shares, y


def alti_matrix(block):
    shares, y = alti_shares(block)
    c = np.maximum(0.0, np.abs(y).sum(-1)[:, None] - np.abs(y[:, None] - shares).sum(-1))
    return c / c.sum(-1, keepdims=True)


def chefer_relevance(attentions, grads, keep, b):
    r = np.eye(keep.size)
    for a, g in zip(attentions, grads):
        cam = np.maximum(g[b][:, keep][:, :, keep] * a[b][:, keep][:, :, keep], 0).mean(0)
        r = r + cam @ r
    return r


# -- tests ---------------------------------------------------------------------------------------------------------
def target_class(out):
    return out.logits[:, 2].sum()


def test_gradients_equal_autograd_and_leave_parameters_alone():
    model = bert_classifier()
    kwargs = inputs()
    with torch.no_grad():  # autograd is switched on for the capture all the same
        trace = attnflow.capture(model, target=2, **kwargs)
    assert all(p.grad is None for p in model.parameters())  # the capture leaves no gradients behind
    _, attentions, _, grads = eager(model, kwargs, grad_target=target_class)
    for layer, grad in zip(trace.layers, grads):
        np.testing.assert_allclose(layer.extras["attn_grad"], grad, atol=1e-7)
    # target=None: each item's argmax; a callable: anything
    argmax = model(**kwargs).logits.argmax(-1)
    by_argmax = attnflow.capture(model, target=None, **kwargs)
    _, _, _, expected = eager(model, kwargs, grad_target=lambda out: out.logits.gather(1, argmax[:, None]).sum())
    np.testing.assert_allclose(by_argmax.layers[-1].extras["attn_grad"], expected[-1], atol=1e-7)
    by_callable = attnflow.capture(model, target=target_class, **kwargs)
    np.testing.assert_allclose(by_callable.layers[0].extras["attn_grad"], grads[0], atol=1e-7)


def test_decoder_gradients_read_each_items_last_real_token():
    model = gpt2_lm()
    kwargs = inputs(left=True)
    trace = attnflow.capture(model, target=5, **kwargs)
    last = [TOKENS - 1, TOKENS - 1]  # left padding: every item's last real token is the last position
    _, _, _, grads = eager(model, kwargs, grad_target=lambda out: out.logits[[0, 1], last, 5].sum())
    np.testing.assert_allclose(trace.layers[1].extras["attn_grad"], grads[1], atol=1e-7)
    right = inputs()
    trace = attnflow.capture(model, target=5, **right)
    _, _, _, grads = eager(model, right, grad_target=lambda out: out.logits[[0, 1], [6, 4], 5].sum())
    np.testing.assert_allclose(trace.layers[0].extras["attn_grad"], grads[0], atol=1e-7)


def test_grad_rollout_and_attn_grad_follow_chefer():
    model = bert_classifier()
    kwargs = inputs()
    trace = attnflow.capture(model, target=2, **kwargs)
    _, attentions, _, grads = eager(model, kwargs, grad_target=target_class)
    e = attnflow.explain(trace, ["grad_rollout", "attn_grad"], sources=[0], all_layers=True)
    for b in range(BATCH):
        keep = real(kwargs["attention_mask"], b)
        expected = chefer_relevance(attentions, grads, keep, b)[0]
        np.testing.assert_allclose(e["grad_rollout"][b, 0, keep], expected, atol=1e-9)
        assert not e["grad_rollout"][b, 0][np.setdiff1d(np.arange(TOKENS), keep)].any()  # 0 on padding
        cam = np.maximum(grads[1][b][:, keep][:, :, keep] * attentions[1][b][:, keep][:, :, keep], 0).mean(0)
        np.testing.assert_allclose(e.layers("attn_grad")[1, b, 0, keep], cam[0], atol=1e-12)
    assert e["grad_rollout"][0, 0, 0] > 1.0  # unnormalised, the token itself included


def test_norm_and_alti_equal_the_papers_formulas_and_the_decomposition_holds():
    from attnflow.methods._contributions import decomposition_identity

    model = bert_classifier()
    kwargs = inputs()
    trace = attnflow.capture(model, values=True, **kwargs)
    blocks = bert_blocks(model, kwargs)
    e = attnflow.explain(trace, ["norm", "norm_residual", "alti"], all_layers=True)
    for b in range(BATCH):
        keep = real(kwargs["attention_mask"], b)
        joint = np.eye(keep.size)
        for li in range(LAYERS):
            block = blocks[li][b]
            np.testing.assert_allclose(e.layers("norm")[li, b][np.ix_(keep, keep)], kobayashi_norm(block), atol=TOL)
            shares, y = alti_shares(block)
            np.testing.assert_allclose(e.layers("norm_residual")[li, b][np.ix_(keep, keep)],
                                       np.linalg.norm(shares, axis=-1), atol=TOL)
            joint = alti_matrix(block) @ joint
            np.testing.assert_allclose(e.layers("alti")[li, b][np.ix_(keep, keep)], joint, atol=TOL)
            total, output = decomposition_identity(trace, li, b)
            np.testing.assert_allclose(total, output, atol=TOL)  # Σ_j T_i(x_j) + bias terms = the norm's output
            np.testing.assert_allclose(output, y, atol=TOL)


@pytest.mark.parametrize("build", [gpt2_lm, llama_lm], ids=["gpt2", "llama-gqa"])
def test_pre_ln_values_and_decomposition(build):
    """Pre-LN models (GPT-2, Llama with grouped-query attention): T_i(x_j) is the residual stream's share."""
    from attnflow.methods._contributions import decomposition_identity

    model = build()
    kwargs = inputs()
    trace = attnflow.capture(model, values=True, **kwargs)
    _, attentions, hidden, _ = eager(model, kwargs)
    for li in range(LAYERS):
        for b in range(BATCH):
            total, output = decomposition_identity(trace, li, b)
            np.testing.assert_allclose(total, output, atol=TOL)
            keep = real(kwargs["attention_mask"], b)
            np.testing.assert_allclose(trace.layers[li].extras["residual"][b][keep], hidden[li][b][keep], atol=TOL)
    if build is llama_lm:  # 4 query heads of size 6 over 2 KV heads: query head h reads KV head h // 2
        layer = model.model.layers[0]
        x = layer.input_layernorm(torch.tensor(hidden[0], dtype=torch.float32)).detach().numpy()
        v = (x @ layer.self_attn.v_proj.weight.detach().numpy().T).reshape(BATCH, TOKENS, 2, -1)
        for h in range(4):
            np.testing.assert_allclose(trace.layers[0].extras["value"][:, h], v[:, :, h // 2], atol=TOL)
    alti = attnflow.explain(trace, ["alti"], sources=[-1])["alti"]
    np.testing.assert_allclose(alti[0].sum(-1), 1.0, atol=1e-9)
    assert (alti >= 0).all()


def test_value_zeroing_equals_rerunning_each_layer_by_hand():
    from math import erf

    model = bert_classifier()
    kwargs = inputs()
    trace = attnflow.capture(model, value_zeroing=True, **kwargs)
    reference, attentions, hidden, _ = eager(model, kwargs)
    gelu = np.vectorize(lambda t: 0.5 * t * (1 + erf(t / np.sqrt(2))))

    def layer_out(layer, x, attention, zero=None):
        p = np_params(layer)
        v = x @ p["attention.self.value.weight"].T + p["attention.self.value.bias"]
        if zero is not None:
            v[zero] = 0.0
        context = np.concatenate([attention[h] @ v[:, h * HEAD:(h + 1) * HEAD] for h in range(HEADS)], axis=-1)
        h1 = layer_norm(x + context @ p["attention.output.dense.weight"].T + p["attention.output.dense.bias"],
                        p["attention.output.LayerNorm.weight"], p["attention.output.LayerNorm.bias"], 1e-12)
        inner = gelu(h1 @ p["intermediate.dense.weight"].T + p["intermediate.dense.bias"])
        out = inner @ p["output.dense.weight"].T + p["output.dense.bias"] + h1
        return layer_norm(out, p["output.LayerNorm.weight"], p["output.LayerNorm.bias"], 1e-12)

    expected_rollout = []
    for b in range(BATCH):
        keep = real(kwargs["attention_mask"], b)
        joint = np.eye(keep.size)
        for li, layer in enumerate(reference.bert.encoder.layer):
            x, attention = hidden[li][b][keep], attentions[li][b][:, keep][:, :, keep]
            original = layer_out(layer, x, attention)
            np.testing.assert_allclose(original, hidden[li + 1][b][keep], atol=1e-4)  # the hand-written layer is right
            scores = np.zeros((keep.size, keep.size))
            for j in range(keep.size):
                zeroed = layer_out(layer, x, attention, zero=j)
                cosine = (zeroed * original).sum(-1) / np.linalg.norm(zeroed, axis=-1) / np.linalg.norm(original, axis=-1)
                scores[:, j] = np.maximum(1 - cosine, 0)
            np.testing.assert_allclose(trace.layers[li].extras["value_zeroing"][b][np.ix_(keep, keep)], scores, atol=1e-5)
            joint = (scores / scores.sum(-1, keepdims=True)) @ joint
        expected_rollout.append(joint)
    e = attnflow.explain(trace, ["value_zeroing"])
    for b in range(BATCH):
        keep = real(kwargs["attention_mask"], b)
        np.testing.assert_allclose(e["value_zeroing"][b][np.ix_(keep, keep)], expected_rollout[b], atol=1e-5)


def test_effective_attention_removes_only_the_null_space_part():
    model = bert_classifier()
    kwargs = inputs()
    trace = attnflow.capture(model, values=True, **kwargs)
    blocks = bert_blocks(model, kwargs)
    e = attnflow.explain(trace, ["effective_attention", "raw"], all_layers=True)
    for li in range(LAYERS):
        for b in range(BATCH):
            block = blocks[li][b]
            keep = real(kwargs["attention_mask"], b)
            expected = np.mean([a @ f @ np.linalg.pinv(f) for a, f in zip(block["a"], block["f"])], axis=0)
            got = e.layers("effective_attention")[li, b][np.ix_(keep, keep)]
            np.testing.assert_allclose(got, expected, atol=TOL)
    keep = real(kwargs["attention_mask"], 0)
    # 7 tokens > head size 5: effective attention differs from the attention; the output does not
    raw = e.layers("raw")[0, 0][np.ix_(keep, keep)]
    assert np.abs(e.layers("effective_attention")[0, 0][np.ix_(keep, keep)] - raw).max() > 1e-3
    block = blocks[0][0]
    eff = [a @ f @ np.linalg.pinv(f) for a, f in zip(block["a"], block["f"])]
    for a, a_eff, f in zip(block["a"], eff, block["f"]):
        np.testing.assert_allclose(a_eff @ f, a @ f, atol=1e-9)


def test_contributions_route_through_the_network():
    model = bert_classifier()
    trace = attnflow.capture(model, values=True, target=1, **inputs())
    alti = attnflow.explain(trace, ["alti"])["alti"]
    routed = attnflow.explain(trace, ["rollout"], options=Options(weights="alti"))
    np.testing.assert_allclose(routed["rollout"], alti, atol=1e-12)
    flows = attnflow.explain(trace, ["flow"], sources=[0], options=Options(weights="alti", normalize=False))["flow"]
    assert (flows + 1e-12 >= alti[:, [0]]).all()  # max-flow can only beat proportional routing
    for weights in ("norm", "norm_residual", "attn_grad"):
        rows = attnflow.explain(trace, ["rollout"], sources=[0], options=Options(weights=weights))["rollout"]
        np.testing.assert_allclose(rows[0].sum(-1), 1.0, atol=1e-9)
    with pytest.raises(attnflow.OptionError, match="no edge weights"):
        attnflow.explain(trace, ["rollout"], options=Options(weights="effective_attention"))


def grad_trace(rng, enc=6, dec=4, heads=2):
    """A synthetic encoder-decoder (2 encoder layers; 2 decoder blocks) with random attention gradients."""
    def attention(q, k, causal=False):
        w = rng.random((1, heads, q, k)) + 0.1
        if causal:
            w = w * np.tril(np.ones((q, k)))
        return w / w.sum(-1, keepdims=True)

    layers = []
    for i in range(2):
        layers.append(LayerAttention(attention(enc, enc), f"enc.{i}", query_stream="encoder",
                                     extras={"attn_grad": rng.standard_normal((1, heads, enc, enc))}))
    for i in range(2):
        layers.append(LayerAttention(attention(dec, dec, True), f"dec.{i}.self", query_stream="decoder",
                                     extras={"attn_grad": rng.standard_normal((1, heads, dec, dec))}))
        layers.append(LayerAttention(attention(dec, enc), f"dec.{i}.cross", query_stream="decoder",
                                     key_stream="encoder",
                                     extras={"attn_grad": rng.standard_normal((1, heads, dec, enc))}))
    return AttentionTrace(layers, streams=[attnflow.Stream("encoder"), attnflow.Stream("decoder")])


def test_grad_rollout_encoder_decoder_rules():
    """Chefer et al.'s rules 6, 7 and 10 (as in their DETR code), written here independently."""
    trace = grad_trace(np.random.default_rng(4))

    def cam(layer):
        return np.maximum(layer.extras["attn_grad"][0] * layer.weights[0], 0).mean(0)

    def normalised(r):
        off = r - np.eye(r.shape[0])
        sums = off.sum(-1, keepdims=True)
        return np.divide(off, sums, out=np.zeros_like(off), where=sums > 0) + np.eye(r.shape[0])

    r_ii, r_qq, r_qi = np.eye(6), np.eye(4), np.zeros((4, 6))
    for layer in trace.layers:
        if layer.query_stream == "encoder":
            r_ii = r_ii + cam(layer) @ r_ii
        elif layer.kind == "self":
            r_qi = r_qi + cam(layer) @ r_qi
            r_qq = r_qq + cam(layer) @ r_qq
        else:
            r_qi = r_qi + normalised(r_qq).T @ (cam(layer) @ normalised(r_ii))
    e = attnflow.explain(trace, ["grad_rollout"])
    np.testing.assert_allclose(e["grad_rollout"]["encoder"][0], r_qi, atol=1e-12)
    np.testing.assert_allclose(e["grad_rollout"]["decoder"][0], r_qq, atol=1e-12)


def test_missing_captures_say_how_to_capture():
    trace = attnflow.capture(bert_classifier(), **inputs())
    with pytest.raises(MethodError, match=r"needs 'attn_grad'.*target="):
        attnflow.explain(trace, ["grad_rollout"])
    with pytest.raises(MethodError, match=r"values=True"):
        attnflow.explain(trace, ["alti"])
    with pytest.raises(MethodError, match="value_zeroing=True"):
        attnflow.explain(trace, ["value_zeroing"])
    encoder = attnflow.get_adapter("torch")
    with pytest.raises(attnflow.AdapterError, match=r"cannot capture \['attn_grad'\]"):
        attnflow.capture(torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, batch_first=True), 1,
                                              enable_nested_tensor=False),
                         torch.randn(BATCH, TOKENS, HIDDEN), adapter=encoder, target=0)
    with pytest.raises(attnflow.OptionError, match="target=3 is not an index|no logits"):
        attnflow.capture(transformers.BertModel(bert_classifier().config).eval(), target=3, **inputs())


def test_alti_refuses_encoder_decoders():
    with pytest.raises(MethodError, match="ALTI\\+ for encoder-decoders"):
        attnflow.explain(grad_trace(np.random.default_rng(0)), ["alti"])
