"""The command line of ``python -m arpo_fast.train``.

Every ``TrainConfig`` field is a flag (``flags.py``), shown by ``--help`` in sections with its
default, its choices and the same setting's name in the reference's verl scripts. Settings come
from, each over the one before: the defaults; a resumed run's own config.yaml (``--out DIR
--resume true``); a YAML file (``--config FILE``); the flags given. A bad value exits with one
line naming the flag (or the file and the setting), without the usage.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from typing import Any, Optional

from arpo_fast.train import run_config
from arpo_fast.train.checkpoint import CheckpointError
from arpo_fast.train.config import TrainConfig
from arpo_fast.train.flags import CHOICES, JSON_SETTINGS, SECTIONS, Flag, all_flags, help_text

PROG = "python -m arpo_fast.train"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line: the usage would bury it
        self.exit(2, f"{PROG}: error: {message} ({PROG} --help lists the settings)\n")


def _type(flag: Flag):
    def convert(text: str) -> Any:
        try:
            return flag.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = flag.kind.__name__  # argparse names the type in its messages
    return convert


def _metavar(flag: Flag) -> str:
    if flag.name in CHOICES:
        return "{" + ",".join(CHOICES[flag.name]) + "}"
    if flag.kind is bool:
        return "{true,false}"
    return flag.name.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage="%(prog)s [--config FILE] [--SETTING VALUE ...]",
        description="Train a tool-using agent with ARPO. Without flags: the built-in demo.",
        epilog=(
            "Settings may also come from a YAML file of setting: value lines (--config FILE; a run's "
            "config.yaml is one); flags given override it. 'auto' marks a default that depends on the "
            "job. (verl: NAME) is the same setting in the reference's verl scripts. docs/training.md "
            "describes the data, rewards, tools and outputs."
        ),
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,  # only the flags given reach parse_config
    )
    flags = all_flags()
    names = {f.name for f in flags}
    sections = {title: parser.add_argument_group(title, about) for title, about in SECTIONS.items()}
    sections["output"].add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of settings (a run's config.yaml is one); flags given override it.",
    )
    for flag in flags:
        group = sections.get(flag.section) or parser
        # a true/false flag given alone means true (--plan-memory)
        alone: dict[str, Any] = {"nargs": "?", "const": True} if flag.kind is bool and not flag.auto else {}
        group.add_argument(
            flag.option,
            dest=flag.name,
            type=_type(flag),
            metavar=_metavar(flag),
            help=help_text(flag, names),
            **alone,
        )
    return parser


def _unknown_flag(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    options = [o for a in parser._actions for o in a.option_strings]
    for arg in extra:
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            close = difflib.get_close_matches(name, options, n=1)
            return f"{name}: no such flag" + (f" (did you mean {close[0]}?)" if close else "")
    return f"unexpected argument {extra[0]!r}"


def _flag_message(message: str, settings: dict) -> str:
    """A settings class's message names the field ("steps must be"): name the flag instead."""
    name, _, rest = message.partition(" ")
    if name in settings or name in {f.name for f in all_flags()}:
        return f"--{name.replace('_', '-')} {rest}"
    return message


def _resuming(settings: dict) -> bool:
    """Whether the run may continue one in ``--out`` (``--resume`` true, or auto: None)."""
    return settings.get("resume", False) is not False and bool(settings.get("out"))


def _same(name: str, a: Any, b: Any) -> bool:
    if name in JSON_SETTINGS:
        try:
            return json.loads(a or "{}") == json.loads(b or "{}")
        except ValueError:
            pass
    return a == b


def resume_line(out: str, source, saved: dict, overrides: dict, defaults: dict) -> str:
    """One line: the run being resumed and each setting that differs from its saved one."""
    flags = {f.name: f for f in all_flags()}
    changes = [
        f"{flags[n].option} {flags[n].show(saved.get(n, defaults[n]))} -> {flags[n].show(v)}"
        for n, v in overrides.items()
        if n not in run_config.NOT_SAVED and not _same(n, saved.get(n, defaults[n]), v)
    ]
    with_what = ", ".join(changes) if changes else "its own settings"
    return f"resuming {out} with {with_what} (from {source})"


def parse_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """The run's config from the command line (see the module's docstring); exits with one line on
    a bad flag, value or file."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(_unknown_flag(parser, extra))
    given = vars(args)
    settings: dict[str, Any] = {}
    saved = None
    try:
        path = given.pop("config", None)
        overrides = (run_config.read(path, f"--config {path}") if path else {}) | given
        settings = dict(overrides)
        saved = run_config.saved(settings["out"]) if _resuming(settings) else None
        if saved is not None:
            settings = saved[0] | overrides
        cfg = TrainConfig.from_flat(**settings)
    except (ValueError, CheckpointError) as exc:
        parser.error(_flag_message(str(exc), settings))
    if saved is not None and os.environ.get("RANK", "0") == "0":
        assert cfg.out is not None, "resume reads the run folder --out"
        defaults = {f.name: f.default for f in all_flags()}
        print(resume_line(cfg.out, saved[1], saved[0], overrides, defaults), flush=True)
    return cfg
