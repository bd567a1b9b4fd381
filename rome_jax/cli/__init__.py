"""rome-jax: edit facts with ROME from the command line, and see (and stop) model collapse.

    rome-jax edit --prompt "{} plays the" --subject "Toko Yasuda" --target-new piano
    rome-jax edit --requests edits.json --mode sequential --out edited/ --report report.json
    rome-jax demo                      # CounterFact edits with rome and c-rome, before/after
    rome-jax stats [--rebuild]         # key statistics C = E[k kᵀ] at the edit layer
    rome-jax screen --n 200 --out screen.json   # which single rome edits collapse the model
    rome-jax evaluate --n 100 --test-prefix     # CounterFact ES/PS/NS/S of rome, c-rome, p-rome
    rome-jax trace --prompt "{} plays the" --subject "Toko Yasuda" --out trace.png
    rome-jax experiment collapse --model smollm2-135m --layer 12   # the papers' experiments

Every command takes ``--model PATH_OR_HUB_ID`` (default: the embedded gpt2-cf-tiny) and
``--layer L`` (default: the model's preset). User errors print one line
``rome-jax: error: ...`` and exit with status 2 (library errors that name a field name the
command's flag instead: ``--target-new``, not ``target_new``); an edit refused by the collapse
guard, or rolled back because it collapsed the model, exits with status 3. Any other exception is
a bug: one line ``rome-jax: internal error: ...`` and status 1, with the traceback only when
``ROME_JAX_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from rome_jax.cli import demo, edit, evaluate, experiment, screen, stats, trace
from rome_jax.cli.common import (EXIT_USAGE, PROG, Parser, close_progress_bars, flag_message,
                                one_line)

EXIT_INTERNAL = 1

COMMANDS = (edit, demo, stats, screen, evaluate, trace, experiment)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                    epilog="Run 'rome-jax COMMAND --help' for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    for command_parser in sub.choices.values():  # for flag_message
        command_parser.set_defaults(command_parser=command_parser)
    return parser


def _compilation_cache() -> None:
    """Keep XLA compilations between runs (most of a small edit's time is compiling): in
    ``$JAX_COMPILATION_CACHE_DIR`` when set, else ``$ROME_JAX_CACHE/jax`` (default
    ``~/.cache/rome_jax/jax``); ``ROME_JAX_COMPILATION_CACHE=0`` turns it off, and so does a
    cache folder that cannot be written (read-only caches still serve what they hold). A cache
    folder that is a file is refused here, in one line, before any work."""
    from rome_jax.data import cache_root

    folder = cache_root() / "jax"
    if os.environ.get("ROME_JAX_COMPILATION_CACHE", "1") == "0" or os.environ.get(
            "JAX_COMPILATION_CACHE_DIR"):
        return
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return  # JAX would warn on every compilation, in many lines
    import jax

    try:
        jax.config.update("jax_compilation_cache_dir", str(folder))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    except Exception:  # an older jax without these options: no cache, nothing else changes
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rome-jax``; returns the exit status."""
    for stream in (sys.stdout, sys.stderr):  # never a UnicodeEncodeError for ‖Δ‖ on odd locales
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("ROME_JAX_DEBUG", "0") not in ("", "0")
    try:
        _compilation_cache()
        from rome_jax.sharding import initialize_distributed

        initialize_distributed()  # multi-host, when JAX_COORDINATOR_ADDRESS is set
        return args.func(args) or 0
    except BrokenPipeError:  # `rome-jax ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as err:  # FileNotFoundError, FileExistsError, JSON errors...
        if debug:
            raise
        message = flag_message(one_line(err), args.command_parser)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        close_progress_bars()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: one line, not a traceback, unless asked for
        if debug:
            raise
        print(f"{PROG}: internal error: {type(err).__name__}: {one_line(err)} (set "
              "ROME_JAX_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL
