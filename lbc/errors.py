"""The errors lbc reports to a user. Each carries a message a user can act on
and the process exit code; library exceptions are translated into these at the
module that calls the library."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lbc.config.diagnostics import Diagnostic


class LbcError(Exception):
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigInvalid(LbcError):
    """The configuration has errors: all of them, located, sorted by position."""

    def __init__(self, diagnostics: tuple[Diagnostic, ...]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(str(d) for d in diagnostics))


class StateError(LbcError):
    """The state directory cannot be read or written as needed."""


class LockTimeout(StateError):
    """Another lbc command holds the state lock for longer than we may wait."""


class UnknownVersion(StateError):
    """A table version named by the user is not in the state directory."""


class StalePlan(LbcError):
    """A saved plan was made against a table that is no longer live."""


class Rejected(LbcError):
    """An imperative change (the admin API) that cannot be made as asked;
    `status` is the HTTP status the API answers with."""

    status = 400


class NotFound(Rejected):
    status = 404


class Conflict(Rejected):
    status = 409


class FileMismatch(Conflict):
    """A file a table names by digest is not, on this machine, the file it
    was compiled with."""
