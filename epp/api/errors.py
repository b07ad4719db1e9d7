"""The base of every error a user can fix (a flag, a config or endpoints file, a kubeconfig,
a render input): the CLI prints it as one line on stderr and exits 2, without a traceback."""

from __future__ import annotations

from pydantic import ValidationError


class UserError(ValueError):
    """Bad user input; `str(e)` is the whole message."""


def one_line(e: BaseException) -> str:
    """The message on one line (YAML and pydantic errors span several)."""
    return " ".join(str(e).split())


def validation_message(e: ValidationError, limit: int = 3) -> str:
    """A pydantic error as `loc: msg; loc: msg` (the first `limit` problems)."""
    parts = []
    for err in e.errors()[:limit]:
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
