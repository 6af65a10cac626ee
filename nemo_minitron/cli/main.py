"""`minitron <stage> key=value ...`: one console script, one Hydra app per stage over conf/<stage>.yaml,
whose composed config `compose.typed` turns into the stage's config class for its function
(`cli/commands.py`, the table of commands)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import sys
from typing import Any, Callable

from nemo_minitron.cli.compose import conf_dir, stage_config_name, store_defaults, typed
from nemo_minitron.cli.commands import STAGES
from nemo_minitron.errors import EXIT_DIVERGED, EXIT_KEYBOARD_INTERRUPT, EXIT_USER_ERROR, TrainingDiverged, UserError

log = logging.getLogger("nemo_minitron")


def _usage() -> str:
    lines = ["usage: minitron <stage> [recipe=NAME] [key=value ...] [--cfg job] [--help]", "", "stages:"]
    lines += [f"  {name:<10} {stage.help}" for name, stage in STAGES.items()]
    lines += ["", "recipe=NAME: the stage's settings from conf/recipes/NAME.yaml (key=value arguments win).",
              "Run under torchrun / srun for parallelism (tp=, pp= keys); MINITRON_DEBUG=1 shows tracebacks."]
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Hydra configures the log format (conf/_base.yaml); only rank 0 logs progress."""
    from nemo_minitron import parallel

    if parallel.launch_rank() != 0:
        logging.getLogger().setLevel(logging.WARNING)
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not any(importlib.util.find_spec(name) for name in ("transformer_engine", "apex")):
        # megatron-core's own warning, once per module it imports, is silenced (`main`, the package)
        log.info("Transformer Engine and Apex are not installed: megatron-core runs its local implementations "
                 "(expected on CPU)")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: reported as one line, not a traceback. Anything else is a
    bug and keeps its traceback."""
    from omegaconf.errors import MissingMandatoryValue

    return (UserError, FileNotFoundError, NotADirectoryError, MissingMandatoryValue)


def _print_user_error(err: BaseException) -> None:
    """Bad input as one `error: ...` line on stderr; MINITRON_DEBUG=1 re-raises it for the traceback."""
    if os.environ.get("MINITRON_DEBUG"):
        raise err
    print(f"error: {_format_error(err)}", file=sys.stderr)


def _format_error(err: BaseException) -> str:
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(err, MissingMandatoryValue):
        return f"missing required key: set {err.full_key}=..."
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def run_stage(stage_fn: Callable[[Any], dict | None], cfg) -> None:
    """Run a stage command; print its result as JSON on the last stdout line (rank 0). Exit codes:
    0 done, 2 bad input, 3 training diverged, 75 stopped at a pre-emption checkpoint (re-run), 130
    stopped by Ctrl-C (at a checkpoint where training was running; re-run to resume)."""
    from nemo_minitron import parallel

    _quiet_libraries()
    try:
        result = stage_fn(cfg)
    except (*user_errors(), TrainingDiverged) as err:
        _print_user_error(err)
        parallel.destroy()
        sys.exit(EXIT_DIVERGED if isinstance(err, TrainingDiverged) else EXIT_USER_ERROR)
    except KeyboardInterrupt:
        if os.environ.get("MINITRON_DEBUG"):
            raise
        print("error: interrupted by Ctrl-C; nothing was published after the last checkpoint (outputs are "
              "written aside and renamed when complete): run the command again to resume", file=sys.stderr)
        sys.exit(EXIT_KEYBOARD_INTERRUPT)
    parallel.destroy()
    if result is not None and parallel.launch_rank() == 0:
        print(json.dumps(result, default=str), flush=True)
    if isinstance(result, dict) and result.get("interrupted"):
        from nemo_minitron.train import signals

        sys.exit(signals.exit_code())


def _config_options_first(args: list[str]) -> list[str]:
    """Hydra's parser takes key=value overrides only on one side of --config-name (-cn) and
    --config-dir (-cd); the launchers put tp=/pp= first. Move those options (with their values) to
    the front so any order works."""
    front, rest = [], []
    i = 0
    while i < len(args):
        if args[i] in ("--config-name", "-cn", "--config-dir", "-cd") and i + 1 < len(args):
            front += args[i:i + 2]
            i += 2
            continue
        (front if args[i].startswith(("--config-name=", "--config-dir=")) else rest).append(args[i])
        i += 1
    return front + rest


def _appends_as_overrides(args: list[str]) -> list[str]:
    """`+key=value` as `++key=value`: every key of a stage is in its composed config, so Hydra's
    append would refuse one that is there; commands written when block keys needed the `+` (the
    pipeline's stage blocks listed only some keys) keep working."""
    return [f"+{arg}" if arg.startswith("+") and not arg.startswith("++") else arg for arg in args]


def _check_overrides(overrides: list[str]) -> None:
    """Each key=value parsed as Hydra will, so a value its grammar cannot take (a path with spaces or
    non-ASCII letters, unquoted) is one error line saying how to quote it, not Hydra's lexer report."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:  # Hydra's own options and their values (--cfg job)
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException:
            key, _, value = arg.partition("=")
            raise UserError(f"cannot parse {arg!r}: quote a value with spaces, non-ASCII letters or other special "
                            f"characters, e.g. {key}=\"{value}\" (in a shell: '{key}=\"{value}\"')") from None


def main(argv: list[str] | None = None) -> None:
    import warnings

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    stage, overrides = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: unknown stage {stage!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    # megatron and torch.distributed.checkpoint warn about missing TE/apex (expected on CPU) and
    # their own deprecations; none of it is actionable for a user of this tool.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex|cuda_graph_scope).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import hydra

    entry = STAGES[stage]
    module = importlib.import_module(entry.module)
    config_class, stage_fn = getattr(module, entry.config), getattr(module, entry.function)
    try:
        config_dir = conf_dir()
        store_defaults(stage)
        config_name, overrides = stage_config_name(stage, _appends_as_overrides(overrides))
        _check_overrides(_config_options_first(overrides))
    except user_errors() as err:
        _print_user_error(err)
        sys.exit(EXIT_USER_ERROR)
    sys.argv = [f"minitron {stage}", *_config_options_first(overrides)]
    app = hydra.main(config_path=str(config_dir), config_name=config_name, version_base="1.3")(
        lambda cfg: run_stage(lambda composed: stage_fn(typed(config_class, composed)), cfg)
    )
    app()


if __name__ == "__main__":
    main()
