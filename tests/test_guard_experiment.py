"""``rome-jax experiment guard``: the ROC and scoring code on hand-written edits with known
answers, ``guard.score`` against ``guard.evaluate``, and the command on the tiny model (its
profile leaves the scored run's records out)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import SMALL, in_process_env

from rome_jax import cli
from rome_jax.experiments import guard as experiment
from rome_jax.guard import GuardProfile, evaluate, score

# floor = 100 / 3 (5% quantile of equal samples / margin 3); |Δ| ceiling = exp(2 · 0.1) (k = 2
# set here, not the default, so that the hand-written cases sit on either side of it)
PROFILE = GuardProfile(layer=1, denominators=(100.0,) * 20, delta_abs=(1.0,) * 20, mad_k=2.0)
CEILING = math.exp(0.2)


def test_roc_on_known_scores():
    curve = experiment.roc([3, 2, 2, 1, 0], [True, True, False, False, False])
    assert curve["cuts"] == [3, 2, 1, 0, -math.inf]
    assert curve["tp"] == [0, 1, 2, 2, 2] and curve["fp"] == [0, 0, 1, 2, 3]
    # P(positive above negative) + ½ P(tie): (3 + 2 + ½) / 6
    assert curve["auc"] == pytest.approx(5.5 / 6)
    assert experiment.best_at(curve, 0.0) == {"cut": 2, "upper": 3, "tp": 1, "fp": 0,
                                              "tpr": 0.5, "fpr": 0.0}
    assert experiment.best_at(curve, 0.34)["cut"] == 1
    assert experiment.meeting(curve, 0.5, 0.0) == (2, 3)
    assert experiment.meeting(curve, 1.0, 0.34) == (1, 2)
    assert experiment.meeting(curve, 1.0, 0.0) is None


def test_roc_with_infinite_scores_and_without_positives():
    curve = experiment.roc([math.inf, 1.0, -math.inf], [True, False, False])
    assert curve["cuts"] == [math.inf, 1.0, -math.inf]
    assert curve["tp"] == [0, 1, 1] and curve["fp"] == [0, 0, 2]  # the last cut: all
    assert curve["auc"] == pytest.approx(1.0)
    none = experiment.roc([1.0, 2.0], [False, False])
    assert math.isnan(none["auc"]) and experiment.meeting(none, 0.95, 0.02) is None
    with pytest.raises(ValueError, match="roc"):
        experiment.roc([math.nan], [True])


@pytest.mark.parametrize("den, dabs", [(100, 1), (34, 1.2), (33, 1), (100, 1.3), (1, 50),
                                       (0, 1), (-5, 1), (100, math.inf)])
@pytest.mark.parametrize("lam", [1.0, 0.9, 4.0])  # mad_k must stay > 0
def test_score_is_the_guard_moved_by_lambda(den, dabs, lam):
    """score > log λ exactly when the guard with floor / λ and ceiling · λ refuses."""
    moved = PROFILE.with_thresholds(margin=PROFILE.margin * lam,
                                    mad_k=PROFILE.mad_k + math.log(lam) / 0.1)
    edit = {"denominator": den, "delta_abs": dabs, "method": "rome", "request": {}}
    assert (score(edit, PROFILE) > math.log(lam)) == (not evaluate(edit, moved).ok)


def edit_row(case_id, first, rome, c_rome=(100.0, 1.0, 1.0)):
    """A collapse row; ``rome`` / ``c_rome``: (denominator, |Δ|, ME-PPL_50 ratio)."""
    def method(den, dabs, ratio):
        return {"denominator": den, "delta_abs": dabs, "delta_norm": 1000 * dabs,
                "ratio": ratio}
    return {"key": case_id, "case_id": case_id, "first_token_subject": first,
            "rome": method(*rome), "c-rome": method(*c_rome)}


ROWS = [edit_row(1, True, (-1.0, 9.0, 500.0)),       # collapse, refused (both reasons)
        edit_row(2, True, (1.0, 2.0, 50.0)),         # collapse, refused (both)
        edit_row(3, True, (90.0, 1.15, 20.0)),       # collapse the guard passes
        edit_row(4, True, (10.0, 1.0, 3.0)),         # ratio 3: refused, collapse only at > 2
        edit_row(5, False, (100.0, 1.0, 1.0)),
        edit_row(6, False, (100.0, 1.1, 1.0)),
        edit_row(7, False, (120.0, 1.0, 1.0), c_rome=(20.0, 1.0, 1.0))]  # c-rome refused
ES = experiment.edits(ROWS)


def test_scores_at_the_defaults_and_along_the_roc():
    scores = experiment.score_edits(ES, PROFILE, experiment.verdicts(ES, PROFILE))
    assert scores["rome, ratio > 10"]["default"] == {
        "tp": 2, "positives": 3, "fp": 1, "negatives": 4, "refused_by_denominator": 3,
        "refused_by_delta_abs": 2}
    rome2 = scores["rome, ratio > 2"]
    assert [rome2["default"][k] for k in ("tp", "positives", "fp", "negatives")] == [3, 4, 0, 3]
    pooled = scores["rome and c-rome, ratio > 10"]["default"]
    assert [pooled[k] for k in ("tp", "positives", "fp", "negatives")] == [2, 3, 2, 11]
    # the denominator alone ranks every rome collapse (ratio > 2) above every other edit
    assert rome2["rules"]["denominator"]["auc"] == 1.0
    assert rome2["rules"]["denominator"]["best"]["tp"] == 4
    assert rome2["rules"]["denominator"]["meets_target"]
    # ‖Δ‖ alone: case 4's 1000 ties cases 5 and 7 and loses to 6's 1100: (3 + 3 + 3 + 1) / 12
    assert rome2["rules"]["‖Δ‖"]["auc"] == pytest.approx(10 / 12)
    # λ: case 3 (|Δ| 1.15) is refused once the ceiling is below 1.15, case 6 (1.1) passes
    # while it is above 1.1; λ = 1 (the profile's own thresholds) lies above the range
    assert rome2["lambda_meeting_target"] == pytest.approx([1.1 / CEILING, 1.15 / CEILING])
    # at ratio > 10, case 4 (ratio 3, denominator 10) is a normal edit refused before case 3
    assert scores["rome, ratio > 10"]["lambda_meeting_target"] is None
    # k = 8: the ceiling exp(0.8) passes case 2's |Δ| 2, still refused by its denominator
    assert rome2["by_mad_k"]["2.0"] == {k: rome2["default"][k]
                                        for k in ("tp", "positives", "fp", "negatives")}
    assert rome2["by_mad_k"]["8.0"]["tp"] == 3
    wrong = experiment.wrong(ES, PROFILE, experiment.verdicts(ES, PROFILE))
    assert [(w["case_id"], w["method"], w["guard"]) for w in wrong] == [
        (3, "rome", "passed"), (4, "rome", "refused"), (7, "c-rome", "refused")]


def test_command_scores_a_collapse_run_with_a_profile_that_leaves_it_out(tiny_model, tmp_path,
                                                                        capsys):
    from rome_jax.data import load_counterfact, tokenizer_dir
    from rome_jax.guard import normal_requests
    from rome_jax.models.tokenizer import Tokenizer

    with in_process_env(tmp_path, default_model=False):
        # the scored run edits the records an unexcluded profile would take first
        first = [r.case_id for r in normal_requests(
            load_counterfact(), Tokenizer.from_dir(tokenizer_dir()), 2)]
        (tmp_path / "ids.json").write_text(json.dumps(first))
        assert cli.main(["experiment", "collapse", "--model", str(tiny_model), *SMALL,
                         "--case-ids", str(tmp_path / "ids.json"), "--out",
                         str(tmp_path / "run")]) == 0
        ids = [json.loads(line)["case_id"]
               for line in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()[1:]]
        args = ["experiment", "guard", "--model", str(tiny_model), *SMALL, "--guard-samples",
                "2", "--baseline", str(tmp_path / "run"), "--out", str(tmp_path / "g")]
        assert cli.main(args) == 0
        summary = json.loads((tmp_path / "g" / "summary.json").read_text())
        assert set(summary["scores"]) == {f"{p}, ratio > {x:g}" for p in experiment.POPULATIONS
                                          for x in experiment.LABELS}
        # ROC curves only where the run has a collapse (these normal records have none)
        assert (tmp_path / "g" / "figure.png").exists() == any(
            v["default"]["positives"] for v in summary["scores"].values())
        assert "Table 1" in (tmp_path / "g" / "table.md").read_text()
        row = json.loads((tmp_path / "g" / "rows.jsonl").read_text().splitlines()[1])
        profile = GuardProfile.from_dict(row["profile"])
        assert sorted(ids) == sorted(first)
        assert profile.n == 2 and not set(profile.case_ids) & set(ids)
        assert profile.settings["excluded_case_ids"] == sorted(ids)
        capsys.readouterr()
        # another layer than the scored run's: refused in one line, before any work
        assert cli.main([*args[:-2], "--layer", "0", "--out", str(tmp_path / "g0")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--baseline" in err[0] and "another layer" in err[0]
        assert not (tmp_path / "g0").exists()


def test_a_scored_row_without_a_denominator_is_named():
    row = {**edit_row(1, True, (1.0, 1.0, 1.0)), "subject": "x", "base_perplexity": 1.0}
    for m in ("rome", "c-rome"):
        row[m].update(residual_norm=1.0, denominator_unit_u=1.0, perplexity=1.0, success=True)
    experiment.check_source_row(row)
    del row["c-rome"]["denominator"]
    with pytest.raises(ValueError, match="c-rome.denominator: missing"):
        experiment.check_source_row(row)
