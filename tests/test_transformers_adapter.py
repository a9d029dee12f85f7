"""The transformers adapter on tiny random BERT / GPT-2 / Llama (GQA) models and the real MiniLM model.

References are ``output_attentions=True`` of a separate copy of the model built with
``attn_implementation="eager"`` (same weights), never the adapter's own mechanism.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import attnflow

TOL = 1e-6
BATCH, HEADS, SEQ, VOCAB = 2, 3, 7, 50  # as in conftest (checked by test_sizes_agree_with_conftest)
HF_LAYERS = {"bert": 4, "gpt2": 5, "llama": 6}
LAYER_NAMES = {"bert": "encoder.layer.{}.attention.self", "gpt2": "h.{}.attn", "llama": "layers.{}.self_attn"}
CAUSAL = {"bert": False, "gpt2": True, "llama": True}


def test_sizes_agree_with_conftest(sizes):
    assert (sizes.batch, sizes.heads, sizes.seq, sizes.vocab, sizes.layers) == (BATCH, HEADS, SEQ, VOCAB, HF_LAYERS)
    assert len({BATCH, HEADS, SEQ, sizes.hidden, *HF_LAYERS.values()}) == 4 + len(HF_LAYERS)  # every axis differs


def eager_reference(model, build, family, inputs):
    """``output_attentions`` of an eager twin of ``model`` (same weights)."""
    twin = build(family, attn_implementation="eager")
    twin.load_state_dict(model.state_dict())
    assert twin.config._attn_implementation == "eager"
    with torch.no_grad():
        attentions = twin(**inputs, output_attentions=True).attentions
    assert len(attentions) == HF_LAYERS[family]
    return [a.numpy() for a in attentions]


def max_diff(trace, reference):
    assert len(trace.layers) == len(reference)
    return max(float(np.abs(layer.weights.astype(np.float64) - ref).max()) for layer, ref in zip(trace.layers, reference))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_capture_under_sdpa_equals_eager_output_attentions(family, padding, tiny_hf, hf_inputs):
    model = tiny_hf(family)
    assert model.config._attn_implementation == "sdpa"  # as a user's model is loaded
    inputs = hf_inputs(padding)
    trace = attnflow.capture(model, **inputs)

    assert trace.metadata["adapter"] == "transformers" and trace.framework == "torch"
    assert model.config._attn_implementation == "sdpa"  # restored
    assert trace.num_layers == HF_LAYERS[family]
    assert all(layer.shape == (BATCH, HEADS, SEQ, SEQ) for layer in trace.layers)  # per query head under GQA too
    assert trace.layer_names == [LAYER_NAMES[family].format(i) for i in range(HF_LAYERS[family])]
    assert {layer.kind for layer in trace.layers} == {"self"}
    assert trace.causal is CAUSAL[family]
    np.testing.assert_array_equal(trace.mask, inputs["attention_mask"].numpy().astype(bool))
    assert trace.tokens == [[str(int(t)) for t in row] for row in inputs["input_ids"]]
    assert max_diff(trace, eager_reference(model, tiny_hf, family, inputs)) <= TOL


def test_grouped_query_heads_are_distinct_query_heads(tiny_hf, hf_inputs):
    model = tiny_hf("llama")
    assert model.config.num_key_value_heads == 1 < model.config.num_attention_heads == HEADS
    trace = attnflow.capture(model, **hf_inputs())
    w = trace.layers[0].weights
    # three query heads over one key/value head: different maps, not one map repeated
    assert np.abs(w[:, 0] - w[:, 1]).max() > 1e-3 and np.abs(w[:, 1] - w[:, 2]).max() > 1e-3


def test_positional_arguments_and_no_mask(tiny_hf, hf_inputs):
    model = tiny_hf("bert")
    inputs = hf_inputs("right")
    trace = attnflow.capture(model, inputs["input_ids"], inputs["attention_mask"])  # forward(input_ids, attention_mask)
    np.testing.assert_array_equal(trace.mask, inputs["attention_mask"].numpy().astype(bool))
    no_mask = attnflow.capture(model, input_ids=inputs["input_ids"])
    assert no_mask.mask.all()
    ref = eager_reference(model, tiny_hf, "bert", {"input_ids": inputs["input_ids"]})
    assert max_diff(no_mask, ref) <= TOL


def test_attach_records_every_forward_and_keeps_eager_only_inside(tiny_hf, hf_inputs):
    model = tiny_hf("gpt2")
    with attnflow.attach(model) as recorder:
        assert model.config._attn_implementation == "eager"
        with torch.no_grad():
            model(**hf_inputs(seed=1))
            model(**hf_inputs(seed=2))
    assert model.config._attn_implementation == "sdpa"
    assert len(recorder.traces) == 2
    assert not np.allclose(recorder.traces[0].layers[0].weights, recorder.traces[1].layers[0].weights)


def test_model_already_eager_stays_eager(tiny_hf, hf_inputs):
    model = tiny_hf("bert", attn_implementation="eager")
    attnflow.capture(model, **hf_inputs())
    assert model.config._attn_implementation == "eager"


def test_task_head_model_is_captured_through_its_base_model(hf_inputs):
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=20,
        num_labels=5,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    trace = attnflow.capture(model, **hf_inputs("right"))
    assert trace.layer_names == ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    assert model.config._attn_implementation == "sdpa" and model.bert.config._attn_implementation == "sdpa"


def test_cross_attention_is_kind_cross(hf_inputs):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=HEADS, n_inner=20, n_positions=32, add_cross_attention=True
    )
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).eval()
    memory = torch.randn(BATCH, 5, 24)
    trace = attnflow.capture(model, **hf_inputs(), encoder_hidden_states=memory)
    assert [layer.kind for layer in trace.layers] == ["self", "cross", "self", "cross"]
    assert trace.layer_names[1] == "h.0.crossattention"
    assert trace.layers[1].shape == (BATCH, HEADS, SEQ, 5)
    with torch.no_grad():
        ref = model(**hf_inputs(), encoder_hidden_states=memory, output_attentions=True)  # the switch is undone
    assert ref.attentions == ()  # sdpa again: transformers returns nothing
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(**hf_inputs(), encoder_hidden_states=memory, output_attentions=True)
    np.testing.assert_allclose(trace.layers[1].weights, ref.cross_attentions[0].numpy(), atol=TOL)
    np.testing.assert_allclose(trace.layers[2].weights, ref.attentions[1].numpy(), atol=TOL)


# -- restoration ----------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def test_forward_that_raises_inside_attach_restores_everything(tiny_hf, hf_inputs, hooks_of):
    model = tiny_hf("llama")
    inputs = hf_inputs("right")

    def explode(module, args):
        raise Boom("layer 3 failed")

    bomb = model.layers[3].register_forward_pre_hook(explode)  # after three attention layers have run
    before = hooks_of(model)
    assert sum(map(len, before.values())) == 1  # only the bomb
    with pytest.raises(Boom):
        with attnflow.attach(model) as recorder:
            assert hooks_of(model) != before  # the adapter's hooks are in place
            with torch.no_grad():
                model(**inputs)
    assert model.config._attn_implementation == "sdpa"
    assert hooks_of(model) == before
    assert recorder.traces == []  # the half pass left nothing behind
    bomb.remove()

    # Nothing is stuck: the next capture is complete and right.
    trace = attnflow.capture(model, **inputs)
    assert trace.num_layers == HF_LAYERS["llama"]
    assert max_diff(trace, eager_reference(model, tiny_hf, "llama", inputs)) <= TOL


def test_forward_that_raises_then_succeeds_within_one_attach(tiny_hf, hf_inputs):
    model = tiny_hf("bert")
    inputs = hf_inputs()
    with attnflow.attach(model) as recorder, torch.no_grad():
        with pytest.raises(IndexError):
            model(input_ids=torch.full((BATCH, SEQ), VOCAB + 10))  # out of vocabulary
        model(**inputs)
    assert len(recorder.traces) == 1 and recorder.trace.num_layers == HF_LAYERS["bert"]


def test_body_that_raises_after_forward_restores(tiny_hf, hf_inputs, hooks_of):
    model = tiny_hf("gpt2")
    before = hooks_of(model)
    with pytest.raises(Boom):
        with attnflow.attach(model), torch.no_grad():
            model(**hf_inputs())
            raise Boom("user code")
    assert model.config._attn_implementation == "sdpa"
    assert hooks_of(model) == before


def test_unknown_option_is_an_option_error(tiny_hf, hf_inputs):
    model = tiny_hf("bert")
    with pytest.raises(attnflow.OptionError, match="modulez"):
        attnflow.capture(model, adapter_options={"modulez": ["x"]}, **hf_inputs())
    assert model.config._attn_implementation == "sdpa"


# -- models that hide their attention -------------------------------------------------------------------


class SdpaOnlyAttention(nn.Module):
    """Attention that calls PyTorch's fused SDPA directly: the probabilities never exist."""

    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, hidden):
        b, s, d = hidden.shape
        q, k, v = self.qkv(hidden).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, s, d), None


