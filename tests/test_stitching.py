"""Stitching generation steps at the Recorder, no model: a module path recorded twice in every step (a shared
block applied twice, a scanned layer) stays two layers, each equal to the teacher-forced pass.

Sizes differ on every axis: batch 2, heads 5, prompt 4, new tokens 3 (stitched length 7), 3 layers per step
(the shared path twice, then another)."""

from __future__ import annotations

import numpy as np
from test_streams import softmax_rows

from attnflow import Recorder

BATCH, HEADS, PROMPT, NEW = 2, 5, 4, 3
LENGTH = PROMPT + NEW
PATHS = ["shared.attn", "shared.attn", "head.attn"]


def teacher_forced(seed: int = 0) -> list[np.ndarray]:
    """One causal ``(batch, heads, LENGTH, LENGTH)`` map per recorded call, all different."""
    rng = np.random.default_rng(seed)
    real = np.ones((BATCH, LENGTH), bool)
    return [softmax_rows(rng, (BATCH, HEADS, LENGTH, LENGTH), real, causal=True) for _ in PATHS]


def record_generation(full: list[np.ndarray], *, grow_cache: bool) -> Recorder:
    """The prefill (queries 0..PROMPT-1), then one query per new token against its cached keys: all keys so far
    (``grow_cache``), or a static cache padded with zeros to LENGTH + 2 keys."""
    rec = Recorder(framework="numpy")
    rec.start_generation()
    spans = [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, LENGTH)]
    for start, end in spans:
        rec.start_call(causal=True)
        for path, weights in zip(PATHS, full):
            rows = weights[:, :, start:end, :end]
            if not grow_cache:
                rows = np.concatenate([rows, np.zeros(rows.shape[:3] + (LENGTH + 2 - end,))], axis=-1)
            rec.record(path, rows)
        rec.end_call()
    rec.end_generation(streams={None: {"mask": np.ones((BATCH, LENGTH), bool)}})
    return rec


def test_a_path_recorded_twice_per_step_stays_two_layers_each_the_teacher_forced_one():
    full = teacher_forced()
    for grow_cache in (True, False):
        rec = record_generation(full, grow_cache=grow_cache)
        trace = rec.trace
        assert trace.layer_names == ["shared.attn.0", "shared.attn.1", "head.attn"]
        assert len(rec.steps) == NEW + 1 and all(len(step.layers) == len(PATHS) for step in rec.steps)
        for layer, expected in zip(trace.layers, full, strict=True):
            np.testing.assert_allclose(layer.weights, expected, rtol=0, atol=1e-12)
        assert trace.causal and trace.seq_len == LENGTH
