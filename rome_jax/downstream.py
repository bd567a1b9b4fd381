"""Downstream ability: zero- or few-shot SST-2, MRPC, CoLA and RTE (the GLUE samples of
"Rebuilding ROME") and PIQA, scored by comparing continuation log-probabilities.

Every example is a prompt and its choices; the prediction is the choice whose continuation
``" " + choice`` has the highest mean token log-probability after the prompt (for a one-token
label word that is its log-probability; for PIQA's solutions it is length-normalised by tokens).
Accuracy is the fraction of examples whose prediction is the label, reported with its 95% Wilson
interval (``wilson_interval``); chance is the majority-class rate of the scored examples (0.5 for
PIQA, whose two solutions are symmetric), and a task is above chance (``above_chance``) when the
whole interval is.

Prompts follow "Rebuilding ROME"'s ``glue_eval`` (its few-shot version): SST-2 ``Review : ...
\\nSentiment :`` → negative / positive; MRPC ``Are the sentences paraphrases of each other.
\\nSentence 1: ...\\nSentence 2: ...\\nAnswer:`` → No / Yes; CoLA ``Is this sentence
linguistically acceptable?\\nSentence: ...\\nAnswer:`` → No / Yes; RTE ``...\\nquestion: ...
True or False?\\nanswer:`` → True (label 0, entailment) / False. Departures: RTE's label words
follow GLUE's labels (``glue_eval`` writes "False" for label 0, which is entailment), the
demonstrations are class-balanced and separated by a blank line, the label word alone is scored
(no generation), and PIQA (``Question: goal\\nAnswer:`` → a solution, not in ``glue_eval``) is
normalised per token rather than per byte. ``shots`` demonstrations are drawn with a seed and
never scored; a prompt too long for the model loses demonstrations from the front, then tokens
from the left; a choice is scored on its first n_positions // 2 tokens at most.

:class:`DownstreamProbe` precomputes the token batches and the residual stream entering the
edited layer once (an edit at that layer cannot change it), so re-scoring edited params runs
only the blocks from that layer up, jitted, with logits at the choice positions only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rome_jax.data import bucket, data_file, pad_batch
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import Model
from rome_jax.models.transformer import Params, forward, residual_at

TASKS = ("sst2", "mrpc", "cola", "rte", "piqa")
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
# Demonstrations per task by default: of 0 and 3, the count at which unedited SmolLM2-135M
# scored higher on 100 examples per task, zero-shot where the two are within 3 points (3 shots
# took 3-7x the time): only RTE gains (0.51 -> 0.61); scripts/downstream_baseline.py,
# EXPERIMENTS.md "Downstream tasks on SmolLM2, unedited".
SHOTS = {"sst2": 0, "mrpc": 0, "cola": 0, "rte": 3, "piqa": 0}
# Scored examples per task by default: PIQA's 95% interval about ±4 points; a GLUE sample has
# only 200 examples, so it scores all but its demonstrations.
DOWNSTREAM_N = 600
GLUE_CHOICES = {"sst2": ("negative", "positive"), "mrpc": ("No", "Yes"),
                "cola": ("No", "Yes"), "rte": ("True", "False")}


@dataclasses.dataclass(frozen=True)
class Example:
    """A prompt, its choices (continuations, without the leading space) and the right one."""

    prompt: str
    choices: tuple[str, ...]
    label: int

    @property
    def demonstration(self) -> str:
        """The prompt answered with its label: a few-shot demonstration."""
        return f"{self.prompt} {self.choices[self.label]}"


@dataclasses.dataclass(frozen=True)
class Task:
    """A task's scored ``examples`` and the ``demonstrations`` put before each of them."""

    name: str
    demonstrations: tuple[Example, ...]
    examples: tuple[Example, ...]

    @property
    def chance(self) -> float:
        """The majority-class rate of the scored examples (0.5 for PIQA)."""
        if self.name == "piqa":
            return 0.5
        labels = np.asarray([e.label for e in self.examples])
        return float(np.bincount(labels).max() / len(labels))

    def prompt(self, example: Example, shots: int | None = None) -> str:
        """The last ``shots`` (default all) demonstrations, a blank line after each, then the
        example's prompt."""
        shots = len(self.demonstrations) if shots is None else shots
        demos = self.demonstrations[len(self.demonstrations) - shots:]
        return "".join(d.demonstration + "\n\n" for d in demos) + example.prompt


