"""Attention rollout and attention flow of a plain PyTorch model (no Hugging Face needed).

A small torch.nn.TransformerEncoder stands in for your model: any nn.Module built on
nn.MultiheadAttention is captured as is. For attention modules of your own, pass
adapter_options={"modules": [MyAttention]} (or a glob over module paths, e.g. "blocks.*.attn");
they must return (output, weights of shape (batch, heads, query, key)).

Run: python examples/plain_torch.py
"""

import numpy as np
import torch

import attnflow

torch.manual_seed(0)
tokens = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[PAD]"]
vocab = {word: i for i, word in enumerate(dict.fromkeys(tokens))}
ids = torch.tensor([[vocab[t] for t in tokens]])  # (batch=1, seq=8)
padding = ids == vocab["[PAD]"]  # True marks padding, as nn.TransformerEncoder expects

embed = torch.nn.Embedding(len(vocab), 32)
layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
encoder = torch.nn.TransformerEncoder(layer, num_layers=4).eval()  # eval(): no attention dropout

# One call: run the model and get its attention as an AttentionTrace.
trace = attnflow.capture(encoder, embed(ids), src_key_padding_mask=padding, tokens=tokens)
print(trace)  # 4 layers, (batch, heads, query, key) = (1, 4, 8, 8); the padding mask came along

# Or keep the hooks on while you run the model yourself.
with attnflow.attach(encoder, tokens=tokens) as recorder, torch.no_grad():
    encoder(embed(ids), src_key_padding_mask=padding)
assert np.allclose(recorder.trace.layers[0].weights, trace.layers[0].weights)

np.set_printoptions(precision=3, suppress=True)
real = trace.valid_index(0)  # the padding token takes no part
words = [tokens[i] for i in real]

rollout = attnflow.rollout(trace)[0]  # (seq, seq): how much each output token draws on each input token
print("\nattention rollout from [CLS]:")
for word, value in zip(words, rollout[0, real]):
    print(f"  {word:>6} {value:.3f}")

flow = attnflow.flow(trace, sources=[0])[0]  # max-flow from [CLS] (position 0) to every input token
print("\nattention flow from [CLS]:")
for word, value in zip(words, flow[0, real]):
    print(f"  {word:>6} {value:.3f}")
