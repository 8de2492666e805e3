"""Every error fedtrain raises on purpose, in one hierarchy (as httpx's): each names what
is wrong and, where there is one, what to do about it.

Each class carries the gRPC status code it crosses the wire with and the exit code the
CLI ends with. A servicer sends one with :func:`abort`: the code, the message, and the
class's name in the ``fedtrain-error`` trailing metadata. :func:`from_rpc` turns the
``grpc.RpcError`` the other side receives back into that class (or, from a peer that did
not name one, into the class of its status code), so callers catch classes and never
search an error's text.
"""

from __future__ import annotations

import grpc

# Trailing metadata key that names the error class of an aborted call.
ERROR_KEY = "fedtrain-error"


class FedtrainError(Exception):
    """Base class of every error fedtrain raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    exit_code: int = 2


# --- what the user gave -------------------------------------------------------
class SpecError(FedtrainError, ValueError):
    """A job spec or policy file is malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DataSourceError(SpecError):
    """A node's database cannot be read: no connection, a failing query, a missing column.
    Like any unreadable data, it stays in the node's own log."""


class BaseModelMismatch(FedtrainError):
    """A transformer base model on disk is not the one the job names."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class TLSError(FedtrainError):
    """A certificate, key or CA is missing, malformed or does not fit its role."""

    code = grpc.StatusCode.UNAUTHENTICATED
    exit_code = 3


# --- what the other side sent -------------------------------------------------
class WireError(FedtrainError, ValueError):
    """A message from the other side is malformed (shape, dtype, size, NaN...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ProtocolMismatch(FedtrainError):
    """The two sides speak different protocol versions."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(FedtrainError):
    """The caller may not do this: a revoked certificate, the wrong role, an unenrolled node."""

    code = grpc.StatusCode.PERMISSION_DENIED
    exit_code = 3


class EnrollmentError(PermissionDenied):
    """A node cannot enroll: its join token is unknown, spent or expired."""


class NotFound(FedtrainError):
    """No such job, task or checkpoint."""

    code = grpc.StatusCode.NOT_FOUND
    exit_code = 1


class UnknownNode(NotFound):
    """The coordinator knows no node by this id: the node registers (again)."""


class NotReady(FedtrainError):
    """The thing exists but not in the state asked for (e.g. a job with no model yet)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    exit_code = 1


class AlreadyAnswered(FedtrainError):
    """A task already has its result."""

    code = grpc.StatusCode.ALREADY_EXISTS


class RateLimited(FedtrainError):
    """Too many calls, or too many open polls: slow down and retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FedtrainError):
    """Nobody answers at the address (or the TLS handshake failed): transient, retry."""

    code = grpc.StatusCode.UNAVAILABLE
    exit_code = 3


class GaveUp(FedtrainError):
    """A node stopped dialling the coordinator: its TLS handshake kept failing in a way that
    retrying cannot mend (a certificate that does not verify)."""

    code = grpc.StatusCode.UNAVAILABLE
    exit_code = 1


class RemoteError(FedtrainError):
    """An error the other side raised that has no class of its own here."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN):
        super().__init__(message)
        self.code = code


# --- privacy and aggregation ----------------------------------------------------
class BudgetExceeded(FedtrainError):
    """Running the requested work would spend more privacy budget than the policy allows."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class EgressViolation(FedtrainError):
    """A message the node was about to send breaks the node's egress rules: it is not sent."""


class SecAggError(FedtrainError):
    """A secure aggregation round cannot go on, e.g. too few nodes are left to unmask the sum."""

    code = grpc.StatusCode.ABORTED


class ImpossibleAggregate(SecAggError):
    """The unmasked sum is outside what honest nodes can send: one of them forged its vector."""


class JobCancelled(FedtrainError):
    """Raised into a job's strategy loop when its job must stop: the coordinator stops (the job
    resumes when it is back), or an operator cancelled it (`fedtrain job cancel`)."""

    code = grpc.StatusCode.CANCELLED


class JobNotStarted(FedtrainError):
    """Too few nodes accepted a job within its ``start_timeout``: the job fails, naming who
    refused (with their reasons) and who never answered."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class FaultInjected(FedtrainError):
    """A process reached the fault point it was started with (``fedtrain.faults``)."""


def _wire_classes() -> dict[str, type[FedtrainError]]:
    found, todo = {}, [FedtrainError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


# The class a peer's status code stands for when it names none of ours.
_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.INVALID_ARGUMENT: WireError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyAnswered,
}


def abort(context: grpc.ServicerContext, err: FedtrainError) -> None:
    """End an RPC with ``err``: its status code, its message and its class's name."""
    context.set_trailing_metadata(((ERROR_KEY, type(err).__name__),))
    context.abort(err.code, str(err))


def from_rpc(err: grpc.RpcError) -> FedtrainError:
    """The error the other side raised, as its class here (``RemoteError`` if none fits).

    A named class counts only with its own status code: a peer cannot make a caller take
    one kind of error (a fault point, say) for a status that means another."""
    code, details = err.code(), err.details() or ""
    named = dict(err.trailing_metadata() or ()).get(ERROR_KEY) if hasattr(err, "trailing_metadata") else None
    cls = _wire_classes().get(named or "")
    if cls is None or cls.code != code:
        cls = _BY_CODE.get(code)
    if cls is None or cls is RemoteError:
        return RemoteError(f"{code.name}: {details}", code)
    return cls(details)
