"""The verdict of a faithfulness run (attnflow.evaluate's leaderboard): rankings, means over layers, bootstrap
intervals against hand-computed ones and an independent numpy bootstrap, the paired lead, merging methods."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attnflow
from attnflow import OptionError
from attnflow.evaluate import LEADERBOARD_COLUMNS, bootstrap_interval, format_leaderboard
from attnflow.evaluate._leaderboard import per_item_layer_mean

NAN = math.nan


def tiny_report() -> attnflow.FaithfulnessReport:
    """Four items, three layers, three methods (and the random baseline) with known correlations."""
    correlations = {
        "good": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5], [0.9, 0.7, 0.8, 0.6]],
        "close": [[0.0, 0.0, 0.0, 0.0], [0.2, NAN, 0.4, 0.6], [0.8, 0.6, 0.7, 0.7]],
        "bad": [[-0.5, -0.4, -0.3, -0.2], [0.0, 0.1, 0.0, 0.1], [0.1, -0.1, NAN, 0.0]],
        "random": [[0.05, -0.05, 0.0, 0.1], [0.0, 0.0, 0.1, -0.1], [0.02, -0.02, 0.04, 0.0]],
    }
    aopc = {"good": [0.6, 0.5, 0.7, 0.6], "close": [0.5, 0.5, 0.6, 0.6], "bad": [0.2, 0.3, 0.2, 0.3],
            "random": [0.3, 0.3, 0.4, 0.3]}
    sufficiency = {m: [1.0 - v for v in values] for m, values in aopc.items()}
    return attnflow.FaithfulnessReport(
        layers={m: [0, 1, 2] for m in correlations}, references=["blankout"],
        correlations={m: {"blankout": np.array(v)} for m, v in correlations.items()},
        comprehensiveness={m: np.array(v) for m, v in aopc.items()},
        sufficiency={m: np.array(v) for m, v in sufficiency.items()}, item_curves={}, grid=(0.0, 1.0), bins=(0.5,),
        importances={"blankout": np.zeros((4, 3))}, base=np.ones(4),
    )


def numpy_bootstrap(values, seed, resamples=2000):
    """The documented scheme, written out again: default_rng(seed), integers(0, n, (resamples, n)), percentiles."""
    x = np.asarray(values, float)
    x = x[~np.isnan(x)]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[draws].mean(axis=1)
    return x.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5), x.size


def test_bootstrap_intervals_against_hand_computed_ones():
    # two values: a resample's mean is a (p 1/4), (a+b)/2 (p 1/2) or b (p 1/4): the 2.5% and 97.5% percentiles
    # of 2,000 resamples are a and b themselves
    mean, low, high, n = bootstrap_interval([0.2, 0.6], seed=5)
    assert (mean, low, high, n) == (pytest.approx(0.4), pytest.approx(0.2), pytest.approx(0.6), 2)
    # one value, or equal values: no spread
    assert bootstrap_interval([0.7, NAN], seed=0) == (pytest.approx(0.7), pytest.approx(0.7), pytest.approx(0.7), 1)
    assert bootstrap_interval([0.3] * 5, seed=0)[1:3] == (pytest.approx(0.3), pytest.approx(0.3))
    assert all(math.isnan(v) for v in bootstrap_interval([NAN, NAN], seed=0)[:3])
    # three values 0, 0, 1: a resample's mean is k/3 with k ~ Binomial(3, 1/3): P(k=0) = 8/27 > 2.5%, so the
    # lower bound is 0; P(k=3) = 1/27 > 2.5%, so the upper bound is 1
    assert bootstrap_interval([0.0, 0.0, 1.0], seed=1)[1:3] == (pytest.approx(0.0), pytest.approx(1.0))


def test_bootstrap_interval_equals_an_independent_numpy_bootstrap():
    rng = np.random.default_rng(11)
    for seed in (0, 3, 12345):
        values = rng.normal(size=9)
        values[2] = NAN
        got = bootstrap_interval(values, seed=seed)
        expected = numpy_bootstrap(values, seed)
        np.testing.assert_allclose(got[:3], expected[:3], rtol=0, atol=1e-12)
        assert got[3] == 8
    assert bootstrap_interval(values, seed=1) != bootstrap_interval(values, seed=2)  # the seed is used


def test_leaderboard_ranks_by_last_layer_with_intervals():
    report = tiny_report()
    rows = report.leaderboard("blankout", seed=4)
    assert [r["method"] for r in rows] == ["good", "close", "random", "bad"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert all(list(r) == list(LEADERBOARD_COLUMNS) for r in rows)
    good, close, _, bad = rows
    assert good["layer"] == 3 and good["n"] == 4 and bad["n"] == 3  # 1-based layer; NaN items not counted
    assert good["rho_last"] == pytest.approx(0.75)
    expected = numpy_bootstrap([0.9, 0.7, 0.8, 0.6], 4)
    assert (good["rho_last_low"], good["rho_last_high"]) == (pytest.approx(expected[1]), pytest.approx(expected[2]))
    # mean over layers: per item first (close's item 1 has a NaN layer: the mean of its two others), then items
    per_item = [np.mean([0.0, 0.2, 0.8]), np.mean([0.0, 0.6]), np.mean([0.0, 0.4, 0.7]), np.mean([0.0, 0.6, 0.7])]
    np.testing.assert_allclose(per_item_layer_mean(report.correlations["close"]["blankout"]), per_item)
    assert close["rho_layers"] == pytest.approx(np.mean(per_item))
    expected = numpy_bootstrap(per_item, 4)
    assert (close["rho_layers_low"], close["rho_layers_high"]) == (pytest.approx(expected[1]), pytest.approx(expected[2]))
    assert good["comprehensiveness"] == pytest.approx(0.6) and good["sufficiency"] == pytest.approx(0.4)
    assert good["n_aopc"] == 4
    expected = numpy_bootstrap([0.6, 0.5, 0.7, 0.6], 4)
    assert good["comprehensiveness_low"] == pytest.approx(expected[1])
    with pytest.raises(OptionError, match="grad_norm"):
        report.leaderboard("grad_norm")


def test_the_lead_is_clear_only_when_the_paired_interval_excludes_zero():
    report = tiny_report()
    lead = report.lead("blankout", seed=0)
    # good − close per item: 0.1, 0.1, 0.1, −0.1 → mean 0.05; resamples of all four items with the −0.1 drawn
    # every time are rare, but a resample with it drawn at least twice of four has mean <= 0: the 2.5%
    # percentile is at or below 0, so the lead is not clear
    assert (lead["best"], lead["second"]) == ("good", "close")
    assert lead["difference"] == pytest.approx(0.05)
    expected = numpy_bootstrap([0.1, 0.1, 0.1, -0.1], 0)
    assert (lead["low"], lead["high"]) == (pytest.approx(expected[1]), pytest.approx(expected[2]))
    assert lead["low"] <= 0.0 and not lead["clear"]
    text = format_leaderboard(report.leaderboard("blankout"), lead, special=False)
    assert "not clear" in text and "special tokens excluded" in text and "higher" in text and "lower" in text
    # a lead in every item is clear: the interval of a constant positive difference is that constant
    clear = attnflow.FaithfulnessReport.from_dict(report.to_dict())
    clear.correlations["close"]["blankout"][-1] = [0.5, 0.5, 0.5, 0.5]
    verdict = clear.lead("blankout")
    assert verdict["clear"] and verdict["low"] > 0 and "is clear" in format_leaderboard(clear.leaderboard(), verdict)


def test_with_methods_merges_new_methods_and_keeps_the_old():
    report = tiny_report()
    document = report.to_dict()
    only_bad = dict(document)
    for key in ("layers", "correlations", "comprehensiveness", "sufficiency"):
        only_bad[key] = {m: v for m, v in document[key].items() if m in ("bad", "random")}
    first = attnflow.FaithfulnessReport.from_dict(only_bad)
    merged = first.with_methods(report)
    assert merged.methods == ("bad", "good", "close", "random")
    np.testing.assert_array_equal(merged.correlations["good"]["blankout"], report.correlations["good"]["blankout"])
    np.testing.assert_array_equal(merged.correlations["random"]["blankout"], first.correlations["random"]["blankout"])
    with pytest.raises(OptionError, match="same items"):
        first.with_methods(report.select([0, 1]))


def test_seeds_must_not_be_negative():
    with pytest.raises(OptionError, match="seed"):
        bootstrap_interval([1.0, 2.0], seed=-1)
    with pytest.raises(OptionError, match="seed"):
        tiny_report().leaderboard(seed=-1)
