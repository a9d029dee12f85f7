"""attnflow.faithfulness: blank-out and input gradients against the model run directly on edited inputs (and
differentiated through inputs_embeds), Spearman against scipy, AOPC against a hand-computed case, the oracle
and random baselines, the Flax probe against its PyTorch twin, the error cases and ``attnflow evaluate``."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.stats

import attnflow
from attnflow import AdapterError, AttentionTrace, Explanation, OptionError, Options
from attnflow.evaluate import evaluate_probe, rankdata, resolve_target, spearman
from attnflow.evaluate._stats import steps

# A distinct size on every axis: batch 2, tokens 7 (item 1: 5 real), hidden 24, heads 3, layers 4, classes 5,
# vocabulary 50.
BATCH, SEQ, HIDDEN, HEADS, LAYERS, CLASSES, VOCAB = 2, 7, 24, 3, 4, 5, 50
MASK_ID, UNK_ID = 4, 1
TOKENIZER = SimpleNamespace(mask_token_id=MASK_ID, unk_token_id=UNK_ID)
ROOT = Path(__file__).resolve().parent.parent


# -- statistics -----------------------------------------------------------------------------------------
def test_spearman_and_ranks_match_scipy():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 12):
        for _ in range(50):
            x = rng.integers(0, 4, size=n).astype(float)  # ties on purpose
            y = rng.normal(size=n) if rng.random() < 0.5 else rng.integers(0, 3, size=n).astype(float)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
                expected = scipy.stats.spearmanr(x, y).statistic
            got = float(spearman(x, y))
            assert (np.isnan(got) and np.isnan(expected)) or abs(got - expected) < 1e-12, (x, y)
            np.testing.assert_allclose(rankdata(x), scipy.stats.rankdata(x))
    stacked = rng.normal(size=(3, 4, 9))  # batched along leading axes, against one reference
    reference = rng.normal(size=9)
    expected = [[scipy.stats.spearmanr(row, reference).statistic for row in block] for block in stacked]
    np.testing.assert_allclose(spearman(stacked, reference), expected, atol=1e-12)
    assert np.isnan(spearman(np.ones(4), np.arange(4.0))) and np.isnan(spearman([1.0], [2.0]))


def test_steps_round_fractions_of_tokens():
    assert steps(10, (0.0, 0.1, 0.3, 1.0)) == [0, 1, 3, 10]  # 0.3 * 10 is 3, not 4
    assert steps(12, (0.01, 0.05, 0.1, 0.2, 0.5), at_least_one=True) == [1, 1, 2, 3, 6]
    assert steps(0, (0.5,), at_least_one=True) == [0]


# -- a model in numpy: each token adds its weight unless blanked ---------------------------------------
class AdditiveProbe(attnflow.evaluate.Probe):
    """score(x without S) = Σ_{j ∉ S} w_j over real tokens: blank-out importance of j is exactly w_j."""

    def __init__(self, weights: np.ndarray, mask: np.ndarray):
        self.weights, self.mask = np.asarray(weights, float), np.asarray(mask, bool)
        self.base = (self.weights * self.mask).sum(1)
        self.positions, self.target, self.vector = None, resolve_target("logits", len(self.base)), False
        self.rows = 0

    def scores(self, items, blanked):
        self.rows += len(items)
        return ((self.weights[items] * self.mask[items]) * ~np.asarray(blanked)).sum(1)

    def gradients(self):
        return {"grad_norm": np.abs(self.weights), "grad_x_input": self.weights.copy()}


def explanation_of(scores: dict[str, np.ndarray], mask: np.ndarray, special: np.ndarray | None = None) -> Explanation:
    """An explanation holding the given ``(layers, batch, tokens)`` scores for one explained token per item."""
    batch, length = mask.shape
    weights = np.broadcast_to(np.eye(length), (batch, 1, length, length)).copy()
    trace = AttentionTrace.from_arrays([weights], mask=mask, special=special)
    return Explanation(
        scores={name: {"tokens": np.asarray(v, float)[:, :, None, :]} for name, v in scores.items()},
        layers={name: list(range(np.shape(v)[0])) for name, v in scores.items()}, stream="tokens",
        streams=trace.streams, sources=np.zeros((batch, 1), np.int64), requested_sources=[0], options=Options(),
    )


def test_aopc_and_curves_against_a_hand_computed_case():
    mask = np.ones((1, 5), bool)
    probe = AdditiveProbe(np.array([[5.0, 4.0, 3.0, 2.0, 1.0]]), mask)  # base 15
    ranked = np.array([[[0.9, 0.7, 0.5, 0.3, 0.1]]])  # the true order
    reversed_ = ranked[:, :, ::-1]
    report = evaluate_probe(probe, explanation_of({"good": ranked, "bad": reversed_}, mask), references=["blankout"],
                            bins=(0.2, 0.5), grid=(0.0, 0.2, 1.0))
    # good: bins remove ceil(0.2*5)=1 and ceil(0.5*5)=3 tokens: {5} and {5,4,3}
    assert report.comprehensiveness["good"][0] == pytest.approx(((15 - 10) + (15 - 3)) / 2)  # 8.5
    assert report.sufficiency["good"][0] == pytest.approx(((15 - 5) + (15 - 12)) / 2)  # 6.5
    # bad removes {1} and {1,2,3}, keeps {1} and {1,2,3}
    assert report.comprehensiveness["bad"][0] == pytest.approx(((15 - 14) + (15 - 9)) / 2)  # 3.5
    assert report.sufficiency["bad"][0] == pytest.approx(((15 - 1) + (15 - 6)) / 2)  # 11.5
    np.testing.assert_allclose(report.item_curves["good"]["deletion"][0], [15, 10, 0])
    np.testing.assert_allclose(report.item_curves["good"]["insertion"][0], [0, 5, 15])
    np.testing.assert_allclose(report.curves["bad"]["deletion"], [15, 14, 0])
    assert report.aopc["good"]["comprehensiveness"] == pytest.approx(8.5)
    assert report.spearman["good"]["blankout"][0] == pytest.approx(1.0)
    assert report.spearman["bad"]["blankout"][0] == pytest.approx(-1.0)
    np.testing.assert_allclose(report.importances["blankout"][0], [5, 4, 3, 2, 1])


def test_aopc_is_the_mean_over_the_bins_on_a_two_item_example():
    # item 0: weights 4,3,2,1 (base 10); item 1: weights 6,1,2 and a padding token (base 9). The method ranks
    # item 0 in the true order and item 1 as 1 > 2 > 6. Bins 0.25 and 0.5 remove ceil(0.25 n), ceil(0.5 n) tokens:
    # item 0: 1 and 2 tokens; item 1: 1 and 2 tokens.
    mask = np.array([[True] * 4, [True] * 3 + [False]])
    weights = np.array([[4.0, 3.0, 2.0, 1.0], [6.0, 1.0, 2.0, 0.0]])
    probe = AdditiveProbe(weights, mask)
    scores = np.array([[[4.0, 3.0, 2.0, 1.0], [1.0, 3.0, 2.0, 0.0]]])
    report = evaluate_probe(probe, explanation_of({"m": scores}, mask), references=["blankout"], bins=(0.25, 0.5),
                            grid=(0.0, 1.0), seed=0)
    # comprehensiveness: the drop with the top k removed; item 0: (4) and (4+3); item 1: top is token 1 (w 1),
    # then token 2 (w 2): drops 1 and 3
    comprehensiveness = [(4 + 7) / 2, (1 + 3) / 2]
    # sufficiency: the drop with only the top k kept; item 0: keep 4 → 10-4=6, keep 4,3 → 3; item 1: keep
    # w 1 → 9-1=8, keep 1,2 → 6
    sufficiency = [(6 + 3) / 2, (8 + 6) / 2]
    np.testing.assert_allclose(report.comprehensiveness["m"], comprehensiveness)
    np.testing.assert_allclose(report.sufficiency["m"], sufficiency)
    assert report.aopc["m"]["comprehensiveness"] == pytest.approx(np.mean(comprehensiveness))  # 3.75
    assert report.aopc["m"]["sufficiency"] == pytest.approx(np.mean(sufficiency))  # 5.75
    # not the paper's printed 1/(|B|+1) normalisation, which gives 2/3 of these with two bins
    assert report.aopc["m"]["comprehensiveness"] != pytest.approx(np.mean(comprehensiveness) * 2 / 3)


def test_special_tokens_are_left_out_by_default():
    mask = np.ones((1, 5), bool)
    special = np.array([[True, False, False, False, True]])
    probe = AdditiveProbe(np.array([[0.1, 5.0, 4.0, 3.0, 0.2]]), mask)
    scores = {"cls_first": np.array([[[9.0, 5.0, 4.0, 3.0, 8.0]]])}  # a method that ranks [CLS] and [SEP] top
    default = evaluate_probe(probe, explanation_of(scores, mask, special), references=["blankout"], bins=(0.4,),
                             grid=(0.0,))
    assert default.settings["special"] is False
    assert default.correlations["cls_first"]["blankout"][0, 0] == pytest.approx(1.0)  # 5 > 4 > 3 among the words
    assert default.comprehensiveness["cls_first"][0] == pytest.approx(5.0 + 4.0)  # ceil(0.4 * 3) = 2 words removed
    kept = evaluate_probe(probe, explanation_of(scores, mask, special), references=["blankout"], special=True,
                          bins=(0.4,), grid=(0.0,))
    assert kept.correlations["cls_first"]["blankout"][0, 0] < 0.5
    assert kept.comprehensiveness["cls_first"][0] == pytest.approx(0.1 + 0.2)  # [CLS] and [SEP] removed first


def test_a_negative_seed_is_refused():
    mask = np.ones((1, 3), bool)
    probe = AdditiveProbe(np.array([[1.0, 2.0, 3.0]]), mask)
    with pytest.raises(OptionError, match="seed must be an integer >= 0"):
        evaluate_probe(probe, explanation_of({"m": np.ones((1, 1, 3))}, mask), seed=-1)


def test_the_blankout_itself_scores_one_and_a_random_ranking_about_zero():
    rng = np.random.default_rng(7)
    items, length = 600, 9
    mask = np.ones((items, length), bool)
    mask[::3, 7:] = False  # a third of the items have 7 real tokens
    probe = AdditiveProbe(rng.gamma(2.0, size=(items, length)), mask)
    oracle = np.where(mask, probe.weights, 0.0)[None]  # the blank-out importance itself, one layer
    report = evaluate_probe(probe, explanation_of({"oracle": oracle}, mask), seed=3)
    np.testing.assert_allclose(report.correlations["oracle"]["blankout"], 1.0)
    # a random ranking: Spearman has mean 0 and variance 1/(n-1) per item, so the mean over 600 items has a
    # standard deviation under 0.015; with a fixed seed the value is fixed, 0.06 is four of those deviations.
    assert abs(report.spearman["random"]["blankout"][0]) < 0.06
    assert report.aopc["oracle"]["comprehensiveness"] > report.aopc["random"]["comprehensiveness"] + 1.0
    assert report.aopc["oracle"]["sufficiency"] < report.aopc["random"]["sufficiency"] - 1.0
    again = evaluate_probe(probe, explanation_of({"oracle": oracle}, mask), seed=3)
    np.testing.assert_array_equal(again.correlations["random"]["blankout"], report.correlations["random"]["blankout"])


def test_special_tokens_and_padding_are_left_out_when_asked():
    mask = np.array([[True] * 6, [True] * 4 + [False] * 2])
    special = np.zeros_like(mask)
    special[:, 0] = True
    probe = AdditiveProbe(np.arange(12.0).reshape(2, 6) + 1, mask)
    scores = {"m": np.arange(12.0).reshape(1, 2, 6)}
    kept = evaluate_probe(probe, explanation_of(scores, mask, special), references=["blankout"], special=True)
    left_out = evaluate_probe(probe, explanation_of(scores, mask, special), references=["blankout"], special=False)
    assert np.isnan(kept.importances["blankout"][1, 4:]).all() and not np.isnan(kept.importances["blankout"][:, 0]).any()
    assert np.isnan(left_out.importances["blankout"][:, 0]).all()
    np.testing.assert_allclose(left_out.importances["blankout"][0, 1:], [2, 3, 4, 5, 6])


def test_report_round_trips_concatenates_and_tabulates():
    rng = np.random.default_rng(1)
    mask = np.ones((3, 6), bool)
    probe = AdditiveProbe(rng.random((3, 6)), mask)
    report = evaluate_probe(probe, explanation_of({"m": rng.random((2, 3, 6))}, mask))
    again = attnflow.FaithfulnessReport.from_dict(json.loads(json.dumps(report.to_dict())))
    np.testing.assert_array_equal(again.correlations["m"]["grad_norm"], report.correlations["m"]["grad_norm"])
    merged = attnflow.FaithfulnessReport.concat([report.select([0]), report.select([1, 2])])
    np.testing.assert_allclose(merged.correlations["m"]["blankout"], report.correlations["m"]["blankout"])
    frame = merged.to_frame()
    assert list(frame.columns) == ["method", "reference", "layer", "mean", "std", "n"]
    row = frame[(frame.method == "m") & (frame.reference == "blankout") & (frame.layer == 2)].iloc[0]  # 1-based
    values = report.correlations["m"]["blankout"][1]
    assert row["mean"] == pytest.approx(values.mean()) and row["std"] == pytest.approx(values.std()) and row["n"] == 3
    table = report.table("blankout")
    assert table.splitlines()[0].split() == ["L1", "L2"] and table.splitlines()[1].startswith("m ")


# -- PyTorch / transformers: against the model run directly --------------------------------------------
@pytest.fixture(scope="module")
def bert_classifier():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=20,
        max_position_embeddings=32, num_labels=CLASSES, initializer_range=0.3,
    )
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def inputs():
    import torch

    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def direct_blankout(model, inputs, score, blank):
    """base - score(edited input), one token at a time, the model called directly (no attnflow) on a batch per
    item: row 0 the item as it is, row 1 + j the item with token j blanked (``zero``: the (rows, positions)
    whose input embedding ``score`` sets to zero). ``score`` returns one score per row."""
    import torch

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = np.full(ids.shape, np.nan)
    with torch.no_grad():
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            edited = ids[b : b + 1].repeat(n + 1, 1)
            rows, positions = torch.arange(1, n + 1), torch.arange(n)
            zero = None
            if blank == "zero":
                zero = (rows, positions)
            else:
                edited[rows, positions] = blank
            scores = score(model, edited, mask[b : b + 1].repeat(n + 1, 1), zero, b).double().numpy()
            out[b, :n] = scores[0] - scores[1:]
    return out


def embeds(model, ids, zero=None):
    e = model.get_input_embeddings()(ids).detach()
    if zero is not None:
        e[zero] = 0.0
    return e


def test_blankout_and_gradients_of_a_classifier_match_direct_computations(bert_classifier, inputs):
    import torch

    model = bert_classifier
    trace = attnflow.capture(model, **inputs)
    explanation = attnflow.explain(trace, ["raw", "rollout", "flow"], sources=[0], all_layers=True)
    with torch.no_grad():
        classes = model(**inputs).logits.argmax(-1)  # target=None: each item's argmax on the unablated input

    def logit(model, ids, mask, zero, b):
        return model(inputs_embeds=embeds(model, ids, zero), attention_mask=mask).logits[:, classes[b]]

    for blank, blank_id in (("unk", UNK_ID), ("zero", "zero"), ("mask", MASK_ID)):
        report = attnflow.faithfulness(model, explanation, blank=blank, tokenizer=TOKENIZER, curves=blank == "mask",
                                       **inputs)
        np.testing.assert_allclose(report.importances["blankout"], direct_blankout(model, inputs, logit, blank_id),
                                   atol=2e-5)
    # the last report (blank="mask") has curves
    # gradients through inputs_embeds, computed here
    mask = inputs["attention_mask"]
    e = embeds(model, inputs["input_ids"]).requires_grad_(True)
    chosen = model(inputs_embeds=e, attention_mask=mask).logits.gather(1, classes[:, None]).sum()
    (grad,) = torch.autograd.grad(chosen, e)
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(report.importances["grad_norm"][real], grad.norm(dim=-1).numpy()[real], rtol=1e-4)
    np.testing.assert_allclose(report.importances["grad_x_input"][real], (grad * e).sum(-1).detach().numpy()[real],
                               rtol=1e-4, atol=1e-6)
    assert np.isnan(report.importances["grad_norm"][1, 5:]).all()  # padding is not compared
    # a scalar target is its own projection: grad_norm_proj is grad_norm
    projection = attnflow.faithfulness(model, explanation, tokenizer=TOKENIZER, curves=False,
                                       references=["grad_norm_proj"], **inputs)
    np.testing.assert_allclose(projection.importances["grad_norm_proj"][real], grad.norm(dim=-1).numpy()[real],
                               rtol=1e-4)
    # the Spearman correlations are those of the explanation's [CLS] rows with |reference|, per item and layer
    for method in ("raw", "flow"):
        layers = explanation.layers(method)[:, :, 0]
        for b in range(BATCH):
            n = int(real[b].sum())
            expected = [scipy.stats.spearmanr(layers[d, b, :n], np.abs(report.importances["blankout"][b, :n])).statistic
                        for d in range(layers.shape[0])]
            np.testing.assert_allclose(report.correlations[method]["blankout"][:, b], expected, atol=1e-12)
    assert report.layers["flow"] == (0, 1, 2, 3) and report.layers["random"] == (0, 1, 2, 3)
    assert not any(p.grad is not None for p in model.parameters())  # parameters' .grad untouched
    # curves: deletion at fraction 0 is the unablated score, at 1 every real token blanked
    curves = report.item_curves["raw"]["deletion"]
    np.testing.assert_allclose(curves[:, 0], report.base)
    everything = inputs["input_ids"].clone()
    everything[mask.bool()] = MASK_ID
    with torch.no_grad():
        blanked = model(input_ids=everything, attention_mask=mask).logits.gather(1, classes[:, None])[:, 0].numpy()
    np.testing.assert_allclose(curves[:, -1], blanked, atol=2e-5)


def test_embedding_target_matches_the_jacobian_computed_directly(tiny_hf, inputs):
    import torch

    model = tiny_hf("bert")  # BertModel: no logits, so the target is the pooled embedding's cosine
    trace = attnflow.capture(model, **inputs)
    explanation = attnflow.explain(trace, ["raw", "rollout"], all_layers=True)  # all tokens: source "mean"
    said = []
    report = attnflow.faithfulness(model, explanation, blank="mask", tokenizer=TOKENIZER, curves=False,
                                   references=["blankout", "grad_norm", "grad_x_input", "grad_norm_proj"],
                                   notice=said.append, **inputs)
    assert report.settings["target"].startswith("embedding") and report.settings["source"].startswith("mean")
    assert len(said) == 1 and f"({HIDDEN} dimensions)" in said[0] and "grad_norm_proj" in said[0]
    said.clear()
    alone = attnflow.faithfulness(model, explanation, tokenizer=TOKENIZER, curves=False, references=["grad_norm_proj"],
                                  notice=said.append, **inputs)
    assert not said and list(alone.importances) == ["grad_norm_proj"]
    mask = inputs["attention_mask"]

    def pooled(model, e, m):
        hidden = model(inputs_embeds=e, attention_mask=m).last_hidden_state
        return (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True)

    base = [pooled(model, embeds(model, inputs["input_ids"][b : b + 1]), mask[b : b + 1]).detach() for b in range(BATCH)]

    def cosine(model, ids, m, zero, b):
        return torch.nn.functional.cosine_similarity(pooled(model, embeds(model, ids, zero), m), base[b])

    np.testing.assert_allclose(report.importances["blankout"], direct_blankout(model, inputs, cosine, MASK_ID),
                               atol=2e-5)
    for b in range(BATCH):
        n = int(mask[b].sum())
        e = embeds(model, inputs["input_ids"][b : b + 1, :n])
        real = mask[b : b + 1, :n]
        jacobian = torch.autograd.functional.jacobian(lambda x, real=real: pooled(model, x, real)[0], e,
                                                      vectorize=True)[:, 0]  # one batched backward pass
        u = base[b][0] / base[b][0].norm()
        projected = jacobian - torch.einsum("d,te->dte", u, torch.einsum("dte,d->te", jacobian, u))  # (D, n, E)
        np.testing.assert_allclose(report.importances["grad_norm"][b, :n], projected.pow(2).sum((0, 2)).sqrt(),
                                   rtol=1e-4)
        moved = torch.einsum("dte,te->dt", projected, e[0]).norm(dim=0)
        np.testing.assert_allclose(report.importances["grad_x_input"][b, :n], moved, rtol=1e-4, atol=1e-7)
        # grad_norm_proj: the gradient of <v(x), u>, one backward pass, from the Jacobian and alone
        along = torch.einsum("dte,d->te", jacobian, u).norm(dim=-1)
        np.testing.assert_allclose(report.importances["grad_norm_proj"][b, :n], along, rtol=5e-4)  # float32
        np.testing.assert_allclose(alone.importances["grad_norm_proj"][b, :n], along, rtol=5e-4)
    # the compared rows are the mean over each item's real explained tokens
    rollout = explanation.layers("rollout")
    for b in range(BATCH):
        n = int(mask[b].sum())
        mean = rollout[-1, b, :n, :n].mean(0)
        expected = scipy.stats.spearmanr(mean, np.abs(report.importances["blankout"][b, :n])).statistic
        assert report.correlations["rollout"]["blankout"][-1, b] == pytest.approx(expected, abs=1e-12)


def test_masked_and_next_token_targets_read_the_right_position(tiny_hf, inputs):
    import torch
    import transformers

    torch.manual_seed(1)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                                     intermediate_size=20, max_position_embeddings=32)
    mlm = transformers.BertForMaskedLM(config).eval()
    ids = inputs["input_ids"].clone()
    ids[0, 3], ids[1, 2] = MASK_ID, MASK_ID
    masked = {**inputs, "input_ids": ids}
    explanation = attnflow.explain(attnflow.capture(mlm, **masked), ["rollout"], all_layers=True)
    report = attnflow.faithfulness(mlm, explanation, tokenizer=TOKENIZER, references=["blankout"], curves=False,
                                   **masked)
    with torch.no_grad():
        logits = mlm(**masked).logits
    np.testing.assert_allclose(report.base, [logits[0, 3].max(), logits[1, 2].max()], rtol=1e-6)
    assert report.settings["source"] == "the target's position"

    gpt2 = tiny_hf("gpt2")
    lm = transformers.GPT2LMHeadModel(gpt2.config).eval()
    explanation = attnflow.explain(attnflow.capture(lm, **inputs), ["raw"], sources=[-1])
    report = attnflow.faithfulness(lm, explanation, target=7, blank=UNK_ID, references=["blankout"], curves=False,
                                   **inputs)
    with torch.no_grad():
        logits = lm(**inputs).logits
    np.testing.assert_allclose(report.base, [logits[0, SEQ - 1, 7], logits[1, 4, 7]], rtol=1e-6)  # last real tokens


def test_plain_torch_model_with_its_own_embedding(inputs):
    import torch

    torch.manual_seed(2)

    class Classifier(torch.nn.Module):  # no get_input_embeddings: the larger of two nn.Embedding is the tokens'
        def __init__(self):
            super().__init__()
            self.words = torch.nn.Embedding(VOCAB, HIDDEN)
            self.places = torch.nn.Embedding(SEQ, HIDDEN)
            layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, 20, dropout=0.0, batch_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(HIDDEN, CLASSES)

        def forward(self, input_ids, attention_mask):
            x = self.words(input_ids) + self.places.weight[None]
            return self.head(self.encoder(x, src_key_padding_mask=attention_mask == 0)[:, 0])

    model = Classifier().eval()
    explanation = attnflow.explain(attnflow.capture(model, **inputs), ["raw", "rollout"], sources=[0], all_layers=True)
    labels = [3, 1]
    report = attnflow.faithfulness(model, explanation, target=labels, blank="zero", **inputs)

    def logit(model, ids, mask, zero, b):
        x = model.words(ids)
        if zero is not None:
            x[zero] = 0.0
        hidden = model.encoder(x + model.places.weight[None], src_key_padding_mask=mask == 0)
        return model.head(hidden[:, 0])[:, labels[b]]

    np.testing.assert_allclose(report.importances["blankout"], direct_blankout(model, inputs, logit, "zero"), atol=2e-5)
    assert report.settings["adapter"] == "torch"


# -- errors ---------------------------------------------------------------------------------------------
def test_errors_name_what_is_wrong_and_the_fix(bert_classifier, inputs):
    import torch

    model = bert_classifier
    explanation = attnflow.explain(attnflow.capture(model, **inputs), ["raw"], sources=[0])
    with pytest.raises(OptionError, match=r"blank='mask' needs a mask token.*blank='unk'.*blank='zero'"):
        attnflow.faithfulness(model, explanation, blank="mask", **inputs)  # no tokenizer, BertConfig has no mask id
    with pytest.raises(OptionError, match=r"blank='unk' needs a unk token.*blank='zero'"):
        attnflow.faithfulness(model, explanation, blank="unk", tokenizer=SimpleNamespace(), **inputs)
    with pytest.raises(OptionError, match="blank must be one of"):
        attnflow.faithfulness(model, explanation, blank="nothing", **inputs)
    with pytest.raises(OptionError, match="outside the model's vocabulary"):
        attnflow.faithfulness(model, explanation, blank=VOCAB + 3, **inputs)
    with pytest.raises(OptionError, match=f"not an index of the model's {CLASSES} outputs"):
        attnflow.faithfulness(model, explanation, target=CLASSES, blank="zero", **inputs)
    with pytest.raises(OptionError, match="one int logit index per item"):
        attnflow.faithfulness(model, explanation, target=[1], blank="zero", **inputs)
    with pytest.raises(OptionError, match="2 items of 7 tokens"):
        attnflow.faithfulness(model, explanation, blank="zero", input_ids=inputs["input_ids"][:, :6],
                              attention_mask=inputs["attention_mask"][:, :6])
    with pytest.raises(OptionError, match="no scores for position 1"):
        attnflow.faithfulness(model, explanation, blank="zero", source=1, **inputs)
    with pytest.raises(OptionError, match="references must name"):
        attnflow.faithfulness(model, explanation, blank="zero", references=["saliency"], **inputs)
    everything = attnflow.explain(attnflow.capture(model, **inputs), ["raw"])
    with pytest.raises(OptionError, match="say which to compare with source="):
        attnflow.faithfulness(model, everything, blank="zero", **inputs)  # 2-D logits read no token
    with pytest.raises(OptionError, match="covers only the sources"):
        attnflow.faithfulness(model, explanation, blank="zero", source="mean", **inputs)
    model.train()
    try:
        with pytest.raises(OptionError, match=r"model.eval\(\)"):
            attnflow.faithfulness(model, explanation, blank="zero", **inputs)
    finally:
        model.eval()

    class NoProbe(attnflow.Adapter):
        name, framework = "noprobe", "torch"

        def claims(self, model):
            return True

        def hooks(self, model, recorder):
            raise AssertionError("not used")

    with pytest.raises(AdapterError, match="'ablation' or 'input_gradients'"):
        attnflow.faithfulness(model, explanation, adapter=NoProbe(), **inputs)
    assert torch.is_grad_enabled()


# -- JAX/Flax --------------------------------------------------------------------------------------------
def _load_example(name: str):
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_flax_nnx_probe_matches_its_pytorch_twin(tmp_path, inputs, jax_quick_compile):
    import torch
    import transformers
    from attnflow.adapters._jax.flax_nnx import NNXAdapter

    flax_bert = _load_example("flax_bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                                     intermediate_size=20, max_position_embeddings=32, initializer_range=0.3)
    torch_model = transformers.BertModel(config).eval()
    torch_model.save_pretrained(tmp_path, safe_serialization=True)
    port = flax_bert.load_bert(tmp_path)
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    word = port.embeddings.word
    # one explanation for both: faithfulness reads only its scores, tokens and mask
    explanation = attnflow.explain(attnflow.capture(torch_model, **inputs), ["rollout"], all_layers=True)
    settings = {"target": "embedding", "blank": MASK_ID, "max_rows": 16}
    expected = attnflow.faithfulness(torch_model, explanation, **settings, **inputs)
    got = attnflow.faithfulness(port, explanation, ids, mask, adapter=NNXAdapter(), **settings)
    real = mask.astype(bool)
    for name in ("blankout", "grad_norm", "grad_x_input"):
        scale = np.abs(expected.importances[name][real]).max()
        np.testing.assert_allclose(got.importances[name][real], expected.importances[name][real], atol=2e-4 * scale,
                                   err_msg=name)
    np.testing.assert_allclose(got.curves["rollout"]["deletion"], expected.curves["rollout"]["deletion"], atol=1e-4)
    assert port.embeddings.word is word  # the wrapped Embed is put back


def test_flax_linen_probe_matches_jax_computed_directly(jax_quick_compile):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from attnflow.adapters._jax.flax_linen import LinenAdapter

    class Model(nn.Module):
        @nn.compact
        def __call__(self, ids, mask):
            return self.from_embeddings(nn.Embed(VOCAB, HIDDEN, name="tokens")(ids), mask)

        @nn.compact
        def from_embeddings(self, e, mask):
            e = e + self.param("places", nn.initializers.normal(1.0), (SEQ, HIDDEN))
            attention_mask = nn.make_attention_mask(mask, mask)
            for i in range(2):
                e = e + nn.MultiHeadDotProductAttention(HEADS, name=f"attention_{i}")(e, mask=attention_mask)
            return nn.Dense(CLASSES, name="head")(e[:, 0])

    rng = np.random.default_rng(4)
    ids = rng.integers(5, VOCAB, size=(BATCH, SEQ))
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[1, 5:] = 0
    model = Model()
    variables = model.init(jax.random.PRNGKey(0), ids, mask)
    explanation = attnflow.explain(attnflow.capture(model, variables, ids, mask), ["raw", "rollout"], sources=[0],
                                   all_layers=True)
    adapter = LinenAdapter()
    report = attnflow.faithfulness(model, explanation, variables, ids, mask, target=2, blank=UNK_ID, curves=False,
                                   adapter=adapter)
    zeroed = attnflow.faithfulness(model, explanation, variables, ids, mask, target=2, blank="zero", curves=False,
                                   references=["blankout"], adapter=adapter)
    table = variables["params"]["tokens"]["embedding"]

    @jax.jit  # one compilation for every call below (the model applied op by op is much slower)
    def logit(e, item_mask):
        return model.apply(variables, e, item_mask, method=Model.from_embeddings)[0, 2]

    gradient = jax.jit(jax.grad(logit))
    for b in range(BATCH):
        n = int(mask[b].sum())
        e = table[ids[b : b + 1]]
        for j in range(n):
            edited = ids[b : b + 1].copy()
            edited[0, j] = UNK_ID
            assert report.importances["blankout"][b, j] == pytest.approx(
                float(logit(e, mask[b : b + 1]) - logit(table[edited], mask[b : b + 1])), abs=2e-5)
            assert zeroed.importances["blankout"][b, j] == pytest.approx(
                float(logit(e, mask[b : b + 1]) - logit(e.at[0, j].set(0.0), mask[b : b + 1])), abs=2e-5)
        grad = np.asarray(gradient(e, mask[b : b + 1]))[0]
        np.testing.assert_allclose(report.importances["grad_norm"][b, :n], np.linalg.norm(grad, axis=-1)[:n], rtol=1e-4)
        np.testing.assert_allclose(report.importances["grad_x_input"][b, :n], (grad * np.asarray(e[0])).sum(-1)[:n],
                                   rtol=1e-4, atol=1e-6)
    assert jnp.isfinite(report.base).all()


# -- the command line -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_command_writes_the_tables_and_resumes(tmp_path, minilm_dir, capsys):
    from attnflow.cli import main

    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "The keys are here.", "id": "keys"}\n{"text": "A dog barks."}\n[1, 2]\n')
    out = tmp_path / "out"
    command = [str(texts), "--out", str(out), "--model", str(minilm_dir), "--references", "blankout",
               "--no-progress"]
    assert main(["evaluate", *command]) == 0
    assert sorted(p.name for p in (out / "examples").iterdir()) == ["2.json", "keys.json"]
    import pandas

    table = pandas.read_csv(out / "faithfulness.csv")
    assert list(table.columns) == ["method", "reference", "layer", "mean", "std", "n"]
    assert set(table.method) == {"raw", "rollout", "flow", "random"} and sorted(set(table.layer)) == list(range(1, 7))
    assert (table.n == 2).all()
    parquet = pandas.read_parquet(out / "faithfulness.parquet")
    pandas.testing.assert_frame_equal(parquet, table, check_dtype=False)
    assert (out / "faithfulness.png").stat().st_size > 1000 and (out / "aopc.csv").is_file()
    # the same numbers as the Python API on one example
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    encoded = dict(tokenizer(["The keys are here."], return_tensors="pt"))
    direct = attnflow.faithfulness(
        model, attnflow.explain(attnflow.capture(model, tokens=tokenizer, **encoded), ["raw", "rollout", "flow"],
                                all_layers=True),  # tokens=: [CLS] and [SEP] are known special, and left out
        tokenizer=tokenizer, references=["blankout"], **encoded)
    saved = attnflow.FaithfulnessReport.from_dict(json.loads((out / "examples" / "keys.json").read_text())["report"])
    np.testing.assert_allclose(saved.correlations["flow"]["blankout"], direct.correlations["flow"]["blankout"], atol=1e-6)
    # resuming skips what is done; other settings are refused
    before = (out / "examples" / "keys.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["evaluate", *command]) == 0
    result = capsys.readouterr()
    assert "2 already done" in result.out, result.err
    assert "line 3" in result.err and (out / "examples" / "keys.json").stat().st_mtime_ns == before
    assert main(["evaluate", *command, "--blank", "zero"]) == 1