def _glue_prompt(task: str, record: Mapping) -> str:
    s = {k: " ".join(str(v).split()) for k, v in record.items() if k.startswith("sentence")}
    if task == "sst2":
        return f"Review : {s['sentence']}\nSentiment :"
    if task == "mrpc":
        return (f"Are the sentences paraphrases of each other.\nSentence 1: {s['sentence1']}\n"
                f"Sentence 2: {s['sentence2']}\nAnswer:")
    if task == "cola":
        return f"Is this sentence linguistically acceptable?\nSentence: {s['sentence']}\nAnswer:"
    return f"{s['sentence1']}\nquestion: {s['sentence2']} True or False?\nanswer:"


def load_examples(task: str) -> list[Example]:
    """Every example of ``task`` in file order (``glue/<task>.json``, or ``piqa/dev.jsonl`` with
    ``piqa/dev-labels.lst``, found by ``data.data_file``)."""
    if task not in TASKS:
        raise ValueError(f"task: {task!r} is not one of {', '.join(TASKS)}")
    if task == "piqa":
        lines = data_file("piqa/dev.jsonl").read_text().splitlines()
        labels = data_file("piqa/dev-labels.lst").read_text().split()
        if len(lines) != len(labels):
            raise ValueError(f"piqa: {len(lines)} examples but {len(labels)} labels")
        out = []
        for line, label in zip(lines, labels):
            r = json.loads(line)
            out.append(Example(f"Question: {' '.join(r['goal'].split())}\nAnswer:",
                               (" ".join(r["sol1"].split()), " ".join(r["sol2"].split())),
                               int(label)))
        return out
    records = json.loads(data_file(f"glue/{task}.json").read_text())
    return [Example(_glue_prompt(task, r), GLUE_CHOICES[task], int(r["label"])) for r in records]


def make_task(name: str, examples: Sequence[Example], n: int, shots: int, seed: int = 0
              ) -> Task:
    """``shots`` class-balanced demonstrations and ``n`` scored examples (all the rest when
    there are fewer), disjoint, both drawn in one numpy permutation with ``seed``."""
    if n < 1 or shots < 0:
        raise ValueError(f"n, shots: need n >= 1 and shots >= 0, got {n} and {shots}")
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(examples))]
    n_labels = len(examples[0].choices) if examples else 0
    demos: list[int] = []
    for i in order:  # round-robin over labels, in permutation order
        if len(demos) == shots:
            break
        if examples[i].label == len(demos) % n_labels:
            demos.append(i)
    if len(demos) < shots:
        raise ValueError(f"shots: {name} has too few examples of each label for {shots} "
                         "balanced demonstrations")
    chosen = set(demos)
    rest = [i for i in order if i not in chosen][:n]
    return Task(name, tuple(examples[i] for i in demos), tuple(examples[i] for i in rest))


def load_tasks(names: Sequence[str] = TASKS, n: int = 50, shots: int | Mapping[str, int] = 3,
               seed: int = 0) -> list[Task]:
    """``make_task`` of each named task with the same ``n`` and ``seed``, and ``shots`` (one
    count for all, or a count per task name)."""
    per_task = shots if isinstance(shots, Mapping) else dict.fromkeys(names, shots)
    return [make_task(name, load_examples(name), n, per_task[name], seed) for name in names]


