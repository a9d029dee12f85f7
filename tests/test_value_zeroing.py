"""Value zeroing against a float64 reimplementation written here from Mohebbi, Zuidema, Chrupała & Alishahi,
*Quantifying Context Mixing in Transformers*, EACL 2023 (and its released code, hmohebbi/ValueZeroing):

for each layer and token ``j``, the layer is re-run on its original input with ``j``'s value vectors zeroed
(every head; the zeroed attention's weights unchanged, later sublayers recomputed); ``score[i, j]`` is the
cosine distance ``1 - cos`` between token ``i``'s original output and the zeroed one; rows are normalised to
sum to 1 and rolled out by plain matrix products. Encoder-decoders: a decoder layer is re-run with a decoder
token's values zeroed in its self-attention and with an encoder token's values zeroed in its cross-attention;
each decoder row is normalised over both together (as ALTI+ lays out the decoder's rows).

Every layer is written out by hand in float64 torch from the model's parameters, its hidden states and its own
eager attention of the zeroed module (``output_hidden_states``, ``output_attentions``); BART's cross-attention
after a zeroed self-attention is recomputed here. Nothing goes through attnflow but the public capture and
explain. Each model is float64 and has a different size on every axis; items are padded.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import attnflow
from attnflow import MethodError

TOL = 1e-6


def distance(zeroed, original):
    """The paper's cosine distance per row, ``1 - cos`` (sklearn's cosine_distances' diagonal), float64."""
    cosine = (zeroed * original).sum(-1) / zeroed.norm(dim=-1) / original.norm(dim=-1)
    return (1.0 - cosine).clamp(min=0.0)


def normalised(scores):
    return scores / scores.sum(-1, keepdim=True)


def run_eager(model, kwargs):
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        return reference, reference(**kwargs, output_attentions=True, output_hidden_states=True)


def real(mask, b):
    return torch.nonzero(mask[b]).flatten()


