"""``rome-jax experiment NAME``: one of the papers' experiments, resumable.

Results go to ``--out DIR`` (default ``experiments/MODEL/NAME-lLAYER[-bos]``): ``rows.jsonl``
(one line per finished record; a rerun with the same settings skips them), ``summary.json``,
``table.md`` and ``figure.png``, rewritten from all rows at the end of every run.
"""

from __future__ import annotations

from pathlib import Path

from rome_jax.cli.common import (PROG, Setup, add_model_args, check_inputs_apart, check_output,
                                log, positive_int)


def add_parser(sub) -> None:
    from rome_jax.experiments import EXPERIMENTS

    p = sub.add_parser("experiment", help="run one of the papers' experiments (resumable)",
                       description=__doc__.split("\n\n")[0] + " "
                       + " ".join(__doc__.split("\n\n")[1].split()))
    names = p.add_subparsers(dest="experiment", metavar="NAME", required=True,
                             parser_class=type(p))
    for name, module in EXPERIMENTS.items():
        q = names.add_parser(name, help=module.HELP, description=module.__doc__.split("\n\n")[0])
        module.add_args(q)
        q.add_argument("--out", metavar="DIR",
                       help="results folder (default experiments/MODEL/NAME-lLAYER[-bos])")
        q.add_argument("--overwrite", action="store_true",
                       help="start over: discard the rows of an earlier run in --out")
        q.add_argument("--report-only", action="store_true",
                       help="compute nothing: rewrite summary, table and figure from the rows "
                            "(while a run writes them, from its rows so far)")
        q.add_argument("--batch", type=positive_int, metavar="B",
                       help="records whose keys and v* are solved together, as one program "
                            "split over the --mesh's data axis (default: its size, the device "
                            "count without --mesh; rows agree to float32 rounding whatever B)")
        add_model_args(q)
        q.set_defaults(func=run, experiment_module=module)
    p.set_defaults(experiment_parsers=names.choices)


def model_slug(model_arg: str | None, model) -> str:
    """A folder name for the model: the alias or folder/file name given, else the model's."""
    return Path(str(model_arg or model.name)).name.removesuffix(".gguf") or "model"


def default_out(args, s: Setup) -> Path:
    bos = "-bos" if s.model.tokenizer.bos_id is not None and args.experiment != "bos" else ""
    return (Path("experiments") / model_slug(args.model, s.model)
            / f"{args.experiment}-l{s.hparams.layer}{bos}")


def run(args) -> int:
    from rome_jax.experiments.journal import Journal
    from rome_jax.experiments.report import write_report
    from rome_jax.sharding import parse_mesh

    import jax

    module = args.experiment_module
    args.command_parser = args.experiment_parsers[args.experiment]  # errors name its flags
    if args.report_only and args.overwrite:
        raise ValueError("--report-only: cannot be combined with --overwrite")
    if args.out:
        check_outputs(Path(args.out), args)
    args.batch = args.batch or parse_mesh(args.mesh, len(jax.devices()))["data"]
    s = Setup(args)
    out = Path(args.out) if args.out else check_outputs(default_out(args, s), args)
    settings = s.result_settings(seed=getattr(args, "seed", 0), **module.settings(args))
    if args.report_only and not (out / "rows.jsonl").exists():
        raise FileNotFoundError(f"--report-only: {out / 'rows.jsonl'} does not exist")
    with Journal(out / "rows.jsonl", module.NAME, settings, overwrite=args.overwrite,
                 check_row=module.check_row, read_only=args.report_only) as journal:
        if journal.rows and not args.report_only:
            log(f"{PROG}: resuming {out}: {len(journal.rows)} rows done")
        if journal.being_written:
            log(f"{PROG}: {out}: a run is writing it; reporting its {len(journal.rows)} rows "
                "so far")
        header = {"experiment": module.NAME, "settings": journal.settings, "out": str(out)}
        if not args.report_only:
            module.run(s, args, journal, header)
        report = module.report(header, journal.rows)
    paths = write_report(out, report)
    print(report.markdown.rstrip())
    print(f"\n{PROG} experiment {module.NAME}: {len(journal.rows)} rows in {out / 'rows.jsonl'}; "
          + ", ".join(str(p) for p in paths))
    return 0


def check_outputs(out: Path, args) -> Path:
    """Refuse now, before any work, an --out folder (and the files the run writes in it) that
    cannot be written, or that is, holds or lies inside an input."""
    from rome_jax.experiments.report import FILES

    check_output(out, "--out", overwrite=True, directory=True, replaced=False)
    for name in ("rows.jsonl", *FILES):
        check_output(out / name, "--out", overwrite=True)
    check_inputs_apart(out, "--out", args)
    return out
