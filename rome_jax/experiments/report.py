"""What an experiment leaves beside its rows: ``summary.json``, ``table.md`` and ``figure.png``,
each written atomically; and the small helpers that build them (Markdown tables, groups)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rome_jax.files import atomic_file, write_bytes_atomic, write_json_atomic


FILES = ("summary.json", "table.md", "figure.png")


@dataclasses.dataclass
class Report:
    """``summary`` (JSON-ready numbers), ``markdown`` (the tables, with a line saying what they
    are) and ``figure(path)``, which saves a PNG (None: the experiment has no figure)."""

    summary: dict
    markdown: str
    figure: Callable[[Path], None] | None = None


def write_report(out_dir: str | Path, report: Report) -> list[Path]:
    """``summary.json``, ``table.md`` and (with a figure) ``figure.png`` in ``out_dir``."""
    summary, table, figure = (Path(out_dir) / name for name in FILES)
    paths = [write_json_atomic(summary, report.summary),
             write_bytes_atomic(table, (report.markdown.rstrip() + "\n").encode())]
    if report.figure is not None:
        with atomic_file(figure, suffix=".png") as tmp:
            report.figure(tmp)
        paths.append(figure)
    return paths


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures are only saved)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str, fontsize: float = 10, dpi: int = 110) -> None:
    """Give ``fig`` its title, lay it out, save it as PNG to ``path`` and close it."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    pyplot().close(fig)


def perplexity_axis(ax, values: Sequence[float], **labels) -> None:
    """Set ``ax``'s y scale for perplexities ``values``: logarithmic where they span more than a
    decade (a collapse), linear otherwise (a log axis labels less than a decade badly);
    ``labels`` go to ``ax.set`` (title, xlabel, ...)."""
    wide = bool(values) and max(values) > 10 * min(values)
    ax.set(yscale="log" if wide else "linear", **labels)


def accuracy_trace(ax, x: Sequence[float], results: Sequence[Mapping], **plot) -> None:
    """Downstream accuracy of ``results`` (``downstream.evaluate``'s per-task dicts: accuracy,
    n) against ``x`` on ``ax``, with its 95% Wilson band in the line's colour; ``plot`` goes to
    ``ax.plot`` (label, color, ...)."""
    from rome_jax.downstream import wilson_interval

    line, = ax.plot(x, [r["accuracy"] for r in results], marker="o", ms=3, **plot)
    lo, hi = zip(*(wilson_interval(r["accuracy"], r["n"]) for r in results))
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)


def accuracy_axis(ax, task: str, chance: float | None) -> None:
    """Title ``task``, the [0, 1] accuracy range and (given) the majority-class rate as a grey
    line labelled "chance"."""
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls="--", label="chance")
    ax.set(xlabel="edits", ylabel="accuracy", title=task, ylim=(-0.02, 1.02))


def run_label(settings: Mapping[str, Any]) -> str:
    """"MODEL, layer L[, start token id B]" of a journal's settings, for titles."""
    bos = f", start token id {settings['bos']}" if settings.get("bos") is not None else ""
    return f"{Path(settings['model']).name}, layer {settings['layer']}{bos}"


def fmt(value: Any, spec: str = ".3g") -> str:
    """A table cell: numbers with ``spec``, None as "-", anything else as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return str(value)
    return format(value, spec)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                   spec: str = ".3g") -> str:
    """A GitHub Markdown table; numbers formatted with ``spec``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v, spec) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def stats(values: Sequence[float]) -> dict:
    """n, mean, median, min, max of the finite ``values`` (NaN when there are none), and how
    many were not finite."""
    arr = np.asarray([float(v) for v in values], dtype=float)
    finite = arr[np.isfinite(arr)]
    pick = (lambda f: float(f(finite))) if finite.size else (lambda f: math.nan)
    return {"n": int(arr.size), "mean": pick(np.mean), "median": pick(np.median),
            "min": pick(np.min), "max": pick(np.max), "not_finite": int(arr.size - finite.size)}


def grouped(rows: Sequence[Mapping], group: Callable[[Mapping], str | None]
            ) -> dict[str, list[Mapping]]:
    """Rows by ``group(row)`` (None drops the row), groups in first-seen order."""
    out: dict[str, list[Mapping]] = {}
    for row in rows:
        name = group(row)
        if name is not None:
            out.setdefault(name, []).append(row)
    return out