class SdpaOnlyModel(transformers.PreTrainedModel):
    config_class = transformers.BertConfig
    base_model_prefix = "sdpa_only"
    _supports_sdpa = True
    _can_record_outputs = {"attentions": SdpaOnlyAttention}

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([SdpaOnlyAttention(config) for _ in range(config.num_hidden_layers)])
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = hidden + layer(hidden)[0]
        return hidden


def sdpa_only_config(**kwargs):
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=HEADS, **kwargs
    )


def test_attention_that_cannot_be_switched_raises_hidden_attention_error(hf_inputs, hooks_of):
    model = SdpaOnlyModel(sdpa_only_config()).eval()
    assert model.config._attn_implementation == "sdpa"
    before = hooks_of(model)
    # transformers itself refuses: this module's attention does not go through its attention interface
    assert not model._can_set_attn_implementation()
    with pytest.raises(attnflow.HiddenAttentionError, match="attn_implementation='eager'") as info:
        attnflow.capture(model, **hf_inputs())
    assert "SdpaOnlyModel" in str(info.value) and "'sdpa'" in str(info.value)
    assert model.config._attn_implementation == "sdpa"
    assert hooks_of(model) == before


def test_eager_model_whose_attention_returns_no_weights_raises(hf_inputs, hooks_of):
    model = SdpaOnlyModel(sdpa_only_config(attn_implementation="eager")).eval()
    before = hooks_of(model)
    with pytest.raises(attnflow.HiddenAttentionError, match=r"layers\.0 \(SdpaOnlyAttention\) returned no attention"):
        attnflow.capture(model, **hf_inputs())
    assert model.config._attn_implementation == "eager"
    assert hooks_of(model) == before


