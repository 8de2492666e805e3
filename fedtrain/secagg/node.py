"""A node's side of one securely aggregated round.

:class:`SecAggNode` holds the round's secrets (two X25519 keys, the self-mask seed,
the shares received from neighbours) in memory only, and answers each stage once,
in order. Its checks are what protect the node against a coordinator that asks for
too much: it sends shares only to peers that are consortium nodes (``peers``), it
reveals either the self-mask seed share or the mask key share of a peer, never both,
and it answers the unmask stage once. With a threshold above half of the share holders,
the coordinator cannot reach the threshold for both secrets of any node by asking
different holders different things.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from fedtrain.errors import SecAggError
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.secagg import crypto
from fedtrain.secagg.encoding import FIELD, quant_bits
from fedtrain.secagg.peers import PeerAuth


class Stage(Enum):
    NEW = "new"
    KEYS_SENT = "keys sent"
    SHARES_SENT = "shares sent"
    SHARES_RECEIVED = "shares received"
    MASKED = "masked update sent"
    DONE = "unmasked"


def check_threshold(threshold: int, holders: int) -> None:
    """The protocol's safety rule on parameters: more than half of the holders, at least 2."""
    if not (2 <= threshold <= holders and 2 * threshold > holders):
        raise SecAggError(
            f"threshold {threshold} for {holders} share holders is unsafe: it must be more than half of them"
            " (so no one collects both secrets of a node) and at most all of them"
        )


