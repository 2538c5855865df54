"""How library errors read on the command line."""

from __future__ import annotations

#: Hints in library errors are written for the Python API; the CLI says them with its own flags.
CLI_WORDING = {"fallback=True": "--fallback", "select='largest'": "--select largest", "mode='add'": "--add"}


def cli_wording(message: str) -> str:
    """A library error message with its API hints turned into command-line options."""
    for api, flag in CLI_WORDING.items():
        message = message.replace(api, flag)
    return message

#: What ``--db`` accepts, for every command that takes one.
DB_HELP = ("A gallery is a file path (SQLite, the default; also sqlite:///PATH), postgresql://USER@HOST/DB "
           "(PostgreSQL with pgvector; the password from PGPASSWORD or ~/.pgpass), milvus://HOST:PORT[/COLLECTION] "
           "(a Milvus server) or milvus-lite:///PATH (a local Milvus Lite file).")
