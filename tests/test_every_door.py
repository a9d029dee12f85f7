"""Every method from every door: capture(methods=...), explain(trace, "all"), and the CLI's --methods/--target.

What a method needs is declared once (the capture-kinds table); these tests check that each door records
exactly that, refuses in one message what cannot be captured, and skips with a reason under "all".
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import attnflow
from attnflow.cli import main
from attnflow.recording import CAPABILITIES, KINDS, CaptureUnavailableError, capture_plan

TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]


def _tiny_bert():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(TOKENS), hidden_size=20, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=28, max_position_embeddings=40, attn_implementation="eager")
    return BertModel(config).eval()


def _tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={token: i for i, token in enumerate(TOKENS)})


def served(*kinds: str) -> tuple[str, ...]:
    """The registered methods (plugins included) whose needs are among ``kinds`` (and the weights)."""
    return tuple(m for m in attnflow.list_methods() if set(attnflow.get_method(m).needs) <= {"weights", *kinds})


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory):
    """A family the transformers adapter has no value path map for (values and value zeroing unavailable)."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(1)
    config = DistilBertConfig(vocab_size=len(TOKENS), dim=20, n_layers=2, n_heads=4, hidden_dim=28,
                              max_position_embeddings=40)
    directory = tmp_path_factory.mktemp("distilbert") / "model"
    DistilBertModel(config).save_pretrained(directory, safe_serialization=True)
    _tokenizer().save_pretrained(directory)
    return directory


def test_each_kind_is_declared_once_and_methods_need_only_declared_kinds():
    assert set(CAPABILITIES) >= set(KINDS)
    from attnflow.trace._trace import EXTRA_TOKEN_AXES

    for name, kind in KINDS.items():
        assert kind.how, name
        for extra in kind.extras:
            assert extra in EXTRA_TOKEN_AXES or extra in kind.shared
    for method in attnflow.list_methods():
        assert set(attnflow.get_method(method).needs) <= set(KINDS), method


class WeightsOnly(attnflow.Adapter):
    """An adapter that records attention weights and nothing else (its hooks are never installed here)."""

    name = "weights_only_for_test"
    framework = "torch"

    def claims(self, model):
        return False

    def hooks(self, model, recorder, **options):
        raise AssertionError("not installed in these tests")


def test_plan_names_every_missing_need_at_once():
    penzai = WeightsOnly()
    with pytest.raises(attnflow.AdapterError) as info:
        capture_plan(["alti", "value_zeroing", "grad_rollout", "rollout"], penzai)
    message = str(info.value)
    for need, method in (("'values'", "alti"), ("'value_zeroing'", "value_zeroing"), ("'attn_grad'", "grad_rollout")):
        line = next(line for line in message.splitlines() if need in line)
        assert method in line and "transformers" in line, line
    plan = capture_plan("all", penzai)
    assert plan.methods == served() and plan.kinds == {"weights"} and {"raw", "rollout", "flow"} <= set(plan.methods)
    assert set(plan.skipped) == set(attnflow.list_methods()) - set(served())
    assert "'attn_grad'" in plan.skipped["grad_rollout"]


def test_capture_records_exactly_what_the_methods_need():
    model, tokenizer = _tiny_bert(), _tokenizer()
    inputs = tokenizer(["a b c d e", "f g h"], return_tensors="pt", padding=True)
    norm_only = attnflow.capture(model, tokens=tokenizer, methods=["norm"], **inputs)
    assert "value" in norm_only.layers[0].extras and "attn_grad" not in norm_only.layers[0].extras
    assert "value_zeroing" not in norm_only.layers[0].extras
    grad_only = attnflow.capture(model, tokens=tokenizer, methods="grad_rollout,rollout", **inputs)
    assert set(grad_only.layers[0].extras) == {"attn_grad"}
    everything = attnflow.capture(model, tokens=tokenizer, methods="all", **inputs)
    assert {"attn_grad", "value", "value_zeroing"} <= set(everything.layers[0].extras)
    explanation = attnflow.explain(everything, "all")
    assert explanation.methods == tuple(attnflow.list_methods()) and explanation.skipped == {}
    assert _hooks(model) == 0


