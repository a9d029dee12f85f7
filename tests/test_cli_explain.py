"""`attnflow explain` end to end on the packaged MiniLM model and on a local model directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import attnflow
from attnflow.cli import main

TEXT = "The keys to the cabinet are on the table."


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "attnflow.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "out"
    result = run_cli("explain", TEXT, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_writes_every_output(explained):
    out, stdout = explained
    for name in ("raw.png", "rollout.png", "flow.png", "scores.png", "trace.safetensors", "explanation.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "flow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Top input tokens for '[CLS]'" in stdout
    assert "seconds: load" in stdout and "flow" in stdout


def test_numbers_follow_the_definitions(explained):
    out, _ = explained
    document = json.loads((out / "explanation.json").read_text())
    tokens = document["tokens"]
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "cabinet" in tokens
    rollout = np.array(document["matrices"]["rollout"])
    flow = np.array(document["matrices"]["flow"])
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-9)
    np.testing.assert_allclose(flow.sum(-1), 1.0, atol=1e-9)
    # the JSON agrees with recomputing from the saved trace
    trace = attnflow.load(out / "trace.safetensors")
    assert trace.num_layers == 6 and trace.num_heads == (12,) * 6 and trace.tokens[0] == tokens
    np.testing.assert_allclose(attnflow.rollout(trace)[0], rollout, atol=1e-12)
    np.testing.assert_allclose(attnflow.flow(trace, sources=[0])[0, 0], document["scores"]["flow"], atol=1e-12)


def test_local_model_directory(tmp_path):
    """--model DIR loads any local Hugging Face directory through the real loading path."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=20, num_hidden_layers=3, num_attention_heads=4, intermediate_size=28,
        max_position_embeddings=40,
    )
    model_dir = tmp_path / "tiny-bert"
    BertModel(config).save_pretrained(model_dir, safe_serialization=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(model_dir)

    out = tmp_path / "out"
    assert main(["explain", "a b c d", "--model", str(model_dir), "--out", str(out), "--top", "2"]) == 0
    document = json.loads((out / "explanation.json").read_text())
    assert document["tokens"] == ["[CLS]", "a", "b", "c", "d", "[SEP]"]
    assert attnflow.load(out / "trace.safetensors").num_heads == (4, 4, 4)


def test_bad_model_directory_is_a_clear_error(tmp_path, capsys):
    status = main(["explain", "hello", "--model", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o")])
    assert status == 1
    assert "attnflow: error:" in capsys.readouterr().err


def test_adapter_that_cannot_load_models_is_a_clear_error(tmp_path, capsys):
    assert main(["explain", "hello", "--adapter", "torch", "--out", str(tmp_path / "o")]) == 1
    assert "cannot load models by path" in capsys.readouterr().err


def test_encoder_decoder_directory_with_target_text(tmp_path, capsys):
    """An encoder-decoder explains every decoder token by the encoder tokens it draws on."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, BertTokenizer

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=32, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=20, decoder_ffn_dim=20, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2,
    )
    model_dir = tmp_path / "tiny-bart"
    BartForConditionalGeneration(config).save_pretrained(model_dir, safe_serialization=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(model_dir)

    out = tmp_path / "out"
    assert main(["explain", "a b c", "--target-text", "x y", "--model", str(model_dir), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "Top encoder tokens per decoder token (flow):" in stdout
    document = json.loads((out / "explanation.json").read_text())
    assert document["stream"] == "decoder" and document["input_tokens"]["encoder"] == ["[CLS]", "a", "b", "c", "[SEP]"]
    # the decoder runs on the target shifted right behind the start token
    assert document["tokens"] == ["[CLS]", "[CLS]", "x", "y"]
    trace = attnflow.load(out / "trace.safetensors")
    assert list(trace.streams) == ["encoder", "decoder"]
    rollout = attnflow.rollout(trace)
    for name in ("encoder", "decoder"):
        np.testing.assert_allclose(np.array(document["matrices"]["rollout"][name]), rollout[name][0], atol=1e-12)
    total = np.array(document["matrices"]["flow"]["encoder"]).sum(-1) + np.array(document["matrices"]["flow"]["decoder"]).sum(-1)
    np.testing.assert_allclose(total, 1.0, atol=1e-9)
    for name in ("rollout-encoder.png", "flow-decoder.png", "explanation.safetensors"):
        assert (out / name).stat().st_size > 0
    assert main(["explain", "a b", "--model", str(model_dir), "--out", str(tmp_path / "o2")]) == 1
    assert "--target-text" in capsys.readouterr().err