class _Rows:
    """One task's scoring rows, sorted by length: ``ids`` [R][T_r] token lists, and per row the
    positions [C, L] whose logits predict ``tokens`` [C, L] (``weights`` [C, L]: 1 where a choice
    has a token). ``example`` [R, C] / ``choice`` [R, C] say which score each (row, choice) is."""

    def __init__(self, tokenizer, task: Task, max_len: int):
        cap = max_len // 2  # a choice longer than half the model's positions is cut
        choice_ids = [[tokenizer.encode(" " + c)[:cap] for c in e.choices]
                      for e in task.examples]
        single = all(len(c) == 1 for cs in choice_ids for c in cs)
        rows = []  # (ids, positions [C, L], tokens [C, L], example [C], choice [C])
        for i, (example, cs) in enumerate(zip(task.examples, choice_ids)):
            longest = max(map(len, cs))
            prompt = self._fit(tokenizer, task, example, max_len - longest + 1)
            if single:
                rows.append((prompt, [[len(prompt) - 1]] * len(cs), [[c[0]] for c in cs],
                             [i] * len(cs), list(range(len(cs)))))
                continue
            for j, c in enumerate(cs):
                pos = [len(prompt) - 1 + k for k in range(len(c))]
                rows.append((prompt + c[:-1], [pos], [c], [i], [j]))
        rows.sort(key=lambda r: len(r[0]))
        self.ids = [r[0] for r in rows]
        width = max(len(p) for r in rows for p in r[1])
        pad = lambda xs: [x + [0] * (width - len(x)) for x in xs]
        self.positions = np.asarray([pad(r[1]) for r in rows], np.int32)
        self.tokens = np.asarray([pad(r[2]) for r in rows], np.int32)
        self.weights = np.asarray([pad([[1] * len(p) for p in r[1]]) for r in rows], np.float32)
        self.example = np.asarray([r[3] for r in rows])
        self.choice = np.asarray([r[4] for r in rows])

    @staticmethod
    def _fit(tokenizer, task: Task, example: Example, budget: int) -> list[int]:
        """The prompt's tokens with as many demonstrations as fit in ``budget``, else its last
        ``budget`` tokens (the start token, if any, kept first)."""
        for shots in range(len(task.demonstrations), -1, -1):
            ids = tokenizer.encode_sequence(task.prompt(example, shots))
            if len(ids) <= budget:
                return ids
        start = tokenizer.encode_sequence("")
        return start + ids[len(ids) - budget + len(start):]


@functools.partial(jax.jit, static_argnums=(1, 2))
def choice_logprobs(params: Params, config: ModelConfig, layer: int | None, ids, mask,
                    residual, positions, tokens, weights) -> jax.Array:
    """Mean log-probability of each choice: [B, C]. ids, mask [B, T]; positions, tokens,
    weights [B, C, L] (the logits at ``positions`` predict ``tokens``). With ``layer`` the
    blocks from ``layer`` up run on the cached ``residual`` [B, T, D] (``residual_at``);
    ``layer`` None runs the full model (``residual`` unused)."""
    b, c, length = positions.shape
    flat = positions.reshape(b, c * length)
    if layer is None:
        logits = forward(params, config, ids, mask, logit_positions=flat).logits
    else:
        logits = forward(params, config, ids, mask, layer=layer, residual=residual,
                         logit_positions=flat).logits
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, c, length, -1)
    token_logp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return (token_logp * weights).sum(-1) / weights.sum(-1)


