"""The ``sftmix`` command line: ``sftmix <command> [--config cfg.yaml] [--field value ...]``.

Each command maps its flags and YAML keys 1:1 onto config dataclasses (`sftmix.sftmix_config`, plus
``trl.ModelConfig`` and every ``trl.SFTConfig`` / ``TrainingArguments`` field), as ``trl sft --config`` does:
the YAML file sets defaults, command-line flags override them. An unknown name is an error that suggests the
closest valid one. User errors print one line and exit with code 2; nothing is written before the inputs are
checked. SIGTERM/SIGINT print one line and exit with 128 + the signal's number, leaving a resume point.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import SFTMixError
from ..io_utils import stop_cleanly_on_full_disk
from ..preemption import StoppedBySignal, raise_on_signal
from ..run_lock import output_dir_lock

logger = logging.getLogger("sftmix")

COMMANDS = {
    "dynamics": "Stages 1-2: train a reference model with NTP, score C checkpoints, split by confidence.",
    "train": "Stage 3: Mixup-regularised SFT of the target model (stage 1 first when no dynamics_path is given).",
    "run": "Stages 1 to 3 in one go (one output_dir: dynamics, final model, logs).",
    "eval": "Evaluate models: medical multiple choice, IFEval, perplexity, MT-Bench/AlpacaEval (judged).",
    "datamap": "Draw the data map (confidence vs variability) of a dynamics.jsonl.",
    "demo": "The whole pipeline on the built-in default model and demo data, offline.",
}


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one-line `SFTMixError`s instead of usage dumps."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SFTMixError(message)


def _dataclasses_for(command: str) -> list[type]:
    from trl import ModelConfig

    from ..sftmix_config import DataArguments, EvalArguments, SFTMixConfig

    return {
        "dynamics": [DataArguments, ModelConfig, SFTMixConfig],
        "train": [DataArguments, ModelConfig, SFTMixConfig],
        "run": [DataArguments, ModelConfig, SFTMixConfig],
        "demo": [DataArguments, ModelConfig, SFTMixConfig],
        "eval": [EvalArguments],
    }[command]


def _unknown(name: str, valid: Sequence[str], where: str) -> SFTMixError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return SFTMixError(f"{where}unknown option '{name}'{hint}")


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise SFTMixError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f": line {mark.line + 1}" if mark else ""
        raise SFTMixError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from e
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise SFTMixError(f"{path}: the config must be a YAML mapping of option: value")
    return config


def parse_config(command: str, argv: Sequence[str], defaults: dict[str, Any] | None = None) -> list[Any]:
    """Parse ``--config FILE.yaml`` and ``--name value`` overrides into the command's dataclasses.

    Precedence: command-line flags > YAML file > ``defaults`` (the demo's) > dataclass defaults.
    """
    from transformers import HfArgumentParser

    types = _dataclasses_for(command)
    valid = sorted({f.name for t in types for f in dataclasses.fields(t) if f.init})
    pre = _Parser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    values = dict(defaults or {})
    if command != "eval":
        from ..sftmix_config import DEFAULT_MODEL

        values.setdefault("model_name_or_path", DEFAULT_MODEL)
        # TensorBoard logs in <output_dir>/runs unless the user says otherwise
        values.setdefault("report_to", ["tensorboard"])
    if known.config:
        config = _load_yaml(known.config)
        for key in config:
            if key not in valid:
                raise _unknown(key, valid, f"{known.config}: ")
        values.update(config)

    parser = HfArgumentParser(types, prog=f"sftmix {command}")
    parser.error = _Parser.error.__get__(parser)  # one-line errors
    parser.set_defaults(**values)
    # YAML values of required fields count as given
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    for token in rest:
        if token.startswith("--") and token[2:].split("=")[0] not in valid + ["help"]:
            raise _unknown(token[2:].split("=")[0], valid, "")
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(
            args=list(rest), return_remaining_strings=True
        )
    except (ValueError, TypeError) as e:
        raise SFTMixError(str(e).strip().splitlines()[0]) from e
    if remaining:
        raise SFTMixError(f"unexpected argument '{remaining[0]}' (options are --name value)")
    return parsed


def _setup_logging() -> None:
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.logging.set_verbosity_warning()


def _cmd_dynamics(argv: Sequence[str]) -> None:
    data_args, model_args, training_args = parse_config("dynamics", argv)
    from .dynamics import run_dynamics

    with output_dir_lock(training_args.output_dir), stop_cleanly_on_full_disk(training_args.output_dir):
        run_dynamics(model_args, data_args, training_args)


def _cmd_train(argv: Sequence[str]) -> None:
    data_args, model_args, training_args = parse_config("train", argv)
    from .pipeline import train

    with output_dir_lock(training_args.output_dir), stop_cleanly_on_full_disk(training_args.output_dir):
        train(model_args, data_args, training_args)


def _cmd_run(argv: Sequence[str]) -> None:
    data_args, model_args, training_args = parse_config("run", argv)
    from .pipeline import run_pipeline

    with output_dir_lock(training_args.output_dir), stop_cleanly_on_full_disk(training_args.output_dir):
        run_pipeline(model_args, data_args, training_args)


def _cmd_demo(argv: Sequence[str]) -> None:
    from pathlib import Path

    from .demo import demo_defaults, write_demo_data

    data_args, model_args, training_args = parse_config("demo", argv, demo_defaults())
    from .pipeline import run_pipeline

    with output_dir_lock(training_args.output_dir), stop_cleanly_on_full_disk(training_args.output_dir):
        if data_args.dataset_name is None:  # the generated demo data, unless the user gave a dataset
            data_args.dataset_name = str(write_demo_data(Path(training_args.output_dir) / "demo_data.jsonl"))
        run_pipeline(model_args, data_args, training_args)


def _dry_run(command: str, argv: Sequence[str]) -> None:
    """``--dry_run``: validate the config and print the resolved settings, the stages and their cost."""
    import json

    data_args, model_args, training_args = parse_config(command, argv)
    from .plan import plan

    print(json.dumps(plan(command, model_args, data_args, training_args), indent=1, default=str))


def _cmd_eval(argv: Sequence[str]) -> None:
    (eval_args,) = parse_config("eval", argv)
    from ..evaluation import run_eval

    run_eval(eval_args)


def _cmd_datamap(argv: Sequence[str]) -> None:
    parser = _Parser(prog="sftmix datamap", description=COMMANDS["datamap"])
    parser.add_argument("dynamics_path", help="A dynamics.jsonl written by `sftmix dynamics`.")
    parser.add_argument("--output", required=True, help="The picture to write (.png, .pdf, .svg).")
    parser.add_argument("--title", default=None, help="Title of the picture.")
    args = parser.parse_args(argv)
    from ..stage1.datamap import draw_datamap

    print(draw_datamap(args.dynamics_path, args.output, title=args.title))


HANDLERS: dict[str, Callable[[Sequence[str]], None]] = {
    "dynamics": _cmd_dynamics,
    "train": _cmd_train,
    "run": _cmd_run,
    "eval": _cmd_eval,
    "datamap": _cmd_datamap,
    "demo": _cmd_demo,
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftmix",
        description="SFTMix: Mixup-regularised instruction tuning on Hugging Face TRL.",
        epilog="Every command takes --config FILE.yaml plus --name value overrides; "
        "`sftmix <command> --help` lists its options. run, train and dynamics take --dry_run: check the config "
        "and print the plan without loading weights or data.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _say(line: str) -> None:
    """One line to stderr in one write: `print` writes the text and the newline apart, so the lines of the ranks
    that share a launcher's stderr could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        close = difflib.get_close_matches(command, list(HANDLERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        _say(f"sftmix: error: unknown command '{command}'{hint}")
        return 2
    if command != "datamap" and any(a in ("-h", "--help") for a in rest):
        from transformers import HfArgumentParser

        HfArgumentParser(_dataclasses_for(command), prog=f"sftmix {command}").print_help()
        return 0
    _setup_logging()
    dry_run = command in ("run", "train", "dynamics") and "--dry_run" in rest
    try:
        with raise_on_signal():  # training itself stops at a step's end instead (`sftmix.preemption`)
            if dry_run:
                _dry_run(command, [a for a in rest if a != "--dry_run"])
            else:
                HANDLERS[command](rest)
    except SFTMixError as e:
        _say(f"sftmix: error: {e}")
        return 2
    except StoppedBySignal as e:
        _say(f"sftmix: {e}")
        return e.exit_code
    except KeyboardInterrupt:  # a SIGINT the handlers did not see (outside the main thread's Python code)
        _say("sftmix: interrupted; run the same command again to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
