"""The collapse guard: ``evaluate`` on synthetic reports (pure), the profile's thresholds and JSON
cache, and the perplexity probe against ``evaluation.perplexity``."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
from conftest import tiny_gpt2
from hypothesis import given, settings, strategies as st

from rome_jax import guard
from rome_jax.files import write_json_atomic
from rome_jax.guard import GuardProfile, Verdict, evaluate

DENS = (10.0, 12.0, 9.0, 11.0, 10.5, 13.0, 8.5, 12.0, 9.5, 11.5)
DABS = (1.0e-4, 1.2e-4, 0.9e-4, 1.1e-4, 1.05e-4, 1.3e-4, 0.85e-4, 1.2e-4, 0.95e-4, 1.15e-4)
PROMPT_INSIDE = "The mother tongue of {} is"
PROMPT_FIRST = "{} plays the"


@pytest.fixture
def profile() -> GuardProfile:
    return GuardProfile(layer=1, denominators=DENS, delta_abs=DABS,
                        case_ids=tuple(range(len(DENS))))


def report(den: float, dabs: float, method: str = "rome", prompt: str = PROMPT_INSIDE,
           **extra) -> dict:
    return {"method": method, "layer": 1, "denominator": den, "delta_abs": dabs,
            "request": {"prompt": prompt, "subject": "Toko Yasuda", "target_new": "piano"},
            **extra}


def test_normal_edit_passes(profile):
    verdict = evaluate(report(10.0, 1.0e-4), profile)
    assert verdict == Verdict(True, [], "")


def test_small_denominator_is_refused_with_explanation(profile):
    verdict = evaluate(report(0.5, 1.0e-4), profile)
    assert not verdict.ok
    assert len(verdict.reasons) == 1 and "denominator 0.5" in verdict.reasons[0]
    assert verdict.failed == ("denominator",)
    assert "quantile" in verdict.reasons[0] and "10 normal edits" in verdict.reasons[0]
    assert "c-rome" in verdict.suggestion and "--force" in verdict.suggestion


@pytest.mark.parametrize("den", [0.0, -3.0, math.nan, math.inf])
def test_non_positive_or_non_finite_denominator_is_refused(profile, den):
    verdict = evaluate(report(den, 1.0e-4), profile)
    assert not verdict.ok and "not positive" in verdict.reasons[0]


def test_large_delta_is_refused(profile):
    verdict = evaluate(report(10.0, 5e-3), profile)
    assert not verdict.ok
    assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith("|Δ| 0.005")
    assert verdict.failed == ("delta_abs",)


def test_collapse_signature_gives_both_reasons(profile):
    verdict = evaluate(report(1e-3, 1.0), profile)
    assert not verdict.ok and len(verdict.reasons) == 2
    assert verdict.failed == ("denominator", "delta_abs")


def test_suggestion_names_the_test_prefix_only_for_subject_first_prompts(profile):
    first = evaluate(report(0.1, 1.0e-4, prompt=PROMPT_FIRST), profile)
    inside = evaluate(report(0.1, 1.0e-4), profile)
    assert "--test-prefix" in first.suggestion
    assert "--test-prefix" not in inside.suggestion and "c-rome" in inside.suggestion


def test_consistent_method_outlier_gets_another_suggestion(profile):
    verdict = evaluate(report(0.1, 1.0e-4, method="c-rome"), profile)
    assert not verdict.ok and "outlier even for c-rome" in verdict.suggestion


def test_perplexity_rollback(profile):
    ok = evaluate(report(10.0, 1e-4, perplexity_before=50.0, perplexity_after=60.0), profile)
    bad = evaluate(report(10.0, 1e-4, perplexity_before=50.0, perplexity_after=5000.0), profile)
    inf = evaluate(report(10.0, 1e-4, perplexity_before=50.0, perplexity_after=math.inf),
                   profile)
    assert ok.ok
    assert not bad.ok and "100x > 10x" in bad.reasons[0] and bad.failed == ("perplexity",)
    assert not inf.ok
    off = dataclasses.replace(profile, max_ppl_ratio=None)
    assert evaluate(report(10.0, 1e-4, perplexity_before=50.0, perplexity_after=5000.0),
                    off).ok


def test_check_perplexity():
    assert guard.check_perplexity(10.0, 20.0, 10.0, "rome", True).ok
    verdict = guard.check_perplexity(10.0, 200.0, 10.0, "rome", True)
    assert not verdict.ok and "roll back" in verdict.suggestion
    assert "c-rome" in verdict.suggestion and "--test-prefix" in verdict.suggestion


@pytest.mark.parametrize("method", ["c-rome", "p-rome"])
def test_suggestion_never_names_the_method_already_used(method):
    rolled_back = guard.check_perplexity(10.0, 200.0, 10.0, method, True)
    non_finite = guard.suggest(method, True, finite=False)
    for text in (rolled_back.suggestion, non_finite):
        assert "--method" not in text and "--test-prefix" not in text
    assert "non-finite weights or key statistics" in non_finite and "--force" not in non_finite
    assert "--force" not in guard.suggest("rome", False, finite=False)
    assert "c-rome" in guard.suggest("rome", False, finite=False)


def test_profile_refuses_a_non_finite_base_perplexity():
    for bad in (math.inf, math.nan, 0.0):
        with pytest.raises(ValueError, match="base_perplexity"):
            GuardProfile(layer=1, denominators=DENS, delta_abs=DABS, base_perplexity=bad)


def test_accepts_an_edit_report_object(profile):
    from rome_jax.rome.edit import EditReport

    rep = EditReport(method="rome", layer=1, request={"prompt": PROMPT_FIRST, "subject": "X",
                                                      "target_new": "y"},
                     numerator_norm=1.0, denominator=0.01, delta_norm=1.0, delta_abs=1e-4,
                     residual_norm=1.0, denominator_unit_u=1e-4, key_cosine=0.1, v_init_norm=1.0, delta_v_norm=1.0,
                     v_losses=[1.0], v_steps=1)
    verdict = evaluate(rep, profile)
    assert not verdict.ok and "--test-prefix" in verdict.suggestion


def test_missing_fields_are_an_error(profile):
    with pytest.raises(ValueError, match="denominator"):
        evaluate({"delta_abs": 1.0}, profile)


def test_thresholds(profile):
    assert profile.denominator_floor == pytest.approx(np.quantile(DENS, 0.05) / 3.0)
    logs = np.log(DABS)
    scale = max(1.4826 * np.median(np.abs(logs - np.median(logs))), 0.1)
    assert profile.log_delta_scale == pytest.approx(scale)
    assert profile.mad_k == 5.0  # the default, scored on real collapses (EXPERIMENTS.md 9b)
    assert profile.delta_abs_ceiling == pytest.approx(math.exp(np.median(logs) + 5 * scale))
    looser = profile.with_thresholds(margin=100.0, mad_k=None)
    assert looser.denominator_floor == pytest.approx(profile.denominator_floor * 3 / 100)
    assert looser.mad_k == profile.mad_k


def test_identical_samples_use_the_scale_floor():
    p = GuardProfile(layer=0, denominators=(5.0,), delta_abs=(1e-3,))
    assert p.log_delta_scale == guard.MIN_LOG_SCALE
    assert evaluate(report(5.0, 1e-3), p).ok
    assert not evaluate(report(5.0, 1e-3 * math.exp(0.6)), p).ok


@pytest.mark.parametrize("kwargs", [
    dict(denominators=(), delta_abs=()), dict(denominators=(1.0,), delta_abs=(1.0, 2.0)),
    dict(denominators=(1.0,), delta_abs=(-1.0,)), dict(denominators=(math.nan,), delta_abs=(1.0,)),
    dict(denominators=(1.0,), delta_abs=(1.0,), margin=0.0),
    dict(denominators=(1.0,), delta_abs=(1.0,), max_ppl_ratio=0.5)])
def test_bad_profiles_are_refused(kwargs):
    with pytest.raises(ValueError):
        GuardProfile(layer=0, **kwargs)


@settings(max_examples=200, deadline=None)
@given(den=st.floats(1e-6, 1e3), dabs=st.floats(1e-8, 1.0))
def test_verdict_is_the_two_thresholds(den, dabs):
    p = GuardProfile(layer=1, denominators=DENS, delta_abs=DABS)
    verdict = evaluate(report(den, dabs), p)
    expected = den >= p.denominator_floor and dabs <= p.delta_abs_ceiling
    assert verdict.ok == expected
    assert len(verdict.reasons) == (den < p.denominator_floor) + (dabs > p.delta_abs_ceiling)


def test_profile_json_cache(profile, tmp_path):
    settings_ = {"layer": 1, "n_samples": 10}
    p = dataclasses.replace(profile, settings=settings_, fingerprint="abc")
    path = write_json_atomic(tmp_path / "p.guard.json", p.to_dict())
    assert [f.name for f in tmp_path.iterdir()] == ["p.guard.json"]  # no temp file left
    loaded = guard.load_profile(path, settings_)
    assert loaded == p and loaded.summary()["n"] == 10
    assert guard.load_profile(path, {"layer": 2, "n_samples": 10}) is None
    assert guard.load_profile(tmp_path / "missing.json") is None
    path.write_text("{ not json")
    assert guard.load_profile(path) is None
    path.write_text(json.dumps({"version": 99}))
    assert guard.load_profile(path) is None


def test_concurrent_profile_builders_build_once(profile, tmp_path):
    import threading
    import time

    settings_ = {"layer": 1, "n_samples": 10}
    built = []

    def build():
        built.append(1)
        time.sleep(0.3)
        return dataclasses.replace(profile, settings=settings_)

    path = tmp_path / "p.guard.json"
    results = [None, None]

    def run(i):
        results[i] = guard.cached_profile(path, settings_, build)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [1] and results[0] == results[1] == guard.load_profile(path, settings_)
    assert [p.name for p in tmp_path.iterdir()] == ["p.guard.json"]  # no temp or lock file
    assert guard.cached_profile(path, settings_, lambda: 1 / 0) == results[0]


# ----------------------------------------------------------------------------- with a model


@pytest.fixture(scope="module")
def tiny():
    return tiny_gpt2(n_layer=2, d_model=32, n_head=4, seq_len=64, seed=1, weight_scale=20)


def test_perplexity_probe_matches_evaluation(tiny):
    from rome_jax.data import load_me_ppl
    from rome_jax.evaluation import perplexity
    from rome_jax.editors.delta import apply_edit, rank_one

    texts = load_me_ppl("ME-PPL_50")[:12]
    probe = guard.PerplexityProbe(tiny, texts, layer=1, batch_size=8)
    assert probe.base == pytest.approx(perplexity(tiny, texts, batch_size=8), rel=1e-5)
    k1, k2 = jax.random.split(jax.random.key(0))
    update = rank_one(jax.random.normal(k1, (tiny.config.d_mlp,)),
                      jax.random.normal(k2, (tiny.config.d_model,)), 1)
    edited = apply_edit(tiny.params, update)
    expected = perplexity(tiny, texts, batch_size=8, params=edited)
    assert expected != pytest.approx(probe.base, rel=1e-3)
    assert probe(edited) == pytest.approx(expected, rel=1e-5)


def test_normal_requests_skip_first_token_subjects(tiny):
    records = [
        {"case_id": 1, "requested_rewrite": {"prompt": "{} plays the", "subject": "Bay",
                                             "target_new": {"str": "x"}}},
        {"case_id": 2, "requested_rewrite": {"prompt": "{} plays the", "subject": "Toko Yasuda",
                                             "target_new": {"str": "x"}}},
        {"case_id": 3, "requested_rewrite": {"prompt": "The tongue of {} is", "subject": "Bay",
                                             "target_new": {"str": "x"}}},
    ]
    picked = guard.normal_requests(records, tiny.tokenizer, 10)
    assert sorted(r.case_id for r in picked) == [2, 3]


@pytest.mark.parametrize("field, value", [
    ("margin", math.nan), ("mad_k", math.nan), ("quantile", math.nan), ("quantile", 1.5),
    ("max_ppl_ratio", math.nan), ("max_ppl_ratio", math.inf), ("margin", "3"),
    ("base_perplexity", math.nan), ("layer", -1), ("version", 0),
    ("denominators", [math.nan] * len(DENS)),
    ("delta_abs", [-1.0] * len(DABS))])
def test_a_cached_profile_with_a_bad_number_is_rebuilt(profile, tmp_path, field, value):
    """Issue 23, item 3: a profile whose thresholds are NaN (or out of range, or of another
    format version) is never used: loading gives None, so the cache is rebuilt."""
    settings_ = {"layer": 1, "n_samples": 10}
    good = dataclasses.replace(profile, settings=settings_).to_dict()
    path = tmp_path / "p.guard.json"
    path.write_text(json.dumps({**good, field: value}, allow_nan=True))
    assert guard.load_profile(path, settings_) is None
    built = []
    fresh = guard.cached_profile(path, settings_, lambda: built.append(1) or
                                 dataclasses.replace(profile, settings=settings_))
    assert built == [1] and guard.load_profile(path, settings_) == fresh
    with pytest.raises(ValueError, match="guard profile"):
        GuardProfile.from_dict({**good, field: value})
