"""Entry point: discovers subcommand modules in this package and dispatches to them.

Each module in ``fromface.cli`` (other than this one) defines ``register(subparsers)``, which adds
its parser and sets ``func`` to a callable taking the parsed arguments and returning an exit code.
Modules import the library (OpenCV, torch, onnxruntime behind it) inside their ``func`` so ``fromface --help``
stays fast; errors, data helpers and the ``cli._*`` helpers are light and imported at the top.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import fromface.cli as cli_package
from fromface import __version__
from fromface.cli._messages import cli_wording
from fromface.errors import FromfaceError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fromface",
        description="Occlusion-robust face recognition (FROM): detect, align, embed, verify, evaluate, train.",
    )
    parser.add_argument("--version", action="version", version=f"fromface {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(cli_package.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "main":
            continue
        module = importlib.import_module(f"fromface.cli.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (`train CONFIG --print-config a.b=1`), which argparse's
    # positional list does not take; a command says where they go with set_defaults(extra_overrides="field").
    field = getattr(args, "extra_overrides", None)
    if extra and field and all("=" in e and not e.startswith("-") for e in extra):
        getattr(args, field).extend(extra)
    elif extra:
        parser.parse_args(argv)  # argparse's own message and exit status for what it does not know
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FromfaceError as exc:
        print(f"fromface {args.command}: error: {cli_wording(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fromface verify ... | head -1`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
