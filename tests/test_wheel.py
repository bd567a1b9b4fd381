"""The package outside its source tree: a built wheel installed into a fresh venv, and caches
that live in the user cache, never in a model's folder.

The fresh venv does not reinstall jax and torch: a ``.pth`` file adds this interpreter's
site-packages after the venv's own. Python does not process ``.pth`` files inside a folder added
that way, so an editable rome_jax there stays invisible, which the test checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import tiny_gpt2

from rome_jax import data
from rome_jax.hf import DEFAULT_MODEL

SOURCE_FILES = ("pyproject.toml", "README.md", "rome_jax")


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600,
                          **kwargs)
    assert proc.returncode == 0, f"{command}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_stats_and_guard_profiles_live_in_the_user_cache(tmp_path, monkeypatch):
    from rome_jax import load_model, save_hf
    from rome_jax.guard import profile_path
    from rome_jax.rome.hparams import RomeHParams
    from rome_jax.rome.stats import cache_path, resolve_corpus

    model_dir = tmp_path / "my-model"
    save_hf(tiny_gpt2(n_layer=2, d_model=32, n_head=2, seq_len=32, seed=0), model_dir)
    model = load_model(model_dir)
    monkeypatch.setenv("ROME_JAX_CACHE", str(tmp_path / "cache"))
    stats = cache_path(model, 1, resolve_corpus("wikitext", n_samples=40))
    assert stats.parent == tmp_path / "cache" / "stats"
    assert profile_path(model, RomeHParams(layer=1), 4).parent == tmp_path / "cache" / "stats"


def test_wheel_installs_and_edits_outside_the_checkout(tmp_path):
    # Build from a copy of the files a build reads, so no stale build/ or cache gets in.
    src = tmp_path / "src"
    for name in SOURCE_FILES:
        origin = data.CHECKOUT / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "stats", "*.egg-info"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(origin, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", src,
         "-w", tmp_path / "dist"])
    (wheel,) = (tmp_path / "dist").glob("rome_jax-*.whl")
    with zipfile.ZipFile(wheel) as zipped:
        names = set(zipped.namelist())
    for file in DEFAULT_MODEL.iterdir():
        if file.is_file():
            assert f"rome_jax/checkpoints/gpt2-cf-tiny/{file.name}" in names, file.name

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                    ).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(deps)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ROME_JAX"))}
    work = tmp_path / "elsewhere"
    work.mkdir()
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
         wheel], env=env, cwd=work)

    where = json.loads(run([python, "-c", "import json, rome_jax.hf as hf; print(json.dumps("
                                          "[hf.__file__, str(hf.DEFAULT_MODEL)]))"],
                           env=env, cwd=work).stdout)
    assert all(Path(path).is_relative_to(venv) for path in where), where
    installed_model = Path(where[1])

    shared = data.data_file("corpus/wikitext2_raw_test.txt").parents[1]
    env.update(ROME_JAX_DATA=str(shared), ROME_JAX_CACHE=str(tmp_path / "cache"),
               JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    proc = run([venv / "bin" / "rome-jax", "edit", "--prompt", "{} plays the", "--subject",
                "Toko Yasuda", "--target-new", "piano", "--no-guard", "--mom2-n-samples", "40",
                "--v-steps", "4", "--template-lengths", "5x5", "--json"], env=env, cwd=work)
    report = json.loads(proc.stdout)
    assert report["status"] == "applied"
    assert Path(report["model"]) == installed_model
    assert list((tmp_path / "cache" / "stats").iterdir())  # the key statistics, in the cache
    assert not (installed_model / "stats").exists()
