"""Markdown table of ``rome-jax screen`` files: per file and subject group (one-token subject at
the start of the prompt, or not), the ME-PPL_50 perplexity-ratio distribution, the update's
denominators and norms and the cosine of k^u with k̄ (medians) and the efficacy (share of edits with P(new) > P(true)
on the rewrite prompt, before and after the edit).

    python scripts/screen_table.py runs/smollm2_l12_rome.json runs/smollm2_l12_crome.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

COLUMNS = ("file", "method", "layer", "bos", "subjects", "n", "ratio median", "ratio p90",
           "ratio max", "> 2x", "> 10x", "\\|kᵀu/‖u‖\\| (median)",
           "\\|(C⁻¹kₐ)ᵀk_b\\| (median)", "negative", "‖Δ‖ (median)", "cos(k^u, k̄) (median)",
           "efficacy before", "efficacy")


def group_row(rows: list[dict]) -> list[str]:
    """The statistics of one group of screen rows (rows with an error are left out)."""
    rows = [r for r in rows if not r.get("error")]
    if not rows:
        return ["0"] + ["-"] * (len(COLUMNS) - 6)
    cosines = [r["key_cosine"] for r in rows if "key_cosine" in r]
    ratio = np.array([r["ratio"] for r in rows], float)
    finite = [r for r in rows if "denominator" in r]   # a non-finite update has no diagnostics
    med = lambda key, f=float: f"{np.median([f(r[key]) for r in finite]):.3g}" if finite else "-"
    success = [r["success"] for r in rows if r.get("success") is not None]
    before = [r["p_new_before"] > r["p_true_before"] for r in rows
              if r.get("p_true_before") is not None]
    return [str(len(rows)), f"{np.median(ratio):.3g}", f"{np.quantile(ratio, 0.9):.3g}",
            f"{ratio.max():.3g}", str(int((ratio > 2).sum())), str(int((ratio > 10).sum())),
            med("denominator_unit_u", abs), med("denominator", abs),
            str(sum(r["denominator"] < 0 for r in finite)), med("delta_norm"),
            f"{np.median(cosines):.3g}" if cosines else "-",
            f"{np.mean(before):.2f}" if before else "-",
            f"{np.mean(success):.2f}" if success else "-"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + " --- |" * len(COLUMNS))
    for file in args.files:
        data = json.loads(Path(file).read_text())
        settings = data["settings"]
        for label, first in (("first-token", True), ("other", False)):
            rows = [r for r in data["records"] if r.get("first_token_subject") == first]
            if not rows:
                continue
            head = [Path(file).name, settings["method"], str(settings["layer"]),
                    str(settings.get("bos")), label]
            print("| " + " | ".join(head + group_row(rows)) + " |")


if __name__ == "__main__":
    main()
