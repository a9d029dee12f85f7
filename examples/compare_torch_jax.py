"""Is the JAX port faithful? all-MiniLM-L6-v2 in PyTorch (transformers) against its Flax NNX port.

Both models load the same packaged checkpoint; both are captured on the same padded batch of three
sentences, with the gradient of a target (``target=``: a fixed direction of the [CLS] output vector, computed
by autograd in PyTorch and by ``jax.grad`` in JAX) and the value-side tensors (``values=True``). Then
``attnflow.compare`` checks the attention of every layer and head, the rollout, the flow from [CLS], and the
methods grad_rollout, norm, norm_residual and ALTI computed on each trace. Run it:
``python examples/compare_torch_jax.py`` (exit status 0 when they agree).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; nothing is downloaded

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

import attnflow

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flax_bert  # noqa: E402  (the Flax port, next to this file)

METHODS = ["grad_rollout", "norm", "norm_residual", "alti"]
SENTENCES = [
    "The keys to the cabinet are on the table.",
    "Attention flow follows the residual stream.",
    "A short one.",
]


def main() -> int:
    model_dir = attnflow.packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")  # a padded batch of 3

    # The target: the [CLS] output vector along a fixed direction, per item (both models return hidden states).
    direction = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    direction /= np.linalg.norm(direction)

    torch_model = AutoModel.from_pretrained(model_dir).eval()  # default SDPA: the adapter switches to eager
    torch_direction = torch.from_numpy(direction)
    torch_trace = attnflow.capture(
        torch_model, tokens=tokenizer, target=lambda out: out.last_hidden_state[:, 0] @ torch_direction,
        values=True, **{name: torch.from_numpy(value) for name, value in batch.items()}
    )

    jax_model = flax_bert.load_bert(model_dir)
    jax_trace = attnflow.capture(
        jax_model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], tokens=tokenizer,
        target=lambda out: out[:, 0] @ direction, values=True,
    )

    report = attnflow.compare(torch_trace, jax_trace, flow_sources=[0], methods=METHODS)  # float32: 1e-5
    print(f"PyTorch {torch_trace}\nJAX     {jax_trace}\n")
    print(report)
    worst = [f"{layer.max_abs:.1e}" for layer in report.layers]
    print(f"\nmax |attention difference| per layer: {', '.join(worst)}")
    print("\n| method | max abs difference, PyTorch vs JAX |\n|---|---|")
    print(f"| attention (every layer and head) | {report.attention_max_abs:.1e} |")
    print(f"| rollout | {report.rollout_max_abs:.1e} |")
    print(f"| flow from [CLS] | {report.flow_max_abs:.1e} |")
    for name in METHODS:
        print(f"| {name} | {report.methods[name]:.1e} |")
    print(f"\nrollout {report.rollout_max_abs:.1e}, flow from [CLS] {report.flow_max_abs:.1e}")
    assert np.array_equal(torch_trace.mask, jax_trace.mask)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
