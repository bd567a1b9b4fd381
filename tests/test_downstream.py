"""Downstream tasks: loading, few-shot prompts, scoring by choice log-probabilities, and the
cached-residual probe against a full forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import tiny_gpt2
from hypothesis import given, settings
from hypothesis import strategies as st

from rome_jax import downstream
from rome_jax.downstream import (DownstreamProbe, Example, Task, above_chance, accuracy,
                                  make_task, wilson_interval)
from rome_jax.evaluation import continuation_nll


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(n_layer=3, d_model=32, n_head=4, seq_len=96, seed=3, weight_scale=3.0)


def toy_examples(n: int) -> list[Example]:
    words = ["red", "blue", "green", "old", "new", "big", "small", "warm"]
    return [Example(f"The {words[i % 8]} car number {i} is", ("fast", "slow"), i % 3 % 2)
            for i in range(n)]


def multi_token_task() -> Task:
    examples = tuple(Example(f"Question: how to open jar {i}?\nAnswer:",
                             (f"twist the lid {i} times", "hit it with a small spoon"), i % 2)
                     for i in range(5))
    return Task("piqa", (Example("Question: how to dry a shirt?\nAnswer:",
                                 ("hang it outside", "put it in water"), 0),), examples)


def test_real_tasks_load_with_their_labels():
    for name in ("sst2", "mrpc", "cola", "rte"):
        examples = downstream.load_examples(name)
        assert len(examples) == 200
        assert {e.label for e in examples} == {0, 1}
        assert all(e.choices == downstream.GLUE_CHOICES[name] for e in examples)
    piqa = downstream.load_examples("piqa")
    assert len(piqa) == 1838 and {e.label for e in piqa} == {0, 1}
    assert all(len(e.choices) == 2 and e.prompt.startswith("Question: ") for e in piqa)
    with pytest.raises(ValueError, match="task"):
        downstream.load_examples("mnli")


def test_a_missing_data_file_names_itself(monkeypatch, tmp_path):
    import rome_jax.data

    monkeypatch.setattr(rome_jax.data, "data_dirs", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError, match="glue/sst2.json"):
        downstream.load_examples("sst2")


def test_demonstrations_are_balanced_seeded_and_never_scored():
    examples = toy_examples(40)
    task = make_task("toy", examples, n=10, shots=4, seed=5)
    assert [d.label for d in task.demonstrations] == [0, 1, 0, 1]
    assert len(task.examples) == 10
    assert not set(map(id, task.demonstrations)) & set(map(id, task.examples))
    assert make_task("toy", examples, n=10, shots=4, seed=5) == task
    assert make_task("toy", examples, n=10, shots=4, seed=6) != task
    assert len(make_task("toy", examples, n=100, shots=4).examples) == 36
    prompt = task.prompt(task.examples[0])
    assert prompt.endswith(task.examples[0].prompt)
    assert prompt.count("\n\n") == 4 and task.demonstrations[0].demonstration in prompt
    assert task.prompt(task.examples[0], 1) == (task.demonstrations[-1].demonstration + "\n\n"
                                                + task.examples[0].prompt)
    labels = [e.label for e in task.examples]
    assert task.chance == max(labels.count(0), labels.count(1)) / len(labels)
    assert multi_token_task().chance == 0.5
    with pytest.raises(ValueError, match="shots"):
        make_task("toy", [e for e in examples if e.label == 0], n=3, shots=2)


def test_accuracy_counts_argmax_at_the_label():
    scores = np.array([[0.0, 1.0], [2.0, 1.0], [math.nan, 0.0], [-1.0, -3.0]])
    assert accuracy(scores, [1, 0, 1, 1]) == {"accuracy": 0.5, "n": 4}


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 5000), share=st.floats(0, 1))
def test_wilson_interval_holds_the_rate_and_shrinks_with_n(n, share):
    k = round(share * n)
    lo, hi = wilson_interval(k / n, n)
    assert 0 <= lo <= k / n <= hi <= 1 and lo < hi
    lo4, hi4 = wilson_interval(k / n, 4 * n)
    assert hi4 - lo4 < hi - lo


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (62, 100), (300, 600)])
def test_wilson_interval_is_scipys(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    np.testing.assert_allclose(wilson_interval(k / n, n), (ci.low, ci.high), atol=1e-12)
    with pytest.raises(ValueError, match="n, accuracy"):
        wilson_interval(0.5, 0)


def test_above_chance_needs_the_whole_interval_above_the_majority_rate():
    assert above_chance({"accuracy": 0.6, "n": 600, "chance": 0.5})  # [0.56, 0.64]
    assert not above_chance({"accuracy": 0.6, "n": 20, "chance": 0.5})  # [0.39, 0.78]
    assert not above_chance({"accuracy": 0.2, "n": 600, "chance": 0.8})  # below chance
    assert not above_chance({"accuracy": 0.5, "n": 10_000, "chance": 0.5})


def test_load_tasks_takes_shots_per_task():
    tasks = downstream.load_tasks(["sst2", "piqa"], n=5, shots={"sst2": 2, "piqa": 0})
    assert [len(t.demonstrations) for t in tasks] == [2, 0]
    assert [len(t.examples) for t in tasks] == [5, 5]
    assert [len(t.demonstrations) for t in downstream.load_tasks(["sst2"], 5, 1)] == [1]
    assert set(downstream.SHOTS) == set(downstream.TASKS)


@pytest.mark.parametrize("task", ["single-token", "multi-token"])
def test_probe_accuracy_is_the_log_prob_comparison(model, task):
    """Each choice's score is its mean token log-probability after the few-shot prompt (as
    ``continuation_nll`` computes it with a full forward), and accuracy is the fraction of
    examples whose best choice is the label."""
    task = (make_task("toy", toy_examples(30), n=8, shots=2, seed=1) if task == "single-token"
            else multi_token_task())
    probe = DownstreamProbe(model, [task], layer=1)
    scores = probe.scores(model.params)[task.name]
    prompts = [task.prompt(e) for e in task.examples for _ in e.choices]
    targets = [c for e in task.examples for c in e.choices]
    expected = -continuation_nll(model, prompts, targets).reshape(scores.shape)
    np.testing.assert_allclose(scores, expected, atol=2e-5)
    picks = [int(np.argmax(row)) == e.label for row, e in zip(expected, task.examples)]
    result = probe(model.params)[task.name]
    assert result["accuracy"] == pytest.approx(np.mean(picks))
    assert result["n"] == len(task.examples) and result["chance"] == task.chance
    assert result["interval"] == list(wilson_interval(result["accuracy"], result["n"]))
    assert probe(model.params, names=[]) == {}


def test_cached_residual_scores_equal_a_full_forward_on_edited_params(model):
    """Params changed at the probe's layer and above: the cached residual stream below it is
    still right."""
    import jax

    tasks = [make_task("toy", toy_examples(30), n=8, shots=2, seed=2), multi_token_task()]
    cached, full = DownstreamProbe(model, tasks, layer=1), DownstreamProbe(model, tasks, None)
    fc_out = model.params["blocks"]["mlp"]["fc_out"]
    noise = jax.random.normal(jax.random.key(0), fc_out["w"].shape[1:])
    w = fc_out["w"].at[1].add(noise).at[2].add(noise)
    params = {**model.params, "blocks": {**model.params["blocks"], "mlp": {
        **model.params["blocks"]["mlp"], "fc_out": {**fc_out, "w": w}}}}
    a, b = cached.scores(params), full.scores(params)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=2e-5)
        assert not np.allclose(a[name], cached.scores(model.params)[name])


def test_small_batches_score_as_one(model):
    """Batches of 2 rows, each with logits at its own longest choice only, give the scores of
    one batch padded to the task's longest choice."""
    long = "put it in a bowl of warm water for ten minutes, then twist the lid hard"
    task = Task("piqa", (), tuple(Example(f"Question: how to open jar {i}?\nAnswer:",
                                          ("twist", long), i % 2) for i in range(4)))
    small, one = DownstreamProbe(model, [task], 1, batch_size=2), DownstreamProbe(model, [task], 1)
    widths = [b[3].shape[-1] for b in small.batches["piqa"]]
    assert widths[:2] == [1, 1] and one.batches["piqa"][0][3].shape[-1] == max(widths) > 8
    np.testing.assert_allclose(small.scores(model.params)["piqa"],
                               one.scores(model.params)["piqa"], atol=2e-5)


def test_long_prompts_lose_demonstrations_then_left_tokens(model):
    """A prompt longer than the model's positions drops demonstrations from the front, then is
    cut from the left; every row fits."""
    long = Example("word " * 120 + "is", ("fast", "slow"), 0)
    task = Task("toy", tuple(toy_examples(3)), (long, *toy_examples(2)))
    probe = DownstreamProbe(model, [task], layer=1)
    rows = probe.rows["toy"]
    assert max(map(len, rows.ids)) <= model.config.n_positions
    assert np.isfinite(probe.scores(model.params)["toy"]).all()
