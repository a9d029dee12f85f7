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


# -- ALTI+ on an encoder-decoder ----------------------------------------------------------------------------------
# Sizes differ on every axis: batch 2, encoder heads 3, decoder heads 4, decoder layers 5, decoder tokens 6 (item 1
# has 4 real), encoder tokens 7 (item 1 has 5 real), encoder layers 8, decoder head size 9, feed-forward 11,
# encoder head size 12, vocabulary 13, hidden 36.
E_HEADS, D_HEADS, D_LAYERS, D_TOKENS, E_TOKENS, E_LAYERS, SEQ_HIDDEN = 3, 4, 5, 6, 7, 8, 36


def seq2seq(family="bart", std=0.13):
    torch.manual_seed(0)
    config_class = {"bart": transformers.BartConfig, "mbart": transformers.MBartConfig}[family]
    config = config_class(
        vocab_size=VOCAB, d_model=SEQ_HIDDEN, encoder_layers=E_LAYERS, decoder_layers=D_LAYERS,
        encoder_attention_heads=E_HEADS, decoder_attention_heads=D_HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_position_embeddings=16, init_std=std,
    )
    model_class = {"bart": transformers.BartForConditionalGeneration, "mbart": transformers.MBartForConditionalGeneration}
    return model_class[family](config).eval()


def seq2seq_inputs():
    generator = torch.Generator().manual_seed(1)
    source = torch.randint(3, VOCAB, (BATCH, E_TOKENS), generator=generator)
    target = torch.randint(3, VOCAB, (BATCH, D_TOKENS), generator=generator)
    mask, target_mask = torch.ones(BATCH, E_TOKENS, dtype=torch.long), torch.ones(BATCH, D_TOKENS, dtype=torch.long)
    mask[1, 5:] = 0
    target_mask[1, 4:] = 0
    return {"input_ids": source, "attention_mask": mask, "decoder_input_ids": target,
            "decoder_attention_mask": target_mask}


def attention_block(module, norm, x, sources, a, pre_ln, cross):
    """One attention block written out from its weights (float64): ``T_i(·)`` per source, the block's output
    ``y`` and its bias terms. Self-attention: ``T_i(x_j) = L(Σ_h α^h_ij f^h(x_j) + δ_ij x_i) / σ_i``; cross-
    attention (ALTI+): ``T_i(e_j) = L(Σ_h α^h_ij f^h(e_j)) / σ_i`` per encoder token and ``L(x_i) / σ_i`` for the
    residual, last. ``L(z) = (z - mean z) ⊙ γ``, ``σ_i`` the norm's standard deviation of ``x_i + Σ_j ... + b_O``.
    Pre-LN: the residual stream itself (``T_i`` without ``L``, ``σ``), the values read from ``LN(x)`` (self) or
    the encoder's output (cross)."""
    p, q = np_params(module), np_params(norm)
    heads = a.shape[0]
    width = SEQ_HIDDEN // heads
    inputs = layer_norm(sources, q["weight"], q["bias"], norm.eps) if pre_ln and not cross else sources
    v = inputs @ p["v_proj.weight"].T + p["v_proj.bias"]
    w_o = p["out_proj.weight"].T
    f = np.stack([v[:, h * width:(h + 1) * width] @ w_o[h * width:(h + 1) * width] for h in range(heads)])
    moved = np.einsum("hij,hjd->ijd", a, f)
    if cross:
        z = np.concatenate([moved, x[:, None]], axis=1)
    else:
        z = moved.copy()
        z[np.arange(x.shape[0]), np.arange(x.shape[0])] += x
    total = x + moved.sum(1) + p["out_proj.bias"]  # the residual stream after the block
    if pre_ln:
        return z, total, np.broadcast_to(p["out_proj.bias"], total.shape), total
    sigma = np.sqrt(total.var(-1) + norm.eps)
    shares = (z - z.mean(-1, keepdims=True)) * q["weight"] / sigma[:, None, None]
    bias = (p["out_proj.bias"] - p["out_proj.bias"].mean()) * q["weight"] / sigma[:, None] + q["bias"]
    return shares, layer_norm(total, q["weight"], q["bias"], norm.eps), bias, total


