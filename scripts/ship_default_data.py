"""Write what the embedded default model ships for `rome-jax demo` and `rome-jax edit` to run
with nothing else on the machine (run it again after retraining the model):

    python scripts/ship_default_data.py

Into checkpoints/gpt2-cf-tiny/: cache/ (the key statistics at the preset layer over all of
WikiText and the guard profile of 48 normal edits, each as the user cache stores them, under
the name that keys it) and data/ (ME-PPL_50 as is; counterfact.json.gz, the CounterFact records
of the training and held-out ids and of the profile). Reads the full data sets from the usual
data folders (rome_jax.data); builds in a temporary cache (never from the shipped copies), so
the user's is left alone.
"""

import gzip
import json
import os
import shutil
import tempfile

import jax

from rome_jax import data, load_model
from rome_jax.files import write_json_atomic
from rome_jax.guard import PerplexityProbe, build_profile, profile_path, profile_settings
from rome_jax.hf import DEFAULT_MODEL
from rome_jax.rome.edit import prepare
from rome_jax.rome.hparams import preset_for
from rome_jax.rome.stats import cache_path, key_stats, resolve_corpus

GUARD_SAMPLES = 48  # the commands' default --guard-samples


def main() -> None:
    model = load_model(DEFAULT_MODEL)
    hp = preset_for(model.config)
    out = DEFAULT_MODEL / "cache"
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ROME_JAX_CACHE"] = tmp
        corpus = resolve_corpus(hp.mom2_corpus, n_samples=hp.mom2_n_samples)
        stats = key_stats(model, hp.layer, hp.mom2_corpus, n_samples=hp.mom2_n_samples,
                          shipped=False)
        context = prepare(model, hp, jax.random.key(0), stats=stats)  # the commands' --seed 0
        probe = PerplexityProbe(model, data.load_me_ppl("ME-PPL_50"), hp.layer)
        profile = build_profile(model, hp, context, GUARD_SAMPLES, probe=probe)
        assert profile.settings == profile_settings(hp, GUARD_SAMPLES)
        stats_file = cache_path(model, hp.layer, corpus)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        shutil.copyfile(stats_file, out / stats_file.name)
        write_json_atomic(out / profile_path(model, hp, GUARD_SAMPLES).name, profile.to_dict())
    folder = DEFAULT_MODEL / "data"
    (folder / "me_ppl").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data.data_file("me_ppl/ME-PPL_50.json"), folder / "me_ppl" / "ME-PPL_50.json")
    ids = set(profile.case_ids)
    for name in ("training_case_ids.json", "heldout_case_ids.json"):
        ids |= set(json.loads((DEFAULT_MODEL / name).read_text()))
    records = [r for r in data.load_counterfact() if r["case_id"] in ids]
    raw = json.dumps(records, ensure_ascii=False, separators=(",", ":")).encode()
    (folder / data.EMBEDDED_COUNTERFACT).write_bytes(gzip.compress(raw, 9, mtime=0))
    for file in sorted(p for p in DEFAULT_MODEL.rglob("*") if p.parent != DEFAULT_MODEL
                       and p.is_file()):
        print(f"{file.relative_to(DEFAULT_MODEL)}: {file.stat().st_size:,} bytes")
    source = data.describe(data.data_file("counterfact.json"))
    print(f"{len(records)} CounterFact records, from {source}")


if __name__ == "__main__":
    main()
