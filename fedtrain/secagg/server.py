"""The coordinator's side of one securely aggregated round.

:class:`SecAggServer` routes the protocol's messages, checks every node's input, and
in the end removes the masks. U1 ⊇ U2 ⊇ U3 are the nodes still in after each stage:

1. **setup** - each sampled node learns its neighbours, the threshold and the
   quantization, and answers with two X25519 public keys and a seed commitment, signed
   with its node certificate (U1);
2. **share keys** - each node in U1 gets its neighbours' signed keys, checks them
   (``fedtrain.secagg.peers``), and answers with Shamir shares of its self-mask seed and
   of its mask key, one ciphertext per neighbour (U2);
3. **collect** - each node in U2 gets the ciphertexts addressed to it, trains, and
   sends its update plus its self mask plus its pairwise masks with U2 neighbours (U3);
4. **unmask** - each node in U3 is told which neighbours sent updates (it reveals their
   seed shares) and which did not (it reveals their mask-key shares).

The sum of U3's masked vectors minus U3's self masks minus the pairwise masks that U3
shared with U2 \\ U3 is the sum of U3's updates. A node's secret needs ``t`` of its
``k`` holders (itself and its neighbours); ``2t > k`` means no one can gather ``t``
shares of both secrets of a node, since each holder reveals only one of the two.
The decoded sum is checked to be one that U3's honest inputs can add up to
(``encoding.check_sum``): a node can mask any vector, but not steer the average at will.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fedtrain.errors import SecAggError, WireError
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.secagg import crypto
from fedtrain.secagg.encoding import FIELD, check_sum, decode_sum, quant_bits
from fedtrain.secagg.node import check_threshold
from fedtrain.secagg.peers import load_certificate, signed_by
from fedtrain.protocol.tls import fingerprint
from fedtrain.spec import SecureAggregationSpec

# Shamir shares of a 32-byte secret: 4 index bytes, then 16 per padded 16-byte chunk.
SHARE_BYTES = 4 + 16 * 3
# A sealed SharePair: nonce, two length-prefixed shares, tag; with slack for encoding.
MAX_CIPHERTEXT_BYTES = 256


def default_degree(num_nodes: int) -> int:
    """Share holders per node (itself included) when a job does not choose: 2*ceil(log2 n) + 1."""
    return 2 * math.ceil(math.log2(num_nodes)) + 1


def neighbour_graph(nodes: list[int], holders: int, rng: random.Random) -> dict[int, frozenset[int]]:
    """Each node's ``holders - 1`` neighbours: the nearest on a randomly ordered ring (SecAgg+'s
    Harary graph), or everyone when ``holders`` covers all nodes."""
    if holders >= len(nodes):
        return {n: frozenset(nodes) - {n} for n in nodes}
    ring = list(nodes)
    rng.shuffle(ring)
    half = (holders - 1) // 2
    return {
        node: frozenset(ring[(i + d) % len(ring)] for d in range(-half, half + 1) if d)
        for i, node in enumerate(ring)
    }


@dataclass(frozen=True)
class Aggregate:
    weight: float            # sum of the contributing nodes' weights
    update: np.ndarray       # sum of their weighted updates, flattened (float64)
    nodes: tuple[int, ...]   # who contributed


class SecAggServer:
    def __init__(self, job_id: str, round: int, nodes: Iterable[int], settings: SecureAggregationSpec,
                 length: int, clip: float, rng: random.Random | None = None):
        self.job_id, self.round, self.length, self.clip = job_id, round, length, clip
        self.max_weight = settings.max_weight
        self.nodes = sorted(set(nodes))
        n = len(self.nodes)
        if n < 3:
            raise SecAggError(f"secure aggregation needs at least 3 nodes in a round, {n} were sampled")
        self.holders = min(settings.neighbours or default_degree(n), n)
        self.threshold = min(self.holders, math.floor(settings.threshold * self.holders) + 1)
        check_threshold(self.threshold, self.holders)
        self.quant_bits = quant_bits(n)
        self.graph = neighbour_graph(self.nodes, self.holders, rng or random.SystemRandom())
        # Each stage's participants are frozen when the next stage's requests go out, so
        # an answer that arrives late cannot change what was already sent to others.
        self.keys: dict[int, pb.PublicKeys] = {}
        self.u1: frozenset[int] | None = None           # advertised keys
        self._share_order: dict[int, list[int]] = {}    # the holders of a node's shares, in index order
        self.shares: dict[int, list[pb.EncryptedShare]] = {}
        self.u2: frozenset[int] | None = None           # sent shares
        self._sum = np.zeros(length, dtype=FIELD)
        self.masked: set[int] = set()
        self.u3: frozenset[int] | None = None           # sent masked updates
        self._unmask: dict[int, pb.SecAggUnmask] = {}
        self.reveals: dict[int, pb.Reveal] = {}

    # --- helpers ---------------------------------------------------------------------
    def _from(self, node: int, expected: Iterable[int], answered: Iterable[int], stage: str,
              closed: frozenset[int] | None) -> None:
        if node not in set(expected):
            why = "is not part of this round" if node not in self.nodes else "was not asked for it"
            raise WireError(f"{stage} from node {node}, which {why} (job {self.job_id} round {self.round})")
        if closed is not None:
            raise WireError(f"{stage} from node {node} arrived after the stage closed (job {self.job_id}"
                            f" round {self.round})")
        if node in set(answered):
            raise WireError(f"node {node} already sent its {stage} for job {self.job_id} round {self.round}")

    def _require(self, alive: frozenset[int], stage: str) -> None:
        if len(alive) < self.threshold:
            raise SecAggError(f"{stage}: only {len(alive)} of {len(self.nodes)} nodes answered, nodes"
                              f" {sorted(set(self.nodes) - alive)} dropped out; the threshold is {self.threshold}")
        for node in sorted(alive):
            have = len((self.graph[node] | {node}) & alive)
            if have < self.threshold:
                gone = sorted(set(self.nodes) - alive)
                raise SecAggError(
                    f"{stage}: node {node} has {have} of its {self.holders} share holders left and needs the"
                    f" threshold of {self.threshold}; nodes {gone} dropped out"
                )

    # --- stage 1 -----------------------------------------------------------------------
    def setup_requests(self) -> dict[int, pb.SecAggSetup]:
        return {
            n: pb.SecAggSetup(num_nodes=len(self.nodes), neighbours=sorted(self.graph[n]), threshold=self.threshold,
                              quant_bits=self.quant_bits)
            for n in self.nodes
        }

    def add_keys(self, node: int, keys: pb.PublicKeys, enrolled: str | None) -> None:
        """``enrolled``: the fingerprint of the certificate ``node`` enrolled with (None: a
        coordinator without TLS, which can vouch for no certificate)."""
        self._from(node, self.nodes, self.keys, "public keys", self.u1)
        sizes = (len(keys.encryption_key), len(keys.mask_key), len(keys.seed_commitment))
        if keys.node_id != node or sizes != (crypto.KEY_BYTES,) * 3:
            raise WireError(f"public keys of node {node} must name it and hold three 32-byte values, got {sizes}")
        # The peers check all this again; checked here, a bad advertisement costs its node the
        # round instead of making its peers refuse theirs.
        cert = load_certificate(keys)
        if cert is None or not signed_by(cert, self.job_id, self.round, keys):
            raise WireError(f"public keys of node {node} must be signed for job {self.job_id} round {self.round}"
                            " by the node certificate they come with")
        if enrolled is not None and fingerprint(cert) != enrolled:
            raise WireError(f"public keys of node {node} come with another certificate than the one it enrolled with")
        self.keys[node] = keys

    # --- stage 2 -----------------------------------------------------------------------
    def share_keys_requests(self) -> dict[int, pb.SecAggShareKeys]:
        alive = self.u1 = frozenset(self.keys)
        self._require(alive, "setup")
        out = {}
        for node in sorted(alive):
            peers = sorted(self.graph[node] & alive)
            self._share_order[node] = sorted([node, *peers])
            out[node] = pb.SecAggShareKeys(keys=[self.keys[p] for p in peers])
        return out

    def add_shares(self, node: int, shares: pb.EncryptedShares) -> None:
        self._from(node, self._share_order, self.shares, "shares", self.u2)
        want = sorted(self.graph[node] & self.u1)
        got = sorted(s.dst for s in shares.shares)
        if got != want or any(s.src != node for s in shares.shares):
            raise WireError(f"node {node} must send one share to each of nodes {want}, from itself; got {got}")
        if any(len(s.ciphertext) > MAX_CIPHERTEXT_BYTES for s in shares.shares):
            raise WireError(f"a share from node {node} is longer than {MAX_CIPHERTEXT_BYTES} bytes")
        self.shares[node] = list(shares.shares)

    # --- stage 3 -----------------------------------------------------------------------
    def collect_requests(self) -> dict[int, pb.SecAggCollect]:
        alive = self.u2 = frozenset(self.shares)
        self._require(alive, "share keys")
        inbox: dict[int, list[pb.EncryptedShare]] = {n: [] for n in alive}
        for src in sorted(alive):
            for share in self.shares[src]:
                if share.dst in alive:
                    inbox[share.dst].append(share)
        return {n: pb.SecAggCollect(shares=inbox[n]) for n in sorted(alive)}

    def add_masked(self, node: int, vector: np.ndarray) -> None:
        self._from(node, self.u2 or (), self.masked, "masked update", self.u3)
        if vector.dtype != FIELD or vector.shape != (self.length,):
            got = f"{vector.dtype}{list(vector.shape)}"
            raise WireError(f"the masked update of node {node} is {got}, expected uint32[{self.length}]")
        self._sum += vector  # uint32 arithmetic wraps: addition in the field
        self.masked.add(node)

    # --- stage 4 -----------------------------------------------------------------------
    def unmask_requests(self) -> dict[int, pb.SecAggUnmask]:
        sent, self.u3 = self.u2, frozenset(self.masked)
        # Checked before anything is revealed: a round that cannot finish reveals nothing.
        if len(self.u3) < self.threshold:
            raise SecAggError(f"collect: only {len(self.u3)} of {len(sent)} nodes sent masked updates and the"
                              f" threshold is {self.threshold}; nodes {sorted(sent - self.u3)} dropped out")
        for node in sorted(sent):
            have = len((self.graph[node] | {node}) & self.u3)
            if have < self.threshold:
                raise SecAggError(
                    f"collect: only {have} of node {node}'s {self.holders} share holders sent masked updates and"
                    f" the threshold is {self.threshold}; nodes {sorted(sent - self.masked)} dropped out before"
                    " sending theirs, so the masks cannot be removed"
                )
        self._unmask = {
            n: pb.SecAggUnmask(active=sorted((self.graph[n] | {n}) & self.u3),
                               dropped=sorted(self.graph[n] & (sent - self.u3)))
            for n in sorted(self.u3)
        }
        return self._unmask

    def add_reveal(self, node: int, reveal: pb.Reveal) -> None:
        self._from(node, self._unmask, self.reveals, "revealed shares", None)
        request = self._unmask[node]
        for kind, got, want in (("seed", reveal.seed_shares, request.active),
                                ("key", reveal.key_shares, request.dropped)):
            if [s.owner for s in got] != list(want):
                raise WireError(f"node {node} must reveal {kind} shares of nodes {list(want)}, "
                                f"got {[s.owner for s in got]}")
            for s in got:
                index = self._share_order[s.owner].index(node) + 1
                if len(s.share) != SHARE_BYTES or int.from_bytes(s.share[:4], "little") != index:
                    raise WireError(f"node {node}'s {kind} share of node {s.owner} is not the share it was given")
        self.reveals[node] = reveal

    def _reconstruct(self, owner: int, shares: list[bytes], what: str) -> bytes:
        try:
            return crypto.combine(shares[: self.threshold])
        except SecAggError as err:
            raise SecAggError(f"node {owner}'s {what} cannot be reconstructed, a share is corrupt: {err}") from None

    def aggregate(self) -> Aggregate:
        """Remove the masks; raises SecAggError when too few shares arrived, ImpossibleAggregate
        when the sum is not one that honest nodes can send."""
        if self.u3 is None:
            raise SecAggError("aggregate() comes after the unmask stage")
        seeds: dict[int, list[bytes]] = {n: [] for n in self.u3}
        keys: dict[int, list[bytes]] = {n: [] for n in self.u2 - self.u3}
        for reveal in self.reveals.values():
            for s in reveal.seed_shares:
                seeds[s.owner].append(s.share)
            for s in reveal.key_shares:
                keys[s.owner].append(s.share)
        for owner, got in {**seeds, **keys}.items():
            if len(got) < self.threshold:
                silent = sorted(self.u3 - set(self.reveals))
                raise SecAggError(
                    f"unmask: {len(got)} shares of node {owner}'s secret arrived and the threshold is"
                    f" {self.threshold}; nodes {silent} did not reveal their shares"
                )
        total = self._sum.copy()
        for owner, shares in sorted(seeds.items()):
            seed = self._reconstruct(owner, shares, "self-mask seed")
            if crypto.commitment(seed) != self.keys[owner].seed_commitment:
                raise SecAggError(f"node {owner}'s self-mask seed does not match its commitment: a share is corrupt")
            total -= crypto.mask(seed, self.length)
        for owner, shares in sorted(keys.items()):
            private = crypto.private_from_bytes(self._reconstruct(owner, shares, "mask key"))
            if crypto.public_bytes(private) != self.keys[owner].mask_key:
                raise SecAggError(f"node {owner}'s mask key does not match its public key: a share is corrupt")
            for peer in sorted(self.graph[owner] & self.u3):
                lo, hi = sorted((owner, peer))
                pairwise = crypto.mask(
                    crypto.agree(private, self.keys[peer].mask_key,
                                 crypto.context("mask", self.job_id, self.round, lo, hi)),
                    self.length,
                )
                # The peer added this mask if its id is the lower one, and subtracted it otherwise.
                total = total - pairwise if peer < owner else total + pairwise
        weight, update = decode_sum(total, len(self.u3), self.clip, self.quant_bits)
        check_sum(weight, update, len(self.u3), self.clip, self.quant_bits, self.max_weight)
        return Aggregate(weight=weight, update=update, nodes=tuple(sorted(self.u3)))
