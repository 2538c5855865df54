"""How library errors read on the command line."""

from __future__ import annotations

#: Hints in library errors are written for the Python API; the CLI says them with its own flags.
CLI_WORDING = {"fallback=True": "--fallback", "select='largest'": "--select largest", "mode='add'": "--add"}


def cli_wording(message: str) -> str:
    """A library error message with its API hints turned into command-line options."""
    for api, flag in CLI_WORDING.items():
        message = message.replace(api, flag)
    return message
