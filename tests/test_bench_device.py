"""``benchmarks/bench_device.py`` at its CPU smoke scale (its docstring's second command): the
same code as the accelerator run, on shrunken models, prints a table with every model's
statistics, ROME and MEMIT rows and finite, positive times and rates. A check that the script
runs, not a benchmark (the numbers are not compared with anything)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = ("gpt2-xl", "gpt-j-6b", "llama-2-7b")
BATCH = 8
# Each model's rows in order (bench_device.Bench.phase_a, phase_b; the memory rows are GPU only).
PHASES = (r"random weights", r"statistics, layer \d+", r"statistics, layers \d+-\d+ \(one pass\)",
          r"ROME prepare \(C's Cholesky, float64 on the host\)", r"ROME keys",
          r"ROME keys \+ v\*", r"ROME c-rome update", r"MEMIT prepare \(C per layer to the device\)",
          rf"MEMIT {BATCH} records \(warm-up, then steady\)",
          rf"MEMIT batch of {BATCH} \(layers \d+-\d+\)")


# slow (about 3 min on 2 busy CPU cores): `pytest -m slow`
@pytest.mark.slow
def test_bench_device_smoke_run_prints_every_row():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_device.py"), "--scale", "0.02",
         "--batch", str(BATCH), "--stats-tokens", "2000", "--v-steps", "2", "--matmul-n", "256",
         "--budget-s", "3600"], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    report = json.loads(lines[-1])
    assert report["skipped"] == [] and "skipped (--budget-s)" not in proc.stdout
    assert all(math.isfinite(r) and r > 0 for r in report["matmul_gflops"].values()), report
    # the printed table: | model | phase | first call (s) | steady (s) | notes |
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines
             if line.startswith("| ") and not line.startswith("| model |")]
    assert [c[:2] for c in cells] == [[r["model"], r["phase"]] for r in report["rows"]]
    for model in MODELS:
        rows = [r for r in report["rows"] if r["model"] == model]
        assert len(rows) == len(PHASES), (model, [r["phase"] for r in rows])
        for row, phase in zip(rows, PHASES):
            assert re.fullmatch(phase, row["phase"]), (model, row["phase"], phase)
            times = [row[k] for k in ("first_s", "steady_s") if row[k] is not None]
            assert times and all(math.isfinite(t) and t > 0 for t in times), row
            if row["phase"].startswith("statistics"):
                assert row["tokens"] >= 2000 and row["tokens_per_s"] > 0, row
                assert math.isfinite(row["gflops"]) and row["gflops"] > 0, row
    for cell, row in zip(cells, report["rows"]):  # the table prints the JSON's times
        for text, value in zip(cell[2:4], (row["first_s"], row["steady_s"])):
            assert (text == "-") == (value is None), (cell, row)
            if value is not None:
                assert abs(float(text) - value) <= 0.05, (cell, row)
