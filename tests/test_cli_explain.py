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
    assert "Top encoder tokens per decoder token (flow, after layer 6 of 6 of the decoder):" in stdout  # 3 blocks: self+cross
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
    # the flow graph labels the decoder's rows by the token each position predicts (the target's tokens)
    from transformers import AutoTokenizer

    from attnflow._explanation import load_explanation
    from attnflow.cli._explain import pictures, predicted_tokens

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    predicted = predicted_tokens(attnflow.get_adapter("transformers").encode(tokenizer, ["a b c"], targets=["x y"]),
                                 tokenizer)
    assert predicted == [["[CLS]", "x", "y", "[SEP]"]]
    drawn = dict(pictures(trace, load_explanation(out / "explanation.safetensors"), 0, exclude=False, image=None,
                          dpi=40, predicted=predicted[0]))["flow-graph"]()
    texts = {label.get_text() for axis in drawn.axes for label in axis.get_yticklabels()}
    assert {"x", "y", "[SEP]"} <= texts and any("predict" in axis.get_ylabel() for axis in drawn.axes)
    assert main(["explain", "a b", "--model", str(model_dir), "--out", str(tmp_path / "o2")]) == 1
    assert "--target-text" in capsys.readouterr().err


def test_new_settings_are_checked_before_the_model_loads(tmp_path, capsys):
    """Every bad setting is refused with its fix; --model points nowhere, so a message about the model would
    mean the model was loaded first."""
    nowhere = str(tmp_path / "no-model")
    (tmp_path / "empty.txt").write_text("\n\n")
    cases = [
        (["hello", "--format", "png,gif"], "Unknown picture format 'gif'"),
        (["hello", "--layer", "-1"], "--layer must be a layer index"),
        (["hello", "--layers", "2:6"], "2:6 is now 3..6"),
        (["hello", "--layers", "0,2"], "numbers layers from 1"),
        (["hello", "--layers", "two"], "--layers must be A..B"),
        (["hello", "--layer", "2", "--layers", "..3"], "give only --layers"),
        (["hello", "--sources", "0", "0"], "names a token twice"),
        (["hello", "--adapter-option", "output_index"], "KEY=VALUE"),
        (["hello", "--adapter-option", "colour=1"], "unknown option(s) ['colour']"),
        (["hello", "--adapter-option", "output_index=one"], "option 'output_index' must be int"),
        (["hello", "--device", "tpu"], "--device must be cpu, cuda"),
        (["hello", "--device", "cuda:7"], "no such device"),
        (["hello", "--dpi", "0"], "--dpi must be between"),
        (["--texts", str(tmp_path / "missing.txt")], "is not a file"),
        (["--texts", str(tmp_path / "empty.txt")], "holds no text"),
        (["hello", "--image", str(tmp_path / "empty.txt")], "exactly one input"),
        ([], "exactly one input"),
        (["hello", "--html", str(tmp_path / "no" / "dir" / "page.html")], "page"),
    ]
    for args, message in cases:
        assert main(["explain", *args, "--model", nowhere, "--out", str(tmp_path / "o")]) == 1, args
        err = capsys.readouterr().err
        assert message in err and "no-model" not in err, (args, err)


@pytest.mark.slow
def test_several_texts_sources_layer_formats_and_html(minilm_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text(TEXT + "\n\nThe key of the cabinet is old.\n")
    out = tmp_path / "out"
    status = main([
        "explain", "--texts", str(texts), "--out", str(out), "--sources", "cabinet,0", "--layers", "..4",
        "--exclude-special", "--format", "png,svg,pdf", "--html", "--adapter-option", "output_index=1",
        "--device", "cpu", "--dtype", "float32", "--dpi", "60",
    ])
    assert status == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    for item in (1, 2):
        for name in ("raw", "rollout", "flow", "scores", "text", "heads", "flow-graph"):
            for fmt in ("png", "svg", "pdf"):
                assert (out / f"{name}-{item}.{fmt}").stat().st_size > 0, (name, item, fmt)
    assert (out / "raw-1.pdf").read_bytes()[:5] == b"%PDF-"
    document = json.loads((out / "explanation.json").read_text())
    cabinet = document["tokens"].index("cabinet")
    assert document["sources"] == [cabinet, 0] and document["explained_position"] == cabinet
    assert document["layers"] == {"raw": [1, 2, 3, 4], "rollout": [1, 2, 3, 4], "flow": [4]}  # numbered from 1
    assert document["batch_size"] == 2 and document["options"]["layers"] == {"pair": [None, 4]}  # Python's indices
    # the methods ran over layers 0..3 only: rollout equals rollout of the saved trace's first four layers
    trace = attnflow.load(out / "trace.safetensors")
    np.testing.assert_allclose(document["scores"]["rollout"], attnflow.rollout(trace, layers=(0, 4))[0, cabinet],
                               atol=1e-12)
    # the table explains 'cabinet' in both texts, over the ordinary tokens only, renormalised
    assert "input 1: Top input tokens for 'cabinet'" in stdout and "input 2: Top input tokens for 'cabinet'" in stdout
    assert "(special tokens excluded, renormalised)" in stdout
    row = np.array(document["scores"]["rollout"])
    ordinary = ~trace.special[0]
    best = row[ordinary].max() / row[ordinary].sum()
    first_line = next(line for line in stdout.splitlines() if line.strip().startswith("1 "))
    assert f"{best:8.4f}".strip() in first_line
    # the page holds the saved explanation's numbers
    from html_page import page_data, read_array, same_to_3_digits

    from attnflow._explanation import load_explanation

    saved = load_explanation(out / "explanation.safetensors")
    data, raw = page_data((out / "explanation.html").read_text(encoding="utf-8"))
    assert data["items"][1]["source_labels"] == ["cabinet", "[CLS]"]
    real = saved.streams["tokens"].valid_index(1)
    same_to_3_digits(read_array(data["items"][1]["scores"]["rollout"]["tokens"], raw),
                     saved.layers("rollout")[:, 1][:, :, real])
    assert main(["explain", TEXT, "--layers", "..7", "--out", str(tmp_path / "o2")]) == 1
    assert "layer 7 is past the last layer: the explained stream has 6 layers" in capsys.readouterr().err
    assert main(["explain", TEXT, "--layer", "6", "--out", str(tmp_path / "o2")]) == 1  # deprecated, 0-based
    err = capsys.readouterr().err
    assert "--layer 6 (0-based) is deprecated; use --layers ..7" in err and "past the last layer" in err
    assert main(["explain", TEXT, "--sources", "door", "--out", str(tmp_path / "o3")]) == 1
    assert "no token of input 0 reads so" in capsys.readouterr().err


def _tiny_gpt2_dir(tmp_path):
    """A random 3-layer GPT-2 with a language-model head and a letter tokenizer, saved as a local directory."""
    import torch
    from transformers import BertTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    config = GPT2Config(vocab_size=len(vocab), n_embd=20, n_layer=3, n_head=4, n_positions=48, n_inner=28,
                        bos_token_id=2, eos_token_id=None, pad_token_id=0)
    model_dir = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(model_dir, safe_serialization=True)
    # no token_type_ids: GPT-2 would add token 0's embedding to every position
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)},
                  model_input_names=["input_ids", "attention_mask"]).save_pretrained(model_dir)
    return model_dir