def alti_rows(shares, y):
    """Ferrando et al. (2022): ``max(0, ‖y_i‖₁ - ‖y_i - T_i(·)‖₁)``, rows normalised."""
    c = np.maximum(0.0, np.abs(y).sum(-1)[:, None] - np.abs(y[:, None] - shares).sum(-1))
    return c / c.sum(-1, keepdims=True)


def feed_forward(layer, h, pre_ln):
    p = np_params(layer)
    inner = layer_norm(h, p["final_layer_norm.weight"], p["final_layer_norm.bias"], 1e-5) if pre_ln else h
    inner = torch.nn.functional.gelu(torch.from_numpy(inner @ p["fc1.weight"].T + p["fc1.bias"])).numpy()
    out = h + inner @ p["fc2.weight"].T + p["fc2.bias"]
    return out if pre_ln else layer_norm(out, p["final_layer_norm.weight"], p["final_layer_norm.bias"], 1e-5)


def alti_plus_reference(model, kwargs, pre_ln):
    """ALTI+ (Ferrando, Gállego, Alastruey, Escolano & Costa-jussà, EMNLP 2022) per item, from the model's eager
    attention, hidden states and weights: the encoder's ALTI rolled out (``C_enc``); per decoder layer
    ``C_self`` and ``[C_cross | r]`` (``r``: the residual's share), and the rollout
    ``enc ← diag(r) C_self enc + C_cross C_enc``, ``dec ← diag(r) C_self dec`` from ``enc = 0``, ``dec = I``.
    Returns per item the decoder's (enc, dec) after every sublayer, the encoder's ``C_enc``, and per layer the
    block outputs and bias terms for the decomposition identity."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    out = reference(**kwargs, output_attentions=True, output_hidden_states=True)
    enc_h = [h.detach().double().numpy() for h in out.encoder_hidden_states]
    dec_h = [h.detach().double().numpy() for h in out.decoder_hidden_states]
    memory = out.encoder_last_hidden_state.detach().double().numpy()
    enc_a, dec_a, cross_a = ([a.detach().double().numpy() for a in maps]
                             for maps in (out.encoder_attentions, out.decoder_attentions, out.cross_attentions))
    encoder, decoder = reference.model.encoder, reference.model.decoder
    results = []
    for b in range(BATCH):
        ke, kd = real(kwargs["attention_mask"], b), real(kwargs["decoder_attention_mask"], b)
        c_enc, outputs = np.eye(ke.size), []
        for li, layer in enumerate(encoder.layers):
            x = enc_h[li][b][ke]
            shares, y, bias, _ = attention_block(layer.self_attn, layer.self_attn_layer_norm, x, x,
                                                 enc_a[li][b][:, ke][:, :, ke], pre_ln, False)
            outputs.append((shares, y, bias))
            c_enc = alti_rows(shares, y) @ c_enc
        enc, dec, steps = np.zeros((kd.size, ke.size)), np.eye(kd.size), []
        for li, layer in enumerate(decoder.layers):
            x = dec_h[li][b][kd]
            shares, y, bias, stream = attention_block(layer.self_attn, layer.self_attn_layer_norm, x, x,
                                                      dec_a[li][b][:, kd][:, :, kd], pre_ln, False)
            outputs.append((shares, y, bias))
            c_self = alti_rows(shares, y)
            steps.append((c_self @ enc, c_self @ dec))
            residual = stream if pre_ln else y  # what the cross-attention block adds to
            shares, y, bias, stream = attention_block(layer.encoder_attn, layer.encoder_attn_layer_norm, residual,
                                                      memory[b][ke], cross_a[li][b][:, kd][:, :, ke], pre_ln, True)
            outputs.append((shares, y, bias))
            c_cross = alti_rows(shares, y)
            r = c_cross[:, -1:]
            enc, dec = r * (c_self @ enc) + c_cross[:, :-1] @ c_enc, r * (c_self @ dec)
            steps.append((enc, dec))
            if not (pre_ln and li == len(decoder.layers) - 1):  # mBART's last hidden state is after its final norm
                # the blocks written out here are the model's own: the layer's output follows from them
                np.testing.assert_allclose(feed_forward(layer, stream if pre_ln else y, pre_ln), dec_h[li + 1][b][kd],
                                           atol=1e-4)
        results.append({"steps": steps, "encoder": c_enc, "outputs": outputs, "keep": (ke, kd)})
    return results


@pytest.mark.parametrize("family", ["bart", "mbart"], ids=["bart-post-ln", "mbart-pre-ln"])
def test_alti_plus_on_encoder_decoders_follows_the_paper(family):
    from attnflow.methods._contributions import decomposition_identity

    model, kwargs = seq2seq(family), seq2seq_inputs()
    pre_ln = family == "mbart"
    trace = attnflow.capture(model, values=True, **kwargs)
    assert trace.metadata["values_layout"] == ("pre_ln" if pre_ln else "post_ln")
    expected = alti_plus_reference(model, kwargs, pre_ln)
    e = attnflow.explain(trace, ["alti"], all_layers=True)
    per_layer = e.layers("alti")  # the decoder after each sublayer, self- and cross-attention
    final = e["alti"]
    encoder = attnflow.explain(trace, ["alti"], stream="encoder")["alti"]
    worst = 0.0
    for b, item in enumerate(expected):
        ke, kd = item["keep"]
        for d, (enc, dec) in enumerate(item["steps"]):
            np.testing.assert_allclose(per_layer["encoder"][d, b][np.ix_(kd, ke)], enc, atol=TOL)
            np.testing.assert_allclose(per_layer["decoder"][d, b][np.ix_(kd, kd)], dec, atol=TOL)
        enc, dec = item["steps"][-1]
        np.testing.assert_allclose(final["encoder"][b][np.ix_(kd, ke)], enc, atol=TOL)
        np.testing.assert_allclose(final["decoder"][b][np.ix_(kd, kd)], dec, atol=TOL)
        np.testing.assert_allclose(enc.sum(-1) + dec.sum(-1), 1.0, atol=1e-9)  # rows sum to 1 together
        np.testing.assert_allclose(encoder[b][np.ix_(ke, ke)], item["encoder"], atol=TOL)
        worst = max(worst, np.abs(final["encoder"][b][np.ix_(kd, ke)] - enc).max())
        pad_d, pad_e = np.setdiff1d(np.arange(D_TOKENS), kd), np.setdiff1d(np.arange(E_TOKENS), ke)
        assert not final["encoder"][b][pad_d].any() and not final["encoder"][b][:, pad_e].any()  # 0 on padding
        assert not final["decoder"][b][pad_d].any() and not final["decoder"][b][:, pad_d].any()
        # both sides matter in this model: neither the residual's share nor the cross-attention's is all
        assert 0.1 < enc.sum(-1).mean() < 0.9
        for index, (shares, y, bias) in enumerate(item["outputs"]):
            np.testing.assert_allclose(shares.sum(1) + bias, y, atol=1e-9)  # the reference's own identity
            total, output = decomposition_identity(trace, index, b)  # Σ_j T_i(x_j) + bias terms = the output
            np.testing.assert_allclose(total, output, atol=TOL)
            rows = kd if trace.layers[index].query_stream == "decoder" else ke
            np.testing.assert_allclose(output, y, atol=TOL)
            assert output.shape[0] == rows.size
    assert worst < TOL
    # routed as contributions through the one network, the decoder's rows are the same
    routed = attnflow.explain(trace, ["rollout"], options=Options(weights="alti"))["rollout"]
    np.testing.assert_allclose(routed["encoder"], final["encoder"], atol=1e-12)


def test_alti_plus_says_what_it_needs():
    with pytest.raises(MethodError, match=r"values=True"):  # a trace without value tensors
        attnflow.explain(grad_trace(np.random.default_rng(0)), ["alti"])
    trace = attnflow.capture(seq2seq(), values=True, **seq2seq_inputs())
    bare = AttentionTrace(
        [layer if layer.kind == "self" else LayerAttention(layer.weights, layer.name, query_stream=layer.query_stream,
                                                           key_stream=layer.key_stream) for layer in trace.layers],
        streams=list(trace.streams.values()), metadata=trace.metadata,
    )
    with pytest.raises(MethodError, match=r"ALTI\+.*cross-attention layers.*values=True.*BART.*T5"):
        attnflow.explain(bare, ["alti"])
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=12, d_kv=4, d_ff=FFN, num_layers=1, num_heads=3)).eval()
    with pytest.raises(attnflow.AdapterError, match=r"register_value_map"):
        attnflow.capture(t5, values=True, input_ids=torch.tensor([[1, 2, 3]]), decoder_input_ids=torch.tensor([[0, 1]]))