class SecAggNode:
    def __init__(self, job_id: str, round: int, node_id: int, auth: PeerAuth):
        """``auth``: this node's certificate, which signs its keys and checks its peers'."""
        self.job_id = job_id
        self.round = round
        self.node_id = node_id
        self._auth = auth
        self.stage = Stage.NEW
        self.threshold = 0
        self._neighbours: frozenset[int] = frozenset()
        self._peers: dict[int, pb.PublicKeys] = {}      # neighbours that advertised keys
        self._received: dict[int, pb.SharePair] = {}    # shares held for peers
        self._own: pb.SharePair | None = None

    def _advance(self, expected: Stage, to: Stage) -> None:
        if self.stage is not expected:
            raise SecAggError(
                f"job {self.job_id} round {self.round}: a request for the '{to.value}' stage arrived in stage"
                f" '{self.stage.value}'; each stage is answered once, in order"
            )
        self.stage = to

    def _info(self, purpose: str, peer: int) -> bytes:
        lo, hi = sorted((self.node_id, peer))
        return crypto.context(purpose, self.job_id, self.round, lo, hi)

    def _binding(self, src: int, dst: int) -> bytes:
        return crypto.context("share", self.job_id, self.round, src, dst)

    # --- stage 1: advertise keys -----------------------------------------------------
    def setup(self, req: pb.SecAggSetup) -> pb.PublicKeys:
        neighbours = list(req.neighbours)
        if self.node_id in neighbours or len(set(neighbours)) != len(neighbours):
            raise SecAggError("the neighbour list repeats a node or names this node itself")
        if req.num_nodes < 3 or len(neighbours) + 1 > req.num_nodes:
            raise SecAggError(f"{len(neighbours) + 1} share holders among {req.num_nodes} nodes; 3 or more are needed")
        check_threshold(req.threshold, len(neighbours) + 1)
        if not 8 <= req.quant_bits <= quant_bits(req.num_nodes):
            raise SecAggError(
                f"quant_bits {req.quant_bits} would let the sum of {req.num_nodes} updates wrap around the field"
            )
        self._advance(Stage.NEW, Stage.KEYS_SENT)
        self.threshold, self.quant_bits, self._neighbours = req.threshold, req.quant_bits, frozenset(neighbours)
        self._enc_key, self._mask_key = crypto.new_private_key(), crypto.new_private_key()
        self._seed = crypto.new_seed()
        return self._auth.sign(self.job_id, self.round, pb.PublicKeys(
            node_id=self.node_id, encryption_key=crypto.public_bytes(self._enc_key),
            mask_key=crypto.public_bytes(self._mask_key), seed_commitment=crypto.commitment(self._seed),
        ))

    # --- stage 2: share the seed and the mask key ------------------------------------
    def share_keys(self, req: pb.SecAggShareKeys) -> pb.EncryptedShares:
        self._advance(Stage.KEYS_SENT, Stage.SHARES_SENT)
        own = (crypto.public_bytes(self._enc_key), crypto.public_bytes(self._mask_key))
        seen: set[bytes] = set(own)
        fingerprints: set[str] = set()
        names: set[str] = set()
        # Every peer is authenticated before anything is shared: a made-up peer would get shares.
        for keys in req.keys:
            if keys.node_id not in self._neighbours or keys.node_id in self._peers:
                raise SecAggError(f"keys for node {keys.node_id}, which is not a neighbour or was listed twice")
            if {keys.encryption_key, keys.mask_key} & seen or keys.encryption_key == keys.mask_key:
                # Repeated keys would let one party pose as several.
                raise SecAggError(f"node {keys.node_id} advertises a public key already in use")
            seen |= {keys.encryption_key, keys.mask_key}
            cert, name = self._auth.verify(self.job_id, self.round, keys)
            if cert in fingerprints or name in names:
                raise SecAggError(f"node {keys.node_id} advertises with the certificate of another peer ({name})")
            fingerprints.add(cert)
            names.add(name)
            self._peers[keys.node_id] = keys
        self._require_holders(len(self._peers) + 1, "advertised authenticated keys")
        holders = sorted([self.node_id, *self._peers])
        seed_shares = crypto.split(self._seed, self.threshold, len(holders))
        key_shares = crypto.split(crypto.private_bytes(self._mask_key), self.threshold, len(holders))
        out = pb.EncryptedShares()
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares):
            pair = pb.SharePair(seed_share=seed_share, key_share=key_share)
            if holder == self.node_id:
                self._own = pair
                continue
            key = crypto.agree(self._enc_key, self._peers[holder].encryption_key, self._info("share-key", holder))
            out.shares.add(src=self.node_id, dst=holder,
                           ciphertext=crypto.seal(key, pair.SerializeToString(), self._binding(self.node_id, holder)))
        return out

    def _require_holders(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise SecAggError(
                f"only {count} of this node's {len(self._neighbours) + 1} share holders {what};"
                f" {self.threshold} are needed"
            )

    # --- stage 3: receive shares, then mask the update -------------------------------
    def receive_shares(self, req: pb.SecAggCollect) -> None:
        """Decrypt the neighbours' shares. Called before training, so a bad share costs no budget."""
        self._advance(Stage.SHARES_SENT, Stage.SHARES_RECEIVED)
        for share in req.shares:
            if share.dst != self.node_id or share.src not in self._peers or share.src in self._received:
                raise SecAggError(
                    f"a share from node {share.src} to node {share.dst} was routed here, or arrived twice"
                )
            key = crypto.agree(self._enc_key, self._peers[share.src].encryption_key,
                               self._info("share-key", share.src))
            plain = crypto.unseal(key, share.ciphertext, self._binding(share.src, self.node_id))
            if plain is None:
                raise SecAggError(
                    f"the share from node {share.src} does not decrypt for job {self.job_id} round {self.round}:"
                    " it was corrupted, or replayed from another round or another node"
                )
            self._received[share.src] = pb.SharePair.FromString(plain)
        self._require_holders(len(self._received) + 1, "sent their shares")

    def mask(self, encoded: np.ndarray) -> np.ndarray:
        """``encoded`` plus the self mask plus the pairwise masks, in the field."""
        self._advance(Stage.SHARES_RECEIVED, Stage.MASKED)
        masked = np.asarray(encoded, dtype=FIELD) + crypto.mask(self._seed, len(encoded))
        for peer in self._received:
            seed = crypto.agree(self._mask_key, self._peers[peer].mask_key, self._info("mask", peer))
            pairwise = crypto.mask(seed, len(encoded))
            # Opposite signs on either side of a pair: the pair's masks cancel in the sum.
            masked = masked + pairwise if self.node_id < peer else masked - pairwise
        return masked

    # --- stage 4: reveal what removes the masks --------------------------------------
    def unmask(self, req: pb.SecAggUnmask) -> pb.Reveal:
        self._advance(Stage.MASKED, Stage.DONE)
        try:
            return self._reveal(list(req.active), list(req.dropped))
        finally:
            self._forget()  # answered or refused, the round's secrets are gone

    def _reveal(self, active: list[int], dropped: list[int]) -> pb.Reveal:
        held = set(self._received) | {self.node_id}
        if len(set(active)) != len(active) or len(set(dropped)) != len(dropped):
            raise SecAggError("the unmask request lists a node twice")
        if set(active) & set(dropped):
            # The core safety rule: both secrets of one node would unmask its update alone.
            raise SecAggError(f"nodes {sorted(set(active) & set(dropped))} are listed as both active and dropped")
        if self.node_id not in active:
            raise SecAggError("the unmask request lists this node as dropped, but it sent its masked update")
        if not set(active) | set(dropped) <= held:
            raise SecAggError(f"no shares are held for nodes {sorted(set(active) | set(dropped) - held)}")
        if len(active) < self.threshold:
            raise SecAggError(f"only {len(active)} active nodes; at least {self.threshold} must have sent updates")
        shares = {**self._received, self.node_id: self._own}
        return pb.Reveal(
            seed_shares=[pb.RevealedShare(owner=n, share=shares[n].seed_share) for n in active],
            key_shares=[pb.RevealedShare(owner=n, share=shares[n].key_share) for n in dropped],
        )

    def _forget(self) -> None:
        self._received.clear()
        self._own = self._seed = self._mask_key = self._enc_key = None
