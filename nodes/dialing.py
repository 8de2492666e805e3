"""What a node's failed call to the coordinator means, and when to stop dialling.

A coordinator that is briefly away and a node whose certificates can never work both
reach the node as gRPC's UNAVAILABLE; only the status's text tells them apart. The first
is worth retrying for as long as it takes; the second is a configuration error that the
owner must fix, so the node says which and, after ``give_up_after`` seconds of it, exits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import grpc

from fedtrain.errors import GaveUp

log = logging.getLogger("fedtrain.node")

# How long a node keeps dialling through certificate errors before it exits, by default:
# long enough to ride out a coordinator being given a new certificate, short enough that a
# misconfigured node does not look alive.
GIVE_UP_AFTER = 300.0


@dataclass(frozen=True)
class Failure:
    meaning: str     # what went wrong and what to check, for the owner's log
    transient: bool  # False: retrying cannot help until the configuration changes


def explain(address: str, raised: grpc.RpcError) -> Failure:
    """What a failed call to ``address`` means. The phrases are gRPC's (BoringSSL's for TLS)."""
    details = raised.details() or ""
    host = address.rsplit(":", 1)[0]
    if "CERTIFICATE_VERIFY_FAILED" in details:
        reason = details.rsplit("CERTIFICATE_VERIFY_FAILED:", 1)[1].split(":")[0].strip()
        return Failure(f"the TLS handshake with {address} failed: the coordinator's certificate did not verify"
                       f" ({reason}). Check that ca.pem in this node's --tls-dir is the consortium's CA, the one"
                       " that issued the coordinator's certificate, and that it has not expired", False)
    if "Hostname Verification" in details:
        return Failure(f"the TLS handshake with {address} failed: the coordinator's certificate does not name"
                       f" {host}. Check --coordinator, or have the consortium issue the coordinator's certificate"
                       f" with --host {host}", False)
    if "Connection refused" in details:
        return Failure(f"nothing listens at {address} (connection refused): is the coordinator running, and is"
                       " --coordinator HOST:PORT right? Retrying", True)
    if "Socket closed" in details:
        return Failure(f"{address} closed the connection: if this goes on, the coordinator does not trust this"
                       " node's certificate (issued by another CA?) or one side runs --insecure. Retrying", True)
    if "resolving" in details:
        return Failure(f"cannot resolve {host}: check --coordinator. Retrying", True)
    return Failure(f"a call to the coordinator at {address} failed ({raised.code().name}: {details}); retrying", True)


class Dialer:
    """Tells the owner, once at WARNING, what each kind of failed call means, and raises
    :class:`GaveUp` once a failure that is not transient has lasted ``give_up_after`` seconds."""

    def __init__(self, address: str, give_up_after: float = GIVE_UP_AFTER):
        self.address = address
        self.give_up_after = give_up_after
        self._last: Failure | None = None
        self._since = 0.0  # when the current run of non-transient failures began

    def failed(self, raised: grpc.RpcError) -> None:
        failure = explain(self.address, raised)
        now = time.monotonic()
        if failure.transient or self._last is None or self._last.transient:
            self._since = now
        if failure != self._last:
            log.warning("%s", failure.meaning)
        else:
            log.info("still failing: %s", failure.meaning)
        self._last = failure
        if not failure.transient and now - self._since >= self.give_up_after:
            raise GaveUp(f"gave up after {now - self._since:.0f} s: {failure.meaning}")

    def succeeded(self) -> None:
        if self._last is not None:
            log.info("connected to %s again", self.address)
        self._last = None
