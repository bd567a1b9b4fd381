"""The resumable state of a sequential experiment's trace (``sequential``, ``sequential-batch``):
after ``done`` updates, the weights of every layer the updates change and AlphaEdit's K_pᵀK_p,
as ``state-TRACE.npz`` beside the journal ("/" in a trace's name becomes "-").

The file holds ``done`` (an integer), ``weight{layer}`` (the MLP output weight, as
``rome_weight``'s W [F, D], of each changed layer: ROME's one layer, or a batch editor's window)
and ``preserved{layer}`` ([F, F], AlphaEdit's only). It is written atomically (a cut run leaves
the old state or the new one, never half of one) and read without unpickling: a file that is not
such a state is a ValueError naming it.

A trace's rows are journaled before its state, so a run cut between the two replays that one
update (deterministic); a state ahead of the journal (a rows.jsonl restored from an older copy)
is not trusted: ``resume`` starts the trace over from the base model, the rows already written
kept.

The state is a cache of this machine (ignored by git: megabytes per trace, rewritten after
every update). What a fresh checkout needs to go on is a replay journal beside the rows, each
entry written once and committed with them, in the smaller of two forms:

* ``sequential-batch``'s v* targets (``save_targets``: δ [B, D] and the solves' losses,
  ``vstar/TRACE-UPDATE.npz``, 0.1-0.2 MB a batch of 100; the update's factors would be rank
  100 per layer). Replaying costs the keys and closed forms, not the v* optimisation that
  dominates an update.
* ``sequential``'s updates themselves (``save_update``: one fact's rank-one factors per layer
  and, for AlphaEdit, the keys its K_pᵀK_p grew by, ``updates/TRACE-STEP.npz``, kilobytes).
  Replaying costs an ``apply_edit`` per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _name(trace: str) -> str:
    """A trace's name in a file name ("/" becomes "-")."""
    return trace.replace("/", "-")


def _read_npz(path: Path, what: str, parse):
    """``parse`` of the arrays of the .npz at ``path`` (``files.read_npz``: a dict, never
    unpickled). A file that is not such an .npz, or that ``parse`` refuses (ValueError,
    KeyError), is a ValueError "PATH: not WHAT (reason); delete it, or use --overwrite to start
    over"."""
    from rome_jax.files import read_npz

    try:
        return parse(read_npz(path))
    except (ValueError, KeyError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"{path}: not {what} ({reason}); delete it, or use --overwrite to "
                         "start over") from None


def state_path(out: Path, trace: str) -> Path:
    return Path(out) / f"state-{_name(trace)}.npz"


def save_state(out: Path, trace: str, done: int, params, layers: Sequence[int],
               preserved: Mapping | None = None) -> None:
    """The weights at ``layers`` of ``params`` and ``preserved`` ({layer: [F, F]}) after
    ``done`` updates, atomically."""
    from rome_jax.files import write_npz_atomic
    from rome_jax.models.transformer import rome_weight

    arrays = {f"weight{layer}": np.asarray(rome_weight(params, layer)[0]) for layer in layers}
    arrays.update({f"preserved{layer}": np.asarray(p) for layer, p in (preserved or {}).items()})
    write_npz_atomic(state_path(out, trace), done=done, **arrays)


def load_state(out: Path, trace: str, params, layers: Sequence[int]
               ) -> tuple[int, object, dict]:
    """(updates done, ``params`` with the saved weights at ``layers``, preserved), or
    (0, ``params``, {}) without a state. ValueError naming the file for one that is not a state
    of this model at these layers (never unpickled)."""
    import jax.numpy as jnp

    path = state_path(out, trace)
    if not path.exists():
        return 0, params, {}

    def parse(saved):
        done = saved["done"]
        weights = {layer: saved[f"weight{layer}"] for layer in layers}
        preserved = {int(k.removeprefix("preserved")): v
                     for k, v in saved.items() if k.startswith("preserved")}
        if (done.shape or done.dtype.kind not in "iu"
                or any(a.dtype.kind != "f" for a in (*weights.values(), *preserved.values()))):
            raise ValueError("done, weight or preserved of another type")
        return done, weights, preserved

    done, weights, preserved = _read_npz(path, "a saved state", parse)
    fc_out = params["blocks"]["mlp"]["fc_out"]
    w = fc_out["w"]
    for layer, weight in weights.items():
        if weight.shape != w.shape[1:]:
            raise ValueError(f"{path}: a weight of shape {weight.shape} at layer {layer}, the "
                             f"model has {w.shape[1:]}; use --overwrite to start over")
        w = w.at[layer].set(jnp.asarray(weight, w.dtype))
    for layer, p in preserved.items():
        if p.shape != (w.shape[1],) * 2:
            raise ValueError(f"{path}: preserved{layer} of shape {p.shape}, the model needs "
                             f"{(w.shape[1],) * 2}; use --overwrite to start over")
    mlp = {**params["blocks"]["mlp"], "fc_out": {**fc_out, "w": w}}
    return (int(done), {**params, "blocks": {**params["blocks"], "mlp": mlp}},
            {layer: jnp.asarray(p) for layer, p in preserved.items()})


