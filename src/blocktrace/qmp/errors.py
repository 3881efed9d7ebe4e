"""QMP error classes and QEMU 7.2's exact error sentences.

A QMP error reply is ``{"error": {"class": CLASS, "desc": DESC}, "id": ID}``.  Scripts written
for QEMU match on the class and sometimes on the sentence, so both are copied verbatim from
QEMU 7.2 (``qapi/qmp-dispatch.c``, ``qapi/qobject-input-visitor.c``, ``monitor/qmp.c``,
``qobject/json-streamer.c``; checked against the Debian build).  Every sentence the server can
send is built by a function here, so the wording lives in one place.
"""

from __future__ import annotations

from enum import StrEnum

from blocktrace.errors import BlocktraceError


class ErrorClass(StrEnum):
    """``QapiErrorClass`` from ``qapi/error.json``."""

    GenericError = "GenericError"
    CommandNotFound = "CommandNotFound"
    DeviceNotActive = "DeviceNotActive"
    DeviceNotFound = "DeviceNotFound"
    KVMMissingCap = "KVMMissingCap"


class QMPError(BlocktraceError):
    """A command failed; becomes ``{"error": {"class": ..., "desc": ...}}`` on the wire."""

    def __init__(self, desc: str, error_class: ErrorClass = ErrorClass.GenericError) -> None:
        self.desc = desc
        self.error_class = error_class
        super().__init__(desc)

    def to_wire(self) -> dict[str, str]:
        return {"class": self.error_class.value, "desc": self.desc}


def generic(desc: str) -> QMPError:
    return QMPError(desc, ErrorClass.GenericError)


# --- parser (qobject/json-streamer.c, json-parser.c); these replies carry no id ---------------


def json_parse_error(message: str) -> str:
    return f"JSON parse error, {message}"


def json_stray(char: str) -> str:
    return f"JSON parse error, stray '{char}'"


TOKEN_SIZE_LIMIT = "JSON token size limit exceeded"
NESTING_LIMIT = "JSON nesting depth limit exceeded"

# --- envelope (qapi/qmp-dispatch.c qmp_dispatch_check_obj) ------------------------------------

NOT_AN_OBJECT = "QMP input must be a JSON object"


def member_unexpected(key: str) -> QMPError:
    return generic(f"QMP input member '{key}' is unexpected")


def member_must_be(key: str, what: str) -> QMPError:
    return generic(f"QMP input member '{key}' must be {what}")


def lacks_member(key: str) -> QMPError:
    return generic(f"QMP input lacks member '{key}'")


# --- negotiation (monitor/qmp.c) --------------------------------------------------------------


def expecting_negotiation() -> QMPError:
    return QMPError(
        "Expecting capabilities negotiation with 'qmp_capabilities'", ErrorClass.CommandNotFound
    )


def negotiation_complete() -> QMPError:
    return QMPError(
        "Capabilities negotiation is already complete, command ignored",
        ErrorClass.CommandNotFound,
    )


def command_not_found(name: str) -> QMPError:
    return QMPError(f"The command {name} has not been found", ErrorClass.CommandNotFound)


# --- argument visitor (qapi/qobject-input-visitor.c) ------------------------------------------


def parameter_missing(name: str) -> QMPError:
    return generic(f"Parameter '{name}' is missing")


def parameter_unexpected(name: str) -> QMPError:
    return generic(f"Parameter '{name}' is unexpected")


def invalid_parameter_type(name: str, expected: str) -> QMPError:
    return generic(f"Invalid parameter type for '{name}', expected: {expected}")


def invalid_parameter_value(name: str, expected: str) -> QMPError:
    return generic(f"Parameter '{name}' expects {expected}")


def enum_value_refused(name: str, value: str) -> QMPError:
    return generic(f"Parameter '{name}' does not accept value '{value}'")


# --- block layer (block.c, blockjob.c, block/export/export.c) ---------------------------------


def job_not_found(job_id: str) -> QMPError:
    return QMPError(f"Block job '{job_id}' not found", ErrorClass.DeviceNotActive)


def job_id_in_use(job_id: str) -> QMPError:
    return generic(f"Job ID '{job_id}' already in use")


def device_not_found(name: str) -> QMPError:
    return generic(f"Cannot find device='{name}' nor node-name='{name}'")


def export_not_found(name: str) -> QMPError:
    return generic(f"Export '{name}' is not found")


def export_id_in_use(name: str) -> QMPError:
    return generic(f"Block export id '{name}' is already in use")
