"""How the CLI answers: aligned tables for people, `--json` for scripts, one-line errors, stable exit codes.

Exit codes scripts can rely on:
  0 ok · 1 other failure · 2 bad usage or invalid argument · 3 not found · 4 already exists with other parameters ·
  5 not enough capacity · 6 busy, retry · 7 backend or command failure · 8 unsupported by the backend
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NoReturn

import typer

from localdisk import errors

EXIT_CODES: dict[type[errors.LocalDiskError], int] = {
    errors.InvalidArgument: 2,
    errors.ConfigError: 2,
    errors.OutOfRange: 2,
    errors.NotFound: 3,
    errors.AlreadyExists: 4,
    errors.InsufficientCapacity: 5,
    errors.Busy: 6,
    errors.BackendFailure: 7,
    errors.Unsupported: 8,
    errors.FailedPrecondition: 1,
}


def exit_code(error: errors.LocalDiskError) -> int:
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


def die(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def friendly_errors(debug: bool = False) -> Iterator[None]:
    """Domain errors become one line on stderr and their exit code; --debug keeps the traceback."""
    try:
        yield
    except errors.LocalDiskError as exc:
        if debug:
            raise
        die(exc.message, exit_code(exc))


def plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if hasattr(value, "id"):
            out = {"id": value.id, **out}
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def emit_json(value: Any) -> None:
    json.dump(plain(value), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)