def resume(out: Path, trace: str, params, layers: Sequence[int], written: int,
           journal_path: Path) -> tuple[int, object, dict]:
    """``load_state``, unless the state is ahead of the journal, whose rows of ``trace`` end
    at ``written`` updates: then (0, ``params``, {}), said on stderr, so that the trace is
    replayed from the base model."""
    from rome_jax.arguments import PROG, log

    done, edited, preserved = load_state(out, trace, params, layers)
    if done <= written:
        return done, edited, preserved
    log(f"{PROG}: {state_path(out, trace)}: at {done} updates, but {journal_path} ends at "
        f"{written}; replaying {trace} from the base model")
    return 0, params, {}


VSTAR_FIELDS = ("delta", "losses", "steps", "nll", "kl", "decay")  # what a replay reads


def targets_path(out: Path, trace: str, update: int) -> Path:
    return Path(out) / "vstar" / f"{_name(trace)}-{update:05d}.npz"


def save_targets(out: Path, trace: str, update: int, case_ids: Sequence[int], targets,
                 seconds: float) -> None:
    """Update ``update``'s v* targets (``VResult`` per request, in ``case_ids``' order) and the
    ``seconds`` their solves took, atomically. ``v_star`` and ``v_init`` are not kept: the
    closed forms read δ alone."""
    from rome_jax.files import write_npz_atomic

    write_npz_atomic(targets_path(out, trace, update), case_ids=np.asarray(case_ids, np.int64),
                     seconds=seconds, **{name: np.stack([np.asarray(getattr(t, name))
                                                         for t in targets])
                                         for name in VSTAR_FIELDS})


def load_targets(out: Path, trace: str, update: int, case_ids: Sequence[int]
                 ) -> tuple[list, float] | None:
    """(the ``VResult`` per request, seconds) saved by ``save_targets``, ``v_star`` and
    ``v_init`` NaN; None without a file. ValueError naming the file for one that is not such a
    journal entry, or whose records are not ``case_ids`` (another draw or batch size)."""
    from rome_jax.rome.values import VResult

    path = targets_path(out, trace, update)
    if not path.exists():
        return None

    def parse(saved):
        fields = {name: saved[name] for name in VSTAR_FIELDS}
        saved_ids, seconds = saved["case_ids"], float(saved["seconds"])
        if fields["delta"].ndim != 2 or any(len(v) != len(saved_ids) for v in fields.values()):
            raise ValueError("fields of unequal lengths")
        return fields, saved_ids, seconds

    fields, saved_ids, seconds = _read_npz(path, "a v* journal entry", parse)
    if saved_ids.tolist() != [int(c) for c in case_ids]:
        raise ValueError(f"{path}: the v* targets of other records (case ids "
                         f"{saved_ids[:3].tolist()}…, this update edits "
                         f"{[int(c) for c in case_ids][:3]}…); use --overwrite to start over")
    nan = np.full(fields["delta"].shape[1], np.nan, np.float32)
    return [VResult(v_star=nan, v_init=nan, **{k: v[i] for k, v in fields.items()})
            for i in range(len(saved_ids))], seconds


def update_path(out: Path, trace: str, step: int) -> Path:
    return Path(out) / "updates" / f"{_name(trace)}-{step:05d}.npz"


def save_update(out: Path, trace: str, step: int, case_id: int, edit, keys: Mapping) -> None:
    """Update ``step`` of ``trace`` (the ``Edit`` that wrote record ``case_id``, as
    ``edit_arrays``) and ``keys`` ({layer: K [B, F]}, AlphaEdit's: what its K_pᵀK_p grew by;
    empty for the other methods), atomically."""
    from rome_jax.editors.delta import edit_arrays
    from rome_jax.files import write_npz_atomic

    write_npz_atomic(update_path(out, trace, step), case_id=np.int64(case_id),
                     **edit_arrays(edit),
                     **{f"keys{layer}": np.asarray(k) for layer, k in keys.items()})


def load_update(out: Path, trace: str, step: int, case_id: int) -> tuple[object, dict] | None:
    """(the ``Edit``, keys) saved by ``save_update``, or None without a file. ValueError naming
    the file for one that is not such an entry or that wrote another record."""
    from rome_jax.editors.delta import edit_from_arrays

    path = update_path(out, trace, step)
    if not path.exists():
        return None

    def parse(arrays):
        saved_id = arrays.pop("case_id")
        keys = {int(name.removeprefix("keys")): arrays.pop(name)
                for name in list(arrays) if name.startswith("keys")}
        return saved_id, edit_from_arrays(arrays, path), keys

    saved_id, edit, keys = _read_npz(path, "an update journal entry", parse)
    if saved_id.shape or int(saved_id) != int(case_id):
        raise ValueError(f"{path}: the update of record {saved_id.tolist()}, this step edits "
                         f"{int(case_id)}; use --overwrite to start over")
    return edit, keys


def drop_journal(out: Path, trace: str) -> None:
    """Delete ``trace``'s replay journal, either form (a trace started over)."""
    for folder in ("vstar", "updates"):
        for path in (Path(out) / folder).glob(f"{_name(trace)}-{'[0-9]' * 5}.npz"):
            path.unlink()