def test_model_declaring_no_attention_falls_back_to_attention_modules(hf_inputs):
    class Undeclared(SdpaOnlyModel):
        _can_record_outputs = {}

    # the generic search finds the modules whose class says Attention; these return no weights
    model = Undeclared(sdpa_only_config(attn_implementation="eager")).eval()
    with pytest.raises(attnflow.HiddenAttentionError, match=r"layers\.0 \(SdpaOnlyAttention\) returned no attention"):
        attnflow.capture(model, **hf_inputs())
    with pytest.raises(attnflow.AdapterError, match="no module of Undeclared matches"):
        attnflow.capture(model, adapter_options={"modules": ["blocks.*"]}, **hf_inputs())

    class Mixer(SdpaOnlyAttention):
        pass

    class Unnamed(Undeclared):
        def __init__(self, config):
            super().__init__(config)
            self.layers = nn.ModuleList([Mixer(config) for _ in range(config.num_hidden_layers)])

    with pytest.raises(attnflow.AdapterError, match="declares no attention outputs.*modules"):
        attnflow.capture(Unnamed(sdpa_only_config(attn_implementation="eager")).eval(), **hf_inputs())


# -- the real model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    adapter = attnflow.get_adapter("transformers")
    model, tokenizer = adapter.load_model(str(minilm_dir))
    return adapter, model, tokenizer


