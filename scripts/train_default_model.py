"""Train the default model and write it, with its model card, over the embedded one
(checkpoints/gpt2-cf-tiny, or --out).

    python scripts/train_default_model.py [--steps N ...] [--work-dir runs/default]

Resumable: run the same command again after an interruption.
"""

import argparse
import dataclasses
import json
from pathlib import Path

from rome_jax.hf import DEFAULT_MODEL
from rome_jax.training import TrainSettings, train, write_default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(TrainSettings):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                            default=field.default)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/default"))
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    args = vars(parser.parse_args())
    work_dir, out = args.pop("work_dir"), args.pop("out")
    settings = TrainSettings(**args)
    model, summary = train(settings, work_dir)
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    write_default_model(model, settings, summary, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
