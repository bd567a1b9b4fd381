"""The package outside its source tree: a built wheel installed into a fresh venv runs the
README's commands on a machine with nothing else (no data folder, an empty HOME and cache, no
network), the embedded default model and what it ships, and caches that live in the user cache,
never in a model's folder.

The fresh venv does not reinstall jax and torch: a ``.pth`` file adds this interpreter's
site-packages after the venv's own. Python does not process ``.pth`` files inside a folder added
that way, so an editable rome_jax there stays invisible, which the test checks.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import tiny_gpt2

from rome_jax import data
from rome_jax.hf import DEFAULT_MODEL

SOURCE_FILES = ("pyproject.toml", "README.md", "rome_jax", "checkpoints")


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


def test_every_package_is_listed_for_the_build():
    """pyproject.toml lists rome_jax's packages by hand (a package-dir maps checkpoints/ into
    the wheel, which automatic discovery cannot): none may be missing."""
    listed = set(tomllib.loads((data.CHECKOUT / "pyproject.toml").read_text())["tool"][
        "setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(data.CHECKOUT).parts)
             for init in (data.CHECKOUT / "rome_jax").rglob("__init__.py")}
    assert found <= listed and listed - found == {"rome_jax.checkpoints"}


def test_the_embedded_model_and_what_it_ships_are_tracked():
    if not (data.CHECKOUT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = set(run(["git", "-C", data.CHECKOUT, "ls-files", "checkpoints/"]).stdout.split())
    on_disk = {str(p.relative_to(data.CHECKOUT)) for p in DEFAULT_MODEL.rglob("*")
               if p.is_file()}
    assert DEFAULT_MODEL == data.CHECKOUT / "checkpoints" / "gpt2-cf-tiny"
    assert on_disk == tracked
    assert {"checkpoints/gpt2-cf-tiny/model.safetensors", "checkpoints/gpt2-cf-tiny/config.json",
            "checkpoints/gpt2-cf-tiny/data/counterfact.json.gz",
            "checkpoints/gpt2-cf-tiny/data/me_ppl/ME-PPL_50.json"} <= tracked


def test_shipped_caches_are_those_of_the_default_model(monkeypatch, tmp_path):
    """The key statistics and guard profile shipped in checkpoints/gpt2-cf-tiny/cache are found
    under the keys the code makes for the default model today (fingerprint, layer, WikiText's
    content, settings), without any data file, and are valid; the shipped ME-PPL_50 is the
    pinned original, and the shipped CounterFact holds every record the default model uses."""
    import gzip

    from rome_jax import load_model
    from rome_jax.guard import cached_profile, profile_path, profile_settings
    from rome_jax.rome.hparams import preset_for
    from rome_jax.rome.stats import find_key_stats, resolve_corpus

    monkeypatch.setenv("ROME_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ROME_JAX_DATA", raising=False)
    monkeypatch.setattr(data, "CHECKOUT", tmp_path / "not-a-checkout")
    model = load_model()
    hp = preset_for(model.config)
    path, stats, errors = find_key_stats(model, hp.layer, resolve_corpus(
        hp.mom2_corpus, n_samples=hp.mom2_n_samples))
    assert errors == [] and stats is not None and path.parent == DEFAULT_MODEL / "cache"
    assert stats.n_texts == 2891 and stats.moment.dtype.name == "float32"
    profile = cached_profile(profile_path(model, hp, 48), profile_settings(hp, 48),
                             lambda: pytest.fail("the shipped profile was not found"))
    assert profile.n == 48 and not (tmp_path / "cache").exists()

    shipped = DEFAULT_MODEL / "data" / "me_ppl" / "ME-PPL_50.json"
    assert data.sha256_file(shipped) == data.SOURCES["me_ppl/ME-PPL_50.json"].sha256
    records = json.loads(gzip.decompress((DEFAULT_MODEL / "data" / "counterfact.json.gz"
                                          ).read_bytes()))
    ids = {r["case_id"] for r in records}
    for name in ("training_case_ids.json", "heldout_case_ids.json"):
        assert set(json.loads((DEFAULT_MODEL / name).read_text())) <= ids, name
    assert set(profile.case_ids) <= ids


def fresh_venv(root: Path) -> Path:
    """A venv at ``root`` that borrows this interpreter's packages (see the module docstring);
    its python."""
    run([sys.executable, "-m", "venv", "--without-pip", root])
    python = root / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                    ).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(deps)))
    return python


def copy_sources(src: Path) -> Path:
    """The files a build reads, copied (no stale build/, cache or egg-info gets in)."""
    for name in SOURCE_FILES:
        origin = data.CHECKOUT / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "stats", "*.egg-info"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(origin, src / name)
    return src


def test_an_editable_install_finds_the_model_at_the_top(tmp_path):
    src = copy_sources(tmp_path / "src")
    python = fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ROME_JAX"))}
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", src],
        env=env, cwd=tmp_path)
    where = json.loads(run([python, "-c", "import json, rome_jax.hf as hf, rome_jax.data as d; "
                                          "print(json.dumps([hf.__file__, str(hf.DEFAULT_MODEL), "
                                          "str(d.EMBEDDED)]))"], env=env, cwd=tmp_path).stdout)
    assert where == [str(src / "rome_jax" / "hf.py"), str(src / "checkpoints" / "gpt2-cf-tiny"),
                     str(src / "checkpoints" / "gpt2-cf-tiny" / "data")]


def closed_port() -> int:
    """A local port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_wheel_commands() -> list[list[str]]:
    """The ``env/bin/rome-jax ...`` lines of the README's "Installing from a wheel" block."""
    text = (data.CHECKOUT / "README.md").read_text()
    block = re.search(r"### Installing from a wheel.*?```bash\n(.*?)```", text, re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.startswith("env/bin/")]


