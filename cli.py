"""Command lines from dataclass configs: one flag per field, spelled with dashes, with its help.

Every script of the project (`python train.py`, `python serve.py`, `python kernel_bench.py`, ...) keeps
its settings in one `@dataclass` per concern; `flag` declares a field with its help text and
`parse` turns the fields of one or more configs into an argparse command line:
    bool field         -> `--name` (store_true)
    list field         -> `--name VALUE`, repeatable
    Optional[...] field -> its `kind` is the parser type, default None
Demo: `python serve.py --help`.
"""
import argparse
from dataclasses import MISSING, field, fields
from typing import Optional, Sequence


def flag(default, help: str, kind=None):
    """A config field and its command-line help (kind: the parser type of an Optional field)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "type": kind or str})
    return field(default=default, metadata={"help": help, "type": kind or type(default)})


def add_flags(parser: argparse.ArgumentParser, config_cls):
    for f in fields(config_cls):
        name, help = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if f.default is MISSING and f.default_factory is not MISSING:      # a list: repeatable
            parser.add_argument(name, action="append", default=[], type=f.metadata["type"], help=help)
        elif isinstance(f.default, bool):
            parser.add_argument(name, action="store_true", help=help)
        else:
            shown = "" if f.default in (None, "") else f" (default {f.default})"
            parser.add_argument(name, type=f.metadata["type"], default=f.default, help=help + shown)


def parse(configs: Sequence[type], description: str, argv: Optional[list] = None,
          parser: Optional[argparse.ArgumentParser] = None) -> tuple:
    """One instance of each config class, filled from the command line (argv, or sys.argv)."""
    parser = parser or argparse.ArgumentParser(description=description)
    for cls in configs:
        add_flags(parser, cls)
    args = vars(parser.parse_args(argv))
    return tuple(cls(**{f.name: args[f.name] for f in fields(cls)}) for cls in configs)