@pytest.mark.slow
def test_minilm_end_to_end_under_default_sdpa(minilm, minilm_dir):
    adapter, model, tokenizer = minilm
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config._attn_implementation == "sdpa"
    texts = ["The keys to the cabinet are on the table.", "Attention flows."]
    inputs = adapter.encode(tokenizer, texts)
    assert set(inputs) >= {"input_ids", "attention_mask"} and all(isinstance(v, torch.Tensor) for v in inputs.values())
    assert inputs["attention_mask"][1].sum() < inputs["attention_mask"][0].sum()  # the short text is padded

    trace = attnflow.capture(model, tokens=tokenizer, **inputs)
    assert model.config._attn_implementation == "sdpa"
    assert trace.num_layers == 6 and trace.num_heads == (12,) * 6 and trace.batch_size == 2
    assert trace.tokens[0][0] == "[CLS]" and "cabinet" in trace.tokens[0] and trace.tokens[1][-1] == "[PAD]"
    np.testing.assert_array_equal(trace.mask, inputs["attention_mask"].numpy().astype(bool))
    assert trace.causal is False

    reference = transformers.AutoModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = reference(**inputs, output_attentions=True).attentions
    diff = max_diff(trace, [a.numpy() for a in attentions])
    assert diff <= TOL, diff
    for layer in trace.layers:
        sums = layer.weights.sum(-1, dtype=np.float64)[trace.mask[:, None, :].repeat(12, 1)]
        np.testing.assert_allclose(sums, 1.0, atol=1e-5)


@pytest.mark.slow
def test_minilm_encode_truncates(minilm):
    adapter, _, tokenizer = minilm
    inputs = adapter.encode(tokenizer, ["one two three four five six seven eight"], max_length=5)
    assert inputs["input_ids"].shape == (1, 5)
    single = adapter.encode(tokenizer, "just one text")
    assert single["input_ids"].shape[0] == 1