def test_wheel_runs_the_readme_commands_on_a_bare_machine(tmp_path):
    """README command 1 (``rome-jax demo``) and the README's wheel commands, run as written from
    a fresh venv with the built wheel, outside any checkout: HOME and the cache in a temporary
    folder, no ROME_JAX_DATA, no ../shared, the download mirror a closed local port, the
    guard on. Everything comes from the wheel: exit 0, the demo table, edits that take."""
    src = copy_sources(tmp_path / "src")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", src,
         "-w", tmp_path / "dist"])
    (wheel,) = (tmp_path / "dist").glob("rome_jax-*.whl")
    with zipfile.ZipFile(wheel) as zipped:
        names = set(zipped.namelist())
    for file in DEFAULT_MODEL.rglob("*"):
        if file.is_file():
            assert f"rome_jax/checkpoints/gpt2-cf-tiny/{file.relative_to(DEFAULT_MODEL)}" in names
    for file in (data.CHECKOUT / "rome_jax").rglob("*.py"):
        assert str(file.relative_to(data.CHECKOUT)) in names

    venv = tmp_path / "venv"
    python = fresh_venv(venv)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "ROME_JAX", "XDG_", "HF_", "JAX_"))}
    env.update(HOME=str(home), JAX_PLATFORMS="cpu",
               ROME_JAX_DATA_URL=f"http://127.0.0.1:{closed_port()}")
    work = tmp_path / "elsewhere"
    work.mkdir()
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
         wheel], env=env, cwd=work)

    where = json.loads(run([python, "-c", "import json, rome_jax.data as d, rome_jax.hf as hf; "
                                          "print(json.dumps([hf.__file__, str(hf.DEFAULT_MODEL), "
                                          "[str(p) for p in d.data_dirs()]]))"],
                           env=env, cwd=work).stdout)
    assert all(Path(path).is_relative_to(venv) for path in where[:2]), where
    assert where[2] == [str(home / ".cache" / "rome_jax" / "data")]  # no ../shared, no $DATA
    installed_model = Path(where[1])

    commands = readme_wheel_commands()
    assert [c[:2] for c in commands] == [["env/bin/rome-jax", "demo"],
                                         ["env/bin/rome-jax", "edit"]]
    for command in commands:
        proc = run([venv / "bin" / "rome-jax", *command[1:]], env=env, cwd=work)
        if command[1] == "demo":
            assert "P(new) before -> after" in proc.stdout and "\nguard: refuses" in proc.stdout
            assert "embedded default model's subset" in proc.stdout
            rows = [line.split() for line in proc.stdout.splitlines()
                    if re.match(r"\s+\d+\s+(rome|c-rome)\s", line)]
            assert len(rows) == 6, proc.stdout
        else:
            assert f"of {installed_model} " in proc.stdout and "status                 applied" \
                in proc.stdout, proc.stdout
            p_new = float(re.search(r"P\(new\)\s+\S+ -> (\S+)", proc.stdout).group(1))
            p_true = float(re.search(r"P\(true\)\s+\S+ -> (\S+)", proc.stdout).group(1))
            assert p_new > p_true, proc.stdout  # the edit takes
    cache = home / ".cache" / "rome_jax"
    assert not (cache / "data").exists() and not (cache / "stats").exists()  # all shipped
    assert not (installed_model / "stats").exists()
