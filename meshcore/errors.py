"""The meshlane error tree.

    MeshError                      root: every expected failure; carries an exit code
     ├── UsageError                (64) the command line was wrong
     ├── BadInputError             (65) a file or resource did not validate
     ├── NotFoundError             (66) a pod, netns or file named by the user is absent
     ├── UnavailableError          (69) an agent, socket or listener could not be reached
     ├── NeedsRootError            (77) the operation needs root / CAP_NET_ADMIN+CAP_BPF
     ├── PermissionDeniedError     (77) the caller did not prove it may (a bad, used or
     │                                  expired bootstrap token, a node token that does not match)
     └── ConfigError               (78) the machine is not set up (bpffs, headers, cgroup2)

Messages say what was wrong, where, and what to check next.  The CLI prints
`meshlane: <message>` on one line and exits with `exit_code`; it never shows a traceback
for a MeshError.
"""
from __future__ import annotations

from meshcore import constants as C


class MeshError(Exception):
    exit_code = C.EX_FAILURE

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(MeshError):
    exit_code = C.EX_USAGE


class BadInputError(MeshError):
    exit_code = C.EX_DATAERR


class NotFoundError(MeshError):
    exit_code = C.EX_NOINPUT


class UnavailableError(MeshError):
    exit_code = C.EX_UNAVAILABLE


class NeedsRootError(MeshError):
    exit_code = C.EX_NOPERM


class PermissionDeniedError(MeshError):
    exit_code = C.EX_NOPERM


class ConfigError(MeshError):
    exit_code = C.EX_CONFIG
