"""The errors of the wire protocol: the `code` of an `Error` reply, and what
a message that cannot be accepted raises. Re-exported by `zygote.protocol`."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The `code` of an `Error` reply. On the wire a plain string: a client
    meets codes newer than it knows as strings, and says them as they are."""

    BAD_REQUEST = "bad_request"  # malformed: not msgpack, a field missing or wrong
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_KIND = "unknown_kind"
    TOO_LARGE = "too_large"
    BUSY = "busy"  # every worker slot taken and the queue full: try again later
    SPAWN_FAILED = "spawn_failed"  # no healthy worker could be made, or refused
    SHUTTING_DOWN = "shutting_down"
    UNKNOWN_HANDLE = "unknown_handle"  # no such job (or one long gone)
    REFORK_FAILED = "refork_failed"  # no candidate, or it was refused or failed
    NOT_ALLOWED = "not_allowed"  # the task is outside the server's allow-list
    INTERNAL = "internal"  # a bug in the server; it carries on


class ProtocolError(Exception):
    """A message that cannot be accepted. `code` goes into the `Error` reply."""

    code = ErrorCode.BAD_REQUEST


class MalformedMessage(ProtocolError):
    pass


class UnsupportedVersion(ProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION


class UnknownKind(ProtocolError):
    code = ErrorCode.UNKNOWN_KIND


class MessageTooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE
