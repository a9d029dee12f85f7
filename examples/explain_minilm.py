"""Explain a sentence with the packaged all-MiniLM-L6-v2 model: raw attention, rollout and flow from [CLS].

Run: python examples/explain_minilm.py ["your sentence"]
"""

import sys

import numpy as np
from transformers import AutoModel, AutoTokenizer

import attnflow

text = sys.argv[1] if len(sys.argv) > 1 else "The keys to the cabinet are on the table."
model_dir = attnflow.packaged_model_dir()  # or any local Hugging Face model directory
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir)  # default sdpa attention: attnflow handles it

inputs = tokenizer([text], return_tensors="pt")
trace = attnflow.capture(model, tokens=tokenizer, **inputs)  # one forward pass, hooks removed after
print(trace)

raw = attnflow.raw(trace)[0, 0]  # last layer, heads averaged, row of [CLS]
rollout = attnflow.rollout(trace)[0, 0]
flow = attnflow.flow(trace, sources=[0])[0, 0]  # only the [CLS] row: much cheaper than all rows

tokens = trace.tokens[0]
print(f"{'token':<12}{'raw':>8}{'rollout':>9}{'flow':>8}")
for j in np.argsort(-flow)[:8]:
    print(f"{tokens[j]:<12}{raw[j]:8.3f}{rollout[j]:9.3f}{flow[j]:8.3f}")
