"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1).

The subject's token embeddings are corrupted with Gaussian noise of ``noise_scale`` (3) times
the embedding standard deviation, ``samples`` (10) times with the same noise for every
restoration; then the clean value of one state is restored and the probability of the target
token at the last position is measured, averaged over the noise samples:

* ``hidden``: the residual stream leaving block ``l`` at token ``t``;
* ``mlp`` / ``attn``: the MLP / attention output at token ``t`` in a window of ``window`` (10)
  blocks centred on ``l`` (ROME's ``range(max(0, l - w // 2), min(L, l - (-w // 2)))``).

The grid ``scores[kind]`` is ``[tokens, layers]``; ``high_score`` is the clean probability,
``low_score`` the corrupted one with nothing restored. The standard deviation (over the
embeddings of given subjects, or of tokens drawn with the key) and the noise both come from one
explicit ``jax.random`` key. Every restoration runs as rows of one batched, jit-compiled forward
that scans the blocks once, patching the clean values where a row asks for them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rome_jax.files import atomic_file
from rome_jax.models.config import ModelConfig
from rome_jax.models.model import Model
from rome_jax.models.transformer import (Params, block, embed, make_context, token_embeddings,
                                         unembed)
from rome_jax.rome.request import subject_token_index

KINDS = ("hidden", "mlp", "attn")
_KIND_CODE = {"hidden": 0, "attn": 1, "mlp": 2, "none": 3}


@dataclasses.dataclass
class TraceResult:
    """scores[kind]: [T, L] mean probability of ``target`` with that state restored."""

    prompt: str
    subject: str
    tokens: list[str]
    subject_range: tuple[int, int]
    target: str
    target_id: int
    high_score: float
    low_score: float
    scores: dict[str, np.ndarray]
    noise_std: float
    noise_scale: float
    samples: int
    window: int

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["subject_range"] = list(self.subject_range)
        out["scores"] = {k: np.asarray(v, np.float64).tolist() for k, v in self.scores.items()}
        out["layers"] = int(next(iter(self.scores.values())).shape[1]) if self.scores else 0
        return out


def embedding_std(model: Model, key: jax.Array | None = None,
                  subjects: Sequence[str] | None = None, n_tokens: int = 1000) -> float:
    """Standard deviation of the token embeddings the first block reads
    (``transformer.token_embeddings``: times sqrt(D) where the config scales them, as Gemma
    does; the noise is added there): over the tokens of ``subjects`` (ROME uses the subjects of
    its known facts), or else over ``n_tokens`` token ids drawn with ``key``."""
    if subjects:
        ids = sorted({i for s in subjects for i in model.tokenizer.encode(s)})
    else:
        if key is None:
            raise ValueError("embedding_std: needs subjects or a jax.random key")
        ids = jax.random.randint(key, (n_tokens,), 0, model.config.vocab_size)
    rows = token_embeddings(model.params, model.config, jnp.asarray(ids))
    return float(jnp.std(rows.astype(jnp.float32)))


def _block(p: Params, cfg: ModelConfig, h, ctx, patch_h, patch_a, patch_m, clean, layer):
    """One block with clean values patched in where patch_* [B, T] is true.
    clean = (hidden, attn, mlp), each [T, D]. Returns (h, attn_out, mlp_out)."""
    clean_h, clean_a, clean_m = clean
    where = {"attn": (patch_a, clean_a), "mlp": (patch_m, clean_m)}

    def patch(name, out):
        at, value = where[name]
        return jnp.where(at[..., None], value, out)

    out = block(p, cfg, h, ctx, patch=patch, layer=layer)
    return jnp.where(patch_h[..., None], clean_h, out.h), out.attn, out.mlp


def _scan(params: Params, cfg: ModelConfig, h, ctx, rows, clean, collect: bool = False):
    """Run all blocks over h [B, T, D]; rows = (kind, lo, hi, pos) [B] say what to patch.
    Returns (h [B, T, D], per-layer (hidden, attn, mlp) [L, B, T, D] if ``collect``)."""
    kind, lo, hi, pos = rows
    at_pos = jnp.arange(h.shape[1])[None, :] == pos[:, None]          # [B, T]

    def step(h, xs):
        p, j, c = xs
        inside = ((lo <= j) & (j < hi))[:, None] & at_pos
        patches = [inside & (kind == _KIND_CODE[k])[:, None] for k in ("hidden", "attn", "mlp")]
        h, a, m = _block(p, cfg, h, ctx, *patches, c, j)
        return h, ((h, a, m) if collect else None)

    layers = jnp.arange(cfg.n_layer)
    return jax.lax.scan(step, h, (params["blocks"], layers, clean))


@functools.partial(jax.jit, static_argnums=1)
def _clean_states(params: Params, cfg: ModelConfig, ids):
    """ids [T] -> (probs [V] at the last token, (hidden, attn, mlp) [L, T, D])."""
    ctx = make_context((1, ids.shape[0]), None, params["wte"].dtype)
    h = embed(params, cfg, ids[None], ctx)
    none = jnp.full((1,), _KIND_CODE["none"])
    zeros = jnp.zeros((cfg.n_layer, ids.shape[0], h.shape[-1]), h.dtype)
    h, states = _scan(params, cfg, h, ctx, (none, none * 0, none * 0, none * 0),
                      (zeros, zeros, zeros), collect=True)
    probs = jax.nn.softmax(unembed(params, cfg, h[0, -1]).astype(jnp.float32))
    return probs, jax.tree.map(lambda s: s[:, 0], states)


@functools.partial(jax.jit, static_argnums=1)
def _restored_probs(params: Params, cfg: ModelConfig, ids, noise, clean, rows, target):
    """Probability of ``target`` at the last token, averaged over noise samples, for each row.

    ids [T]; noise [S, T, D] (zero outside the subject); clean (hidden, attn, mlp) [L, T, D];
    rows (kind, lo, hi, pos) [R] -> [R]."""
    n_rows, n_samples = rows[0].shape[0], noise.shape[0]
    seq = ids.shape[0]
    ctx = make_context((1, seq), None, params["wte"].dtype)
    h = embed(params, cfg, ids[None], ctx) + noise                      # [S, T, D]
    h = jnp.broadcast_to(h[None], (n_rows, *h.shape)).reshape(n_rows * n_samples, seq, -1)
    rows = tuple(jnp.repeat(r, n_samples) for r in rows)
    h = _scan(params, cfg, h, ctx, rows, clean)[0]
    probs = jax.nn.softmax(unembed(params, cfg, h[:, -1]).astype(jnp.float32), axis=-1)
    return probs[:, target].reshape(n_rows, n_samples).mean(1)


def trace(model: Model, prompt: str, subject: str, target: str | None = None, *,
          key: jax.Array, samples: int = 10, noise_scale: float = 3.0,
          std: float | None = None, std_subjects: Sequence[str] | None = None,
          kinds: Sequence[str] = KINDS, window: int = 10, batch_rows: int = 64,
          params: Params | None = None) -> TraceResult:
    """Causal trace of ``prompt`` (one ``{}`` for ``subject``).

    ``target``: its first token (after a space) is scored; None: the clean model's greedy next
    token. ``std``: the embedding std (default: :func:`embedding_std` over ``std_subjects``, or
    over token ids drawn with ``key``). ``batch_rows`` restorations run per forward.
    """
    params = model.params if params is None else params
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kind: {bad[0] if bad else 'none'!r} is not one of "
                         f"{', '.join(KINDS)}")
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        raise ValueError(f"prompt: must contain exactly one '{{}}' for the subject, got "
                         f"{prompt!r}")
    if not subject or not subject.strip():
        raise ValueError("subject: must be a non-empty string")
    if samples < 1 or window < 1:
        raise ValueError("samples and window must be at least 1")
    tok = model.tokenizer
    ids, first = subject_token_index(tok, prompt, subject, "subject_first")
    last = subject_token_index(tok, prompt, subject, "subject_last")[1]
    if len(ids) > model.config.n_positions:
        raise ValueError(f"prompt: {len(ids)} tokens exceed the model's "
                         f"{model.config.n_positions} positions")
    ids_arr = jnp.asarray(ids, jnp.int32)
    clean_probs, clean = _clean_states(params, model.config, ids_arr)
    if target is None:
        target_id = int(jnp.argmax(clean_probs))
        target = tok.decode([target_id])
    else:
        if not target.strip():
            raise ValueError("target: must be a non-empty string")
        target_id = tok.encode(" " + target.strip())[0]
    key_std, key_noise = jax.random.split(key)
    if std is None:
        std = embedding_std(model, key_std, std_subjects)
    n_layer, seq, width = model.config.n_layer, len(ids), model.config.d_model
    noise = jax.random.normal(key_noise, (samples, seq, width), jnp.float32)
    in_subject = (jnp.arange(seq) >= first) & (jnp.arange(seq) <= last)
    noise = noise_scale * std * noise * in_subject[None, :, None]
    noise = noise.astype(params["wte"].dtype)

    # Row 0: nothing restored; then every (kind, token, layer).
    table = [(_KIND_CODE["none"], 0, 0, 0)]
    for kind in kinds:
        for t in range(seq):
            for layer in range(n_layer):
                if kind == "hidden":
                    lo, hi = layer, layer + 1
                else:
                    lo, hi = max(0, layer - window // 2), min(n_layer, layer - (-window // 2))
                table.append((_KIND_CODE[kind], lo, hi, t))
    rows = np.asarray(table, np.int32)
    pad = (-len(rows)) % batch_rows
    rows = np.concatenate([rows, np.repeat(rows[:1], pad, 0)])
    out = []
    for start in range(0, len(rows), batch_rows):
        chunk = tuple(jnp.asarray(rows[start:start + batch_rows, c]) for c in range(4))
        out.append(np.asarray(_restored_probs(params, model.config, ids_arr, noise, clean,
                                              chunk, target_id)))
    probs = np.concatenate(out)[:len(table)]
    grid = probs[1:].reshape(len(kinds), seq, n_layer)
    return TraceResult(
        prompt=prompt, subject=subject, tokens=[tok.decode([i]) for i in ids],
        subject_range=(first, last + 1), target=target, target_id=target_id,
        high_score=float(clean_probs[target_id]), low_score=float(probs[0]),
        scores={k: grid[i] for i, k in enumerate(kinds)}, noise_std=float(std),
        noise_scale=float(noise_scale), samples=samples, window=window)


def plot_trace(result: TraceResult, path: str | os.PathLike, title: str | None = None) -> Path:
    """One heatmap per kind (tokens × layers; subject tokens starred), as a PNG written
    atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    kinds = list(result.scores)
    labels = [repr(t)[1:-1] + ("*" if result.subject_range[0] <= i < result.subject_range[1]
                               else "") for i, t in enumerate(result.tokens)]
    cmaps = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds) + 1, 0.35 * len(labels)
                                                      + 1.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        grid = result.scores[kind]
        im = ax.pcolor(grid, cmap=cmaps.get(kind, "Blues"), vmin=result.low_score)
        ax.invert_yaxis()
        ax.set_yticks(np.arange(len(labels)) + 0.5)
        ax.set_yticklabels(labels if ax is axes[0][0] else [])
        ax.set_xticks(np.arange(grid.shape[1]) + 0.5)
        ax.set_xticklabels(range(grid.shape[1]))
        ax.set_xlabel("layer" if kind == "hidden" else f"centre of {result.window} layers")
        ax.set_title(f"restore {kind}", fontsize=10)
        fig.colorbar(im, ax=ax, label=f"p({result.target.strip()!r})")
    fig.suptitle(title or f"{result.prompt.format(result.subject)!r}: clean "
                 f"{result.high_score:.3g}, corrupted {result.low_score:.3g}", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path