def test_load_model_errors(tmp_path, monkeypatch):
    adapter = attnflow.get_adapter("transformers")
    with pytest.raises(attnflow.AdapterError, match="No model directory"):
        adapter.load_model(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(attnflow.AdapterError, match="is a file"):
        adapter.load_model(str(tmp_path / "weights.bin"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(attnflow.AdapterError, match="offline"):
        adapter.load_model("attnflow-tests/no-such-model")
    with pytest.raises(attnflow.AdapterError, match="Cannot load"):
        adapter.load_model(str(tmp_path))  # a directory, but no model in it


def test_claims_only_transformers_models(tiny_hf, tiny_encoder):
    adapter = attnflow.get_adapter("transformers")
    assert adapter.priority > attnflow.get_adapter("torch").priority
    assert adapter.claims(tiny_hf("bert"))
    assert not adapter.claims(tiny_encoder())
    assert not adapter.claims(object())


# -- loading: remote code, damaged weights, over-long texts --------------------------------------------------

REMOTE_CODE = '''
import pathlib

pathlib.Path({marker!r}).write_text("the model directory's Python ran")

from transformers import BertConfig, BertModel


class CustomConfig(BertConfig):
    model_type = "attnflow-custom"


class CustomModel(BertModel):
    config_class = CustomConfig
'''


def tiny_model_dir(path, *, max_positions=16):
    """A tiny BERT saved as safetensors, with a real (character) tokenizer: a local model directory."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=20, num_hidden_layers=2, num_attention_heads=4, intermediate_size=28,
        max_position_embeddings=max_positions,
    )
    transformers.BertModel(config).save_pretrained(path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    transformers.BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(path)
    return path


def remote_code_dir(path):
    """A model directory whose config.json maps AutoModel onto its own Python file, which writes a marker."""
    import json

    tiny_model_dir(path)
    marker = path.parent / f"{path.name}-ran"
    (path / "custom.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="attnflow-custom", auto_map={"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"})
    (path / "config.json").write_text(json.dumps(config))
    return path, marker


def test_remote_code_is_refused_even_when_a_prompt_would_be_answered_yes(tmp_path, monkeypatch):
    import io
    import sys

    model_dir, marker = remote_code_dir(tmp_path / "custom")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # transformers' prompt would read "y"
    adapter = attnflow.get_adapter("transformers")
    with pytest.raises(attnflow.AdapterError, match="trust_remote_code") as info:
        adapter.load_model(str(model_dir))
    assert "--trust-remote-code" in str(info.value) and "runs" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_auto_map_is_refused_whatever_the_model_type(tmp_path, where):
    """A built-in model_type ('bert') would load transformers' own class, but the directory asks for its own code
    (auto_map): refused unless trust_remote_code, and nothing of it runs (issue 20, D9)."""
    import json

    model_dir, marker = remote_code_dir(tmp_path / "built-in-type")
    config = json.loads((model_dir / "config.json").read_text())
    mapping = config.pop("auto_map")
    config["model_type"] = "bert"
    if where == "tokenizer_config.json":
        (model_dir / "config.json").write_text(json.dumps(config))
        tokenizer_config = json.loads((model_dir / where).read_text())
        tokenizer_config["auto_map"] = {"AutoTokenizer": ["custom.CustomTokenizer", None]}
        (model_dir / where).write_text(json.dumps(tokenizer_config))
    else:
        (model_dir / where).write_text(json.dumps({**config, "auto_map": mapping}))
    adapter = attnflow.get_adapter("transformers")
    with pytest.raises(attnflow.AdapterError, match=f"auto_map in its config \\({where}\\)"):
        adapter.load_model(str(model_dir))
    assert not marker.exists()


@pytest.mark.slow
def test_remote_code_runs_only_when_asked_for(tmp_path):
    model_dir, marker = remote_code_dir(tmp_path / "custom-optin")
    adapter = attnflow.get_adapter("transformers")
    model, tokenizer = adapter.load_model(str(model_dir), trust_remote_code=True)
    assert marker.read_text() == "the model directory's Python ran"
    assert type(model).__name__ == "CustomModel"
    trace = attnflow.capture(model, tokens=tokenizer, **adapter.encode(tokenizer, ["abc"]))
    assert trace.num_layers == 2


def test_damaged_or_foreign_weights_are_an_adapter_error(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "truncated")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    adapter = attnflow.get_adapter("transformers")
    with pytest.raises(attnflow.AdapterError, match="Cannot load a transformers model"):
        adapter.load_model(str(model_dir))

    pickled = tiny_model_dir(tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    torch.save({"not": object()}, pickled / "pytorch_model.bin")  # a pickle that weights_only loading refuses
    with pytest.raises(attnflow.AdapterError, match="Cannot load a transformers model"):
        adapter.load_model(str(pickled))


def test_text_longer_than_the_model_takes_is_refused_or_truncated(tmp_path):
    adapter = attnflow.get_adapter("transformers")
    model, tokenizer = adapter.load_model(str(tiny_model_dir(tmp_path / "short", max_positions=16)))
    text = " ".join("abcdefghijklmnopqrst")  # 20 characters: 22 tokens with [CLS] and [SEP]
    with pytest.raises(attnflow.OptionError, match=r"22 tokens.*at most 16.*max_length"):
        adapter.encode(tokenizer, ["a b", text])
    inputs = adapter.encode(tokenizer, ["a b", text], max_length=16)
    assert inputs["input_ids"].shape == (2, 16)
    assert attnflow.capture(model, **inputs).seq_len == 16


def test_cross_attention_found_by_path_when_modules_carry_no_flag():
    """Blind spot (issue 20): cross-attention modules without an `is_cross_attention` attribute, captured through
    modules=, are still cross layers onto the encoder stream (by their path), equal to the default capture."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=37, d_model=16, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=20, decoder_ffn_dim=24, max_position_embeddings=32,
        attn_implementation="eager",
    )
    model = transformers.BartModel(config).eval()
    for module in model.modules():
        if hasattr(module, "is_cross_attention"):
            del module.is_cross_attention
    assert not any(hasattr(m, "is_cross_attention") for m in model.modules())
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 2]]), "decoder_input_ids": torch.tensor([[2, 11, 12, 13]])}
    expected = attnflow.capture(model, **inputs)
    trace = attnflow.capture(model, adapter_options={"modules": ["*.self_attn", "*.encoder_attn"]}, **inputs)
    cross = [layer for layer in trace.layers if "encoder_attn" in layer.name]
    assert len(cross) == 3 and all(layer.kind == "cross" for layer in cross)
    assert {layer.key_stream for layer in cross} == {"encoder"} and {layer.query_stream for layer in cross} == {"decoder"}
    assert [layer.name for layer in trace.layers] == [layer.name for layer in expected.layers]
    for ours, theirs in zip(trace.layers, expected.layers):
        np.testing.assert_array_equal(ours.weights, theirs.weights)
        assert (ours.kind, ours.query_stream, ours.key_stream) == (theirs.kind, theirs.query_stream, theirs.key_stream)