class DownstreamProbe:
    """Accuracy on ``tasks`` for params that differ from ``model.params`` only at blocks ≥
    ``layer`` (None: no cache, the full model runs). The batches (``batch_size`` rows, sorted
    by length, each padded to a bucketed length and its choices to a power of two) and the
    residual stream entering ``layer`` are computed once."""

    def __init__(self, model: Model, tasks: Sequence[Task], layer: int | None,
                 batch_size: int = 16, params: Params | None = None):
        self.model, self.tasks = model, list(tasks)
        self.layer = None if layer is None else model.config.check_layer(layer)
        params = model.params if params is None else params
        residual = jax.jit(residual_at, static_argnums=(1, 4))
        tok, max_len = model.tokenizer, model.config.n_positions
        self.rows, self.batches = {}, {}
        for task in self.tasks:
            rows = self.rows[task.name] = _Rows(tok, task, max_len)
            batches = []
            for start in range(0, len(rows.ids), batch_size):
                sl = slice(start, start + batch_size)
                ids, mask = pad_batch(rows.ids[sl], tok.pad_id,
                                      length=min(bucket(max(map(len, rows.ids[sl]))), max_len))
                res = None if self.layer is None else residual(params, model.config, ids,
                                                                mask, self.layer)
                # logits only at the batch's longest choice, rounded up to a power of two
                longest = int(rows.weights[sl].sum(-1).max())
                width = min(1 << (longest - 1).bit_length(), rows.positions.shape[-1])
                batches.append((ids, mask, res, rows.positions[sl, :, :width],
                                rows.tokens[sl, :, :width], rows.weights[sl, :, :width]))
            self.batches[task.name] = batches

    def scores(self, params: Params, names: Sequence[str] | None = None
               ) -> dict[str, np.ndarray]:
        """Per task (those ``names``, default all), the mean log-probability of each example's
        choices: [N, C]."""
        out = {}
        for task in self.tasks:
            if names is not None and task.name not in names:
                continue
            rows = self.rows[task.name]
            flat = np.concatenate([np.asarray(choice_logprobs(
                params, self.model.config, self.layer, *batch)) for batch in
                self.batches[task.name]])
            grid = np.full((len(task.examples), len(task.examples[0].choices)), np.nan)
            grid[rows.example, rows.choice] = flat
            out[task.name] = grid
        return out

    def __call__(self, params: Params, names: Sequence[str] | None = None) -> dict[str, dict]:
        """Per task (those ``names``, default all): ``accuracy`` (the argmax choice is the
        label), ``n``, its 95% Wilson ``interval`` [lo, hi] and ``chance``."""
        scores = self.scores(params, names)
        out = {}
        for t in self.tasks:
            if t.name in scores:
                result = accuracy(scores[t.name], [e.label for e in t.examples])
                out[t.name] = {**result, "interval": list(wilson_interval(result["accuracy"],
                                                                          result["n"])),
                               "chance": t.chance}
        return out


def wilson_interval(accuracy: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% with the default ``z``) of a binomial proportion
    ``accuracy`` = k / n measured on ``n`` trials:

        centre ± half, centre = (p̂ + z²/2n) / (1 + z²/n),
        half = z / (1 + z²/n) · √(p̂(1 − p̂)/n + z²/4n²).

    It lies in [0, 1], contains p̂, and is not degenerate at p̂ = 0 or 1 (unlike p̂ ± z√(p̂(1 −
    p̂)/n)); its half-width is about z√(p̂(1 − p̂)/n) for large n: ±0.044 at p̂ = 0.5, n = 500."""
    if n < 1 or not 0 <= accuracy <= 1:
        raise ValueError(f"n, accuracy: need n >= 1 and 0 <= accuracy <= 1, got {n}, {accuracy}")
    q = z * z / n
    centre = (accuracy + q / 2) / (1 + q)
    half = z / (1 + q) * np.sqrt(accuracy * (1 - accuracy) / n + q / (4 * n))
    # the interval lies in [0, 1] and holds p̂ (at p̂ = 0 its lower end is 0 exactly, at p̂ = 1
    # its upper end is 1): the clamps only undo rounding
    return (float(max(0.0, min(accuracy, centre - half))),
            float(min(1.0, max(accuracy, centre + half))))


def above_chance(result: Mapping) -> bool:
    """Whether a task's ``result`` (``accuracy``, ``n``, ``chance``) is above chance: the
    lower end of its 95% Wilson interval exceeds the majority-class rate. Only then can a fall
    to chance after an edit show."""
    return wilson_interval(result["accuracy"], result["n"])[0] > result["chance"]


def accuracy(scores: np.ndarray, labels: Sequence[int]) -> dict:
    """``accuracy``: the fraction of rows of ``scores`` [N, C] whose largest entry is at the
    label (a row with a non-finite score counts as wrong); ``n``."""
    scores = np.asarray(scores, np.float64)
    finite = np.isfinite(scores).all(1)
    right = finite & (np.argmax(np.where(finite[:, None], scores, 0), 1) == np.asarray(labels))
    return {"accuracy": float(right.mean()), "n": int(len(labels))}