def heads_times(attention, v, kv_heads=None):
    """``concat_h A^h v^h``: ``attention`` (H, q, k), ``v`` (k, kv_heads · d_head); query head ``h`` reads KV
    head ``h // (H / kv_heads)``."""
    heads = attention.shape[0]
    kv_heads = kv_heads or heads
    width = v.shape[-1] // kv_heads
    group = heads // kv_heads
    return torch.cat([attention[h] @ v[:, (h // group) * width:(h // group + 1) * width] for h in range(heads)], -1)


def zero_row(v, j):
    if j is None:
        return v
    v = v.clone()
    v[j] = 0.0
    return v


def layer_norm(x, norm):
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def by_layer(layer_out, inputs, attention, keep):
    """``d[i, j]`` of one layer and item by hand: ``layer_out(x, A, zero=j)`` for every real token ``j``."""
    original = layer_out(inputs, attention)
    return original, torch.stack([distance(layer_out(inputs, attention, j), original) for j in range(keep)], dim=1)


def check_rollout(trace, kwargs, per_layer, mask_key="attention_mask"):
    """Per layer and item: attnflow's distances equal the reference's, 0 on padding; then the rollout of the
    normalised rows equals explain()'s. Returns the largest differences (distances, rollout)."""
    mask = kwargs[mask_key]
    batch, tokens = mask.shape
    e = attnflow.explain(trace, ["value_zeroing"])["value_zeroing"]
    worst = [0.0, 0.0]
    for b in range(batch):
        keep = real(mask, b).numpy()
        pad = np.setdiff1d(np.arange(tokens), keep)
        joint = np.eye(keep.size)
        for li, scores in enumerate(per_layer[b]):
            got = trace.layers[li].extras["value_zeroing"][b]
            assert got.dtype == np.float64
            np.testing.assert_allclose(got[np.ix_(keep, keep)], scores, rtol=0, atol=TOL)
            worst[0] = max(worst[0], float(np.abs(got[np.ix_(keep, keep)] - scores).max()))
            assert not got[pad].any() and not got[:, pad].any()  # padding: rows and columns 0
            joint = normalised(torch.from_numpy(scores)).numpy() @ joint
        np.testing.assert_allclose(e[b][np.ix_(keep, keep)], joint, rtol=0, atol=TOL)
        worst[1] = max(worst[1], float(np.abs(e[b][np.ix_(keep, keep)] - joint).max()))
        np.testing.assert_allclose(e[b][keep].sum(-1), 1.0, atol=1e-12)
        assert not e[b][pad].any() and not e[b][:, pad].any()
    return worst


# -- an encoder: BERT ------------------------------------------------------------------------------------------
# batch 3, tokens 7 (items with 7, 4 and 6 real), heads 2 of size 5 (hidden 10), layers 4, feed-forward 9.
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=13, hidden_size=10, num_hidden_layers=4, num_attention_heads=2, intermediate_size=9,
        max_position_embeddings=16, initializer_range=0.4,
    )
    ids = torch.randint(0, 13, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 6:] = 0
    return transformers.BertModel(config).double().eval(), {"input_ids": ids, "attention_mask": mask}


def bert_layer(layer, x, attention, zero=None):
    s, o = layer.attention.self, layer.attention.output
    v = zero_row(F.linear(x, s.value.weight, s.value.bias), zero)
    h1 = layer_norm(x + F.linear(heads_times(attention, v), o.dense.weight, o.dense.bias), o.LayerNorm)
    inner = F.gelu(F.linear(h1, layer.intermediate.dense.weight, layer.intermediate.dense.bias))
    return layer_norm(h1 + F.linear(inner, layer.output.dense.weight, layer.output.dense.bias), layer.output.LayerNorm)


def test_value_zeroing_on_an_encoder_equals_the_paper():
    model, kwargs = bert()
    trace = attnflow.capture(model, value_zeroing=True, **kwargs)
    reference, out = run_eager(model, kwargs)
    per_item = []
    with torch.no_grad():
        for b in range(3):
            keep = real(kwargs["attention_mask"], b)
            scores = []
            for li, layer in enumerate(reference.encoder.layer):
                x, a = out.hidden_states[li][b][keep], out.attentions[li][b][:, keep][:, :, keep]
                original, d = by_layer(lambda x, a, j=None, layer=layer: bert_layer(layer, x, a, j), x, a, keep.numel())
                torch.testing.assert_close(original, out.hidden_states[li + 1][b][keep], rtol=0, atol=1e-12)
                scores.append(d.numpy())
            per_item.append(scores)
    check_rollout(trace, kwargs, per_item)


# -- decoders: GPT-2 (fused query-key-value), Llama (grouped-query attention), GPT-NeoX (fused per head) ----------
# GPT-2: batch 2, tokens 6 (item 1 has 4 real, right-padded), heads 3 of size 4 (hidden 12), layers 5, ffn 7.
# Llama: batch 3, tokens 8 (items with 8, 5, 7 real), heads 4 over 2 KV heads of size 6 (hidden
# 24), layers 5, ffn 11.
def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=13, n_embd=12, n_layer=5, n_head=3, n_inner=7, n_positions=16,
                                     initializer_range=0.4, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return transformers.GPT2Model(config).double().eval(), {"input_ids": ids, "attention_mask": mask}


def gpt2_layer(block, x, attention, zero=None):
    width = x.shape[-1]
    qkv = layer_norm(x, block.ln_1) @ block.attn.c_attn.weight + block.attn.c_attn.bias  # Conv1D: x W + b
    v = zero_row(qkv[:, 2 * width:], zero)
    x2 = x + heads_times(attention, v) @ block.attn.c_proj.weight + block.attn.c_proj.bias
    inner = F.gelu(layer_norm(x2, block.ln_2) @ block.mlp.c_fc.weight + block.mlp.c_fc.bias, approximate="tanh")
    return x2 + inner @ block.mlp.c_proj.weight + block.mlp.c_proj.bias


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=13, hidden_size=24, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=11, max_position_embeddings=16, initializer_range=0.4, bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaModel(config).double().eval(), right_padded(8, [8, 5, 7])


def right_padded(tokens, lengths):
    """Token ids 1-12 (seeded) for items of ``lengths`` real tokens, right-padded to ``tokens``."""
    ids = torch.randint(1, 13, (len(lengths), tokens), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(tokens)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}


def rms_norm(x, norm):
    """Llama's RMSNorm as the model computes it: in float32 (LlamaRMSNorm casts its input to float32, which on a
    float64 model rounds it), the result cast back."""
    h = x.to(torch.float32)
    return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def llama_layer(layer, x, attention, zero=None):
    s, m = layer.self_attn, layer.mlp
    v = zero_row(F.linear(rms_norm(x, layer.input_layernorm), s.v_proj.weight, s.v_proj.bias), zero)
    x2 = x + F.linear(heads_times(attention, v, kv_heads=2), s.o_proj.weight, s.o_proj.bias)
    h = rms_norm(x2, layer.post_attention_layernorm)
    return x2 + F.linear(F.silu(F.linear(h, m.gate_proj.weight)) * F.linear(h, m.up_proj.weight), m.down_proj.weight)


# GPT-NeoX: batch 3, tokens 7 (items with 7, 4, 6 real), heads 3 of size 8 (hidden 24) from one projection laid out
# per head as [q_h | k_h | v_h], layers 4, ffn 10; attention and feed-forward added to the same residual stream
# (use_parallel_residual) or one after the other.
def gpt_neox(parallel=True):
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=13, hidden_size=24, num_hidden_layers=4, num_attention_heads=3, intermediate_size=10,
        max_position_embeddings=16, initializer_range=0.3, use_parallel_residual=parallel, bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPTNeoXModel(config).double().eval(), right_padded(7, [7, 4, 6])


def neox_values(layer, x, zero=None):
    """GPT-NeoX's values from its fused projection: per head ``h`` the last third of columns ``h·3d ... (h+1)·3d``
    (``[q_h | k_h | v_h]``), heads side by side; token ``zero``'s row zeroed."""
    fused = layer.attention.query_key_value
    heads = layer.attention.config.num_attention_heads
    qkv = F.linear(layer_norm(x, layer.input_layernorm), fused.weight, fused.bias)
    size = qkv.shape[-1] // (3 * heads)
    return zero_row(torch.cat([qkv[:, h * 3 * size + 2 * size:(h + 1) * 3 * size] for h in range(heads)], -1), zero)


def neox_layer(layer, x, attention, zero=None):
    """``x + attn(ln1(x)) + mlp(ln2(x))`` with a parallel residual, else ``y = x + attn(ln1(x)); y + mlp(ln2(y))``."""
    dense, m = layer.attention.dense, layer.mlp
    y = x + F.linear(heads_times(attention, neox_values(layer, x, zero)), dense.weight, dense.bias)
    h = layer_norm(x if layer.use_parallel_residual else y, layer.post_attention_layernorm)
    return y + F.linear(F.gelu(F.linear(h, m.dense_h_to_4h.weight, m.dense_h_to_4h.bias)), m.dense_4h_to_h.weight,
                        m.dense_4h_to_h.bias)


DECODERS = {
    "gpt2": (gpt2, lambda m: m.h, gpt2_layer, lambda m: m.ln_f, layer_norm),
    "llama": (llama, lambda m: m.layers, llama_layer, lambda m: m.norm, rms_norm),
    # the parallel residual only; the sequential block differs in the model's own re-run, not in what is zeroed
    "gpt_neox": (gpt_neox, lambda m: m.layers, neox_layer, lambda m: m.final_layer_norm, layer_norm),
}


@pytest.mark.parametrize("family", list(DECODERS))
def test_value_zeroing_on_a_decoder_equals_the_paper_and_masks_the_future(family):
    build, layers, layer_out, final_norm, norm = DECODERS[family]
    model, kwargs = build()
    blocks, final = layers(model), final_norm(model)
    trace = attnflow.capture(model, value_zeroing=True, **kwargs)
    assert trace.causal
    _, out = run_eager(model, kwargs)
    per_item = []
    with torch.no_grad():
        for b in range(kwargs["input_ids"].shape[0]):
            keep = real(kwargs["attention_mask"], b)
            scores = []
            for li, block in enumerate(blocks):
                x, a = out.hidden_states[li][b][keep], out.attentions[li][b][:, keep][:, :, keep]
                original, d = by_layer(lambda x, a, j=None, block=block: layer_out(block, x, a, j), x, a, keep.numel())
                expected = out.hidden_states[li + 1][b][keep]
                if li == len(blocks) - 1:  # the last hidden state comes after the final norm
                    original = norm(original, final)
                torch.testing.assert_close(original, expected, rtol=0, atol=1e-12)
                assert d.triu(1).abs().max() < 1e-12  # the reference's own check: a causal layer ignores j > i
                scores.append(d.numpy())
            per_item.append(scores)
    check_rollout(trace, kwargs, per_item)
    for layer in trace.layers:  # future keys exactly 0 in every item, padded or not
        assert not np.triu(layer.extras["value_zeroing"], 1).any()


# -- an encoder-decoder: BART ------------------------------------------------------------------------------------
# batch 2, encoder tokens 7 (item 1 has 5 real), decoder tokens 5 (item 1 has 3 real), encoder heads 3 of size
# 8, decoder heads 4 of size 6 (hidden 24), encoder layers 6, decoder layers 9, feed-forward 11.
def bart():
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=13, d_model=24, encoder_layers=6, decoder_layers=9, encoder_attention_heads=3,
        decoder_attention_heads=4, encoder_ffn_dim=11, decoder_ffn_dim=11, max_position_embeddings=16, init_std=0.13,
    )
    generator = torch.Generator().manual_seed(1)
    source = torch.randint(3, 13, (2, 7), generator=generator)
    target = torch.randint(3, 13, (2, 5), generator=generator)
    mask, target_mask = torch.ones(2, 7, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    mask[1, 5:] = 0
    target_mask[1, 3:] = 0
    kwargs = {"input_ids": source, "attention_mask": mask, "decoder_input_ids": target,
              "decoder_attention_mask": target_mask}
    return transformers.BartForConditionalGeneration(config).double().eval(), kwargs


def bart_attention(module, queries, sources, attention=None, zero=None):
    """One BART attention block by hand: ``attention`` given (the zeroed module's own weights, unchanged by
    zeroing values), or computed from the queries and keys (a cross-attention after a zeroed self-attention)."""
    v = zero_row(F.linear(sources, module.v_proj.weight, module.v_proj.bias), zero)
    if attention is None:
        heads = module.num_heads
        width = queries.shape[-1] // heads
        q = F.linear(queries, module.q_proj.weight, module.q_proj.bias) * width ** -0.5
        k = F.linear(sources, module.k_proj.weight, module.k_proj.bias)
        attention = torch.stack([
            torch.softmax(q[:, h * width:(h + 1) * width] @ k[:, h * width:(h + 1) * width].T, dim=-1)
            for h in range(heads)
        ])
    return F.linear(heads_times(attention, v), module.out_proj.weight, module.out_proj.bias)


def bart_feed_forward(layer, h):
    inner = F.gelu(F.linear(h, layer.fc1.weight, layer.fc1.bias))
    return layer_norm(h + F.linear(inner, layer.fc2.weight, layer.fc2.bias), layer.final_layer_norm)


def bart_encoder_layer(layer, x, attention, zero=None):
    h1 = layer_norm(x + bart_attention(layer.self_attn, x, x, attention, zero), layer.self_attn_layer_norm)
    return bart_feed_forward(layer, h1)


def bart_decoder_layer(layer, x, attention, memory, zero_self=None, zero_cross=None):
    h1 = layer_norm(x + bart_attention(layer.self_attn, x, x, attention, zero_self), layer.self_attn_layer_norm)
    h2 = layer_norm(h1 + bart_attention(layer.encoder_attn, h1, memory, None, zero_cross), layer.encoder_attn_layer_norm)
    return bart_feed_forward(layer, h2)


def test_value_zeroing_on_an_encoder_decoder_zeroes_cross_attention_too():
    model, kwargs = bart()
    trace = attnflow.capture(model, value_zeroing=True, **kwargs)
    reference, out = run_eager(model, kwargs)
    encoder, decoder = reference.model.encoder.layers, reference.model.decoder.layers
    kinds = [(layer.kind, layer.query_stream, layer.key_stream) for layer in trace.layers]
    assert kinds == [("self", "encoder", "encoder")] * 6 + [("self", "decoder", "decoder"),
                                                            ("cross", "decoder", "encoder")] * 9
    e = attnflow.explain(trace, ["value_zeroing"])["value_zeroing"]
    on_encoder = attnflow.explain(trace, ["value_zeroing"], stream="encoder")["value_zeroing"]
    worst = 0.0
    with torch.no_grad():
        for b in range(2):
            ke, kd = real(kwargs["attention_mask"], b), real(kwargs["decoder_attention_mask"], b)
            pad_e, pad_d = np.setdiff1d(np.arange(7), ke.numpy()), np.setdiff1d(np.arange(5), kd.numpy())
            c_enc = torch.eye(ke.numel(), dtype=torch.float64)
            for li, layer in enumerate(encoder):
                x, a = out.encoder_hidden_states[li][b][ke], out.encoder_attentions[li][b][:, ke][:, :, ke]
                original, d = by_layer(lambda x, a, j=None, layer=layer: bart_encoder_layer(layer, x, a, j), x, a,
                                       ke.numel())
                torch.testing.assert_close(original, out.encoder_hidden_states[li + 1][b][ke], rtol=0, atol=1e-12)
                got = trace.layers[li].extras["value_zeroing"][b]
                np.testing.assert_allclose(got[np.ix_(ke, ke)], d.numpy(), rtol=0, atol=TOL)
                assert not got[pad_e].any() and not got[:, pad_e].any()
                c_enc = normalised(d) @ c_enc
            np.testing.assert_allclose(on_encoder[b][np.ix_(ke, ke)], c_enc.numpy(), rtol=0, atol=TOL)
            memory = out.encoder_last_hidden_state[b][ke]
            enc = torch.zeros(kd.numel(), ke.numel(), dtype=torch.float64)
            dec = torch.eye(kd.numel(), dtype=torch.float64)
            for li, layer in enumerate(decoder):
                x, a = out.decoder_hidden_states[li][b][kd], out.decoder_attentions[li][b][:, kd][:, :, kd]
                original = bart_decoder_layer(layer, x, a, memory)
                torch.testing.assert_close(original, out.decoder_hidden_states[li + 1][b][kd], rtol=0, atol=1e-12)
                d_self = torch.stack([distance(bart_decoder_layer(layer, x, a, memory, zero_self=j), original)
                                      for j in range(kd.numel())], dim=1)
                d_cross = torch.stack([distance(bart_decoder_layer(layer, x, a, memory, zero_cross=j), original)
                                       for j in range(ke.numel())], dim=1)
                self_got = trace.layers[6 + 2 * li].extras["value_zeroing"][b]
                cross_got = trace.layers[7 + 2 * li].extras["value_zeroing"][b]
                assert cross_got.shape == (5, 7)
                np.testing.assert_allclose(self_got[np.ix_(kd, kd)], d_self.numpy(), rtol=0, atol=TOL)
                np.testing.assert_allclose(cross_got[np.ix_(kd, ke)], d_cross.numpy(), rtol=0, atol=TOL)
                assert not np.triu(self_got, 1).any()  # the decoder is causal
                assert not self_got[pad_d].any() and not self_got[:, pad_d].any()
                assert not cross_got[pad_d].any() and not cross_got[:, pad_e].any()
                # each decoder row normalised over the encoder's and the decoder's tokens together
                total = d_cross.sum(-1, keepdim=True) + d_self.sum(-1, keepdim=True)
                enc, dec = (d_self / total) @ enc + (d_cross / total) @ c_enc, (d_self / total) @ dec
            np.testing.assert_allclose(e["encoder"][b][np.ix_(kd, ke)], enc.numpy(), rtol=0, atol=TOL)
            np.testing.assert_allclose(e["decoder"][b][np.ix_(kd, kd)], dec.numpy(), rtol=0, atol=TOL)
            worst = max(worst, float(np.abs(e["encoder"][b][np.ix_(kd, ke)] - enc.numpy()).max()))
            rows = e["encoder"][b][kd].sum(-1) + e["decoder"][b][kd].sum(-1)
            np.testing.assert_allclose(rows, 1.0, atol=1e-12)  # rows sum to 1 together
            assert 0.05 < float(enc.sum(-1).mean()) < 0.95  # both sides carry weight in this model
            assert not e["encoder"][b][pad_d].any() and not e["encoder"][b][:, pad_e].any()
            assert not e["decoder"][b][pad_d].any() and not e["decoder"][b][:, pad_d].any()
    assert worst < TOL
    # routed as edge weights through the one network, the same rows
    routed = attnflow.explain(trace, ["rollout"], options=attnflow.Options(weights="value_zeroing"))["rollout"]
    np.testing.assert_allclose(routed["encoder"], e["encoder"], atol=1e-12)


def test_a_trace_without_cross_attention_scores_says_to_capture_again():
    model, kwargs = bart()
    trace = attnflow.capture(model, value_zeroing=True, **kwargs)
    bare = attnflow.AttentionTrace(
        [layer if layer.kind == "self" else attnflow.LayerAttention(
            layer.weights, layer.name, kind="cross", query_stream=layer.query_stream, key_stream=layer.key_stream)
         for layer in trace.layers],
        streams=list(trace.streams.values()), metadata=trace.metadata,
    )
    with pytest.raises(MethodError, match=r"cross-attention layers zeroed too.*Capture it again"):
        attnflow.explain(bare, ["value_zeroing"])


def test_value_zeroing_distances_are_float64_on_a_float32_model():
    """A float32 model's outputs differ by about 1e-7 relative when one value is zeroed far away: ``1 - cos`` in
    float32 rounds such distances to a few multiples of 6e-8. In float64 the distance of a token whose values are
    zeroed in a layer that barely reads it keeps its relative size (checked against the float64 model's own
    distances, which the float32 ones must follow to float32's precision of the outputs, not of the cosine)."""
    model, kwargs = bert()
    small = copy.deepcopy(model).float()
    exact = attnflow.capture(model, value_zeroing=True, **kwargs)
    rounded = attnflow.capture(small, value_zeroing=True, **kwargs)
    for layer, other in zip(exact.layers, rounded.layers):
        got = other.extras["value_zeroing"]
        assert got.dtype == np.float64
        # float32 outputs carry relative errors ~1e-7, so a distance d is known to ~1e-7·sqrt(d) + 1e-14
        error = np.abs(got - layer.extras["value_zeroing"])
        assert (error <= 1e-6 * np.sqrt(layer.extras["value_zeroing"]) + 1e-12).all()