def test_embedding_target_gradient_against_autograd():
    """A model without logits: the gradient target is <h, h0/|h0|>, h the mean-pooled last hidden state over real
    tokens, recomputed here with plain autograd on the eager attentions the model returns."""
    import torch

    model, tokenizer = _tiny_bert(), _tokenizer()
    inputs = tokenizer(["a b c d e", "f g h"], return_tensors="pt", padding=True)
    trace = attnflow.capture(model, tokens=tokenizer, methods=["grad_rollout"], **inputs)

    with torch.enable_grad():
        output = model(**inputs, output_attentions=True)
        mask = inputs["attention_mask"].to(output.last_hidden_state.dtype)
        pooled = (output.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        direction = pooled.detach() / pooled.detach().norm(dim=-1, keepdim=True)
        grads = torch.autograd.grad((pooled * direction).sum(), output.attentions)
    for layer, grad in zip(trace.layers, grads):
        np.testing.assert_allclose(layer.extras["attn_grad"], grad.numpy(), atol=1e-6)
    assert np.abs(grads[-1].numpy()).max() > 1e-4  # a target that depends on the attention


def test_all_skips_kinds_the_model_cannot_serve(distilbert_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(distilbert_dir, attn_implementation="eager").eval()
    tokenizer = _tokenizer()
    inputs = tokenizer(["a b c d e"], return_tensors="pt")
    with pytest.raises(CaptureUnavailableError) as info:
        attnflow.capture(model, tokens=tokenizer, methods=["alti"], **inputs)
    assert info.value.kind == "values" and "register_value_map" in str(info.value)
    assert _hooks(model) == 0
    trace = attnflow.capture(model, tokens=tokenizer, methods="all", **inputs)
    assert _hooks(model) == 0
    skipped = trace.metadata["skipped_methods"]
    assert {"norm", "norm_residual", "alti", "effective_attention", "value_zeroing"} <= set(skipped)
    explanation = attnflow.explain(trace, "all")
    assert explanation.methods == served("attn_grad")
    assert explanation.skipped["alti"] == skipped["alti"]


def test_explicit_list_is_refused_in_one_error_naming_each_method():
    model, tokenizer = _tiny_bert(), _tokenizer()
    trace = attnflow.capture(model, tokens=tokenizer, **tokenizer(["a b c"], return_tensors="pt"))
    with pytest.raises(attnflow.MethodError) as info:
        attnflow.explain(trace, ["rollout", "alti", "grad_rollout", "value_zeroing"])
    lines = str(info.value).splitlines()
    assert lines[0].startswith("3 of the methods")
    for method in ("alti", "grad_rollout", "value_zeroing"):
        assert any(line.strip().startswith(f"- {method}:") for line in lines), method
    explanation = attnflow.explain(trace, "all")
    assert explanation.methods == served()
    assert "values=True" in explanation.skipped["alti"]


def test_skipped_methods_survive_save_and_load(tmp_path):
    model, tokenizer = _tiny_bert(), _tokenizer()
    trace = attnflow.capture(model, tokens=tokenizer, **tokenizer(["a b c"], return_tensors="pt"))
    explanation = attnflow.explain(trace, "all")
    explanation.save(tmp_path / "e.safetensors")
    from attnflow._explanation import load_explanation

    assert load_explanation(tmp_path / "e.safetensors").skipped == explanation.skipped != {}


def test_cli_all_lists_skipped_methods(distilbert_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["explain", "a b c d e", "--model", str(distilbert_dir), "--methods", "all", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "skipped alti:" in captured.err and "register_value_map" in captured.err
    document = json.loads((out / "explanation.json").read_text())
    assert document["attnflow"] == attnflow.__version__
    assert tuple(document["scores"]) == served("attn_grad")
    for name in document["scores"]:
        assert (out / f"{name}.png").stat().st_size > 0


def test_cli_refuses_before_loading(tmp_path, capsys):
    missing = tmp_path / "no-model"  # never loaded: the refusals come first
    assert main(["explain", "a b", "--model", str(missing), "--methods", "rollout", "--target", "3"]) == 1
    assert "--target chooses the score" in capsys.readouterr().err
    assert main(["explain", "a b", "--model", str(missing), "--methods", "grad_rollout", "--target", "x"]) == 1
    assert "--target must be auto, embedding or a logit index" in capsys.readouterr().err
    assert main(["explain", "a b", "--model", str(missing), "--methods", "alti,nope"]) == 1
    assert "No method named 'nope'" in capsys.readouterr().err
    assert main(["explain", "a b", "--adapter", "timm", "--methods", "alti,value_zeroing,rollout"]) == 1
    err = capsys.readouterr().err
    assert "'values' (alti)" in err and "'value_zeroing' (value_zeroing)" in err


def test_compare_all_methods(tmp_path, capsys):
    model, tokenizer = _tiny_bert(), _tokenizer()
    inputs = tokenizer(["a b c d"], return_tensors="pt")
    trace = attnflow.capture(model, tokens=tokenizer, methods=["alti", "norm"], **inputs)
    trace.save(tmp_path / "a.safetensors")
    trace.save(tmp_path / "b.safetensors")
    report = attnflow.compare(trace, trace, methods="all", flow=False)
    assert set(report.methods) == set(served("values")) - {"raw", "rollout", "flow"}
    assert {"norm", "norm_residual", "alti", "effective_attention"} <= set(report.methods)
    assert all(value == 0.0 for value in report.methods.values())


@pytest.mark.slow
def test_cli_contribution_methods_on_the_packaged_model(tmp_path):
    """The issue's command: explain a sentence with alti, norm, grad_rollout and value_zeroing."""
    out = tmp_path / "out"
    assert main(["explain", "The keys to the cabinet are on the table.", "--methods",
                 "alti,norm,grad_rollout,value_zeroing", "--out", str(out)]) == 0
    document = json.loads((out / "explanation.json").read_text())
    trace = attnflow.load(out / "trace.safetensors")
    assert {"attn_grad", "value", "value_zeroing"} <= set(trace.layers[-1].extras)
    explanation = attnflow.explain(trace, ["alti", "norm", "grad_rollout", "value_zeroing"])
    for method in ("alti", "norm", "grad_rollout", "value_zeroing"):
        np.testing.assert_allclose(document["matrices"][method], explanation[method][0], atol=1e-12)
    np.testing.assert_allclose(np.array(document["matrices"]["alti"]).sum(-1), 1.0, atol=1e-9)


def test_batch_all_skips_what_the_model_cannot_serve(distilbert_dir, tmp_path):
    import distributed

    from attnflow._explanation import load_explanation
    from attnflow.batch._settings import make_settings

    settings = make_settings(adapter="timm", model=None, methods="all", sources=None, all_layers=False, options=None,
                             max_length=None, local=True)
    assert settings.methods == served("attn_grad") and settings.everything
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "x", "text": "a b c d"}) + "\n" + json.dumps({"id": "y", "text": "e f"}) + "\n")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        summary = attnflow.run_batch(path, tmp_path / "out", model=str(distilbert_dir), methods="all", client=client)
    assert (summary.done, summary.failed) == (2, [])
    stored = load_explanation(tmp_path / "out" / "examples" / "x.safetensors")
    assert stored.methods == served("attn_grad")
    assert "register_value_map" in stored.skipped["alti"] and "register_value_map" in stored.skipped["value_zeroing"]


@pytest.mark.slow
def test_the_demo_command_runs_and_shows_alti(tmp_path):
    """`make demo`'s command line, read from the Makefile and run as written (into a temporary --out)."""
    import re
    import shlex
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n\t(.*)$", makefile, re.M).group(1)
    words = shlex.split(recipe)
    assert words[0] == "HF_HUB_OFFLINE=1" and words[1].endswith("/bin/attnflow")
    args = words[2:]
    args[args.index("--out") + 1] = str(tmp_path / "out")
    assert main(args) == 0
    document = json.loads((tmp_path / "out" / "explanation.json").read_text())
    assert list(document["scores"]) == ["raw", "rollout", "flow", "alti"]
    assert (tmp_path / "out" / "alti.png").stat().st_size > 0
    assert "alti" in (tmp_path / "out" / "explanation.html").read_text()


def test_all_with_a_target_on_an_adapter_without_gradients_skips_instead_of_failing():
    """methods='all' with target= through the generic torch adapter: the gradient methods are skipped (the
    target serves none of the others), not an AdapterError."""
    import torch

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(12, 3, dim_feedforward=10, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    trace = attnflow.capture(model, torch.randn(2, 5, 12), adapter="torch", methods="all", target=0)
    assert "attn_grad" not in trace.layers[0].extras
    assert "'attn_grad'" in trace.metadata["skipped_methods"]["grad_rollout"]
    with pytest.raises(attnflow.AdapterError, match="attn_grad"):  # asked for explicitly: refused
        attnflow.capture(model, torch.randn(2, 5, 12), adapter="torch", methods=["grad_rollout"])