def test_generate_explains_every_generated_token(tmp_path, capsys):
    """--generate N: the decoder's own greedy continuation, and per generated token rollout over the prompt
    recomputed here from one teacher-forced eager forward pass (Abnar & Zuidema's rollout, heads averaged)."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model_dir = _tiny_gpt2_dir(tmp_path)
    out = tmp_path / "out"
    status = main(["explain", "b a d c", "--generate", "5", "--model", str(model_dir), "--out", str(out),
                   "--methods", "rollout,flow", "--top", "3", "--html"])
    assert status == 0
    stdout = capsys.readouterr().out
    document = json.loads((out / "explanation.json").read_text())

    model = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(["b a d c"], return_tensors="pt")
    with torch.no_grad():
        sequences = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    prompt = inputs["input_ids"].shape[1]
    assert document["generated_ids"] == sequences[0, prompt:].tolist()  # generation unchanged by attach()
    assert document["first_generated"] == prompt
    generated = tokenizer.convert_ids_to_tokens(sequences[0, prompt:].tolist())
    assert [row["token"] for row in document["generated"]] == generated
    with torch.no_grad():
        attentions = model(sequences[:, :-1], output_attentions=True).attentions
    n = sequences.shape[1] - 1
    joint = np.eye(n)
    for layer in attentions:
        a = layer[0].double().mean(0).numpy()
        a = 0.5 * a + 0.5 * np.eye(n)
        joint = (a / a.sum(-1, keepdims=True)) @ joint
    labels = tokenizer.convert_ids_to_tokens(sequences[0, :prompt].tolist())
    for k, row in enumerate(document["generated"]):
        position = prompt - 1 + k  # the position that predicts generated token k
        assert row["explained_position"] == position
        expected = joint[position, :prompt]
        order = np.argsort(-expected, kind="stable")[:3]
        got = row["top"]["rollout"]
        assert [cell["position"] for cell in got] == order.tolist()
        np.testing.assert_allclose([cell["score"] for cell in got], expected[order], atol=1e-6)
        assert [cell["token"] for cell in got] == [labels[j] for j in order]
        assert len(row["top"]["flow"]) == 3
    assert f"generated (5 tokens): {' '.join(generated)}" in stdout
    assert "Top prompt tokens per generated token (flow" in stdout
    assert (out / "generation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "explanation.html").stat().st_size > 0
    trace = attnflow.load(out / "trace.safetensors")
    assert [list(row) for row in trace.metadata["generation"]["generated_tokens"]] == [generated]


def test_generate_refuses_what_it_cannot_explain(tmp_path, minilm_dir, capsys):
    model_dir = _tiny_gpt2_dir(tmp_path)
    (tmp_path / "texts.txt").write_text("a b\n")
    cases = [
        (["a b", "--generate", "0", "--model", str(model_dir)], "--generate takes the number of tokens"),
        (["--texts", str(tmp_path / "texts.txt"), "--generate", "2", "--model", str(model_dir)], "--texts"),
        (["a b", "--generate", "2", "--sources", "0", "--model", str(model_dir)], "--sources"),
        (["a b", "--generate", "2", "--adapter", "torch"], "cannot load a model for generation"),
        (["the cabinet", "--generate", "2", "--model", str(minilm_dir)], "needs a decoder"),
    ]
    for args, message in cases:
        assert main(["explain", *args, "--out", str(tmp_path / "o")]) == 1, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
