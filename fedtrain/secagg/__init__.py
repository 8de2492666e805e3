"""Secure aggregation (SecAgg+, Bell et al., CCS 2020): the coordinator learns only the sum.

- :mod:`fedtrain.secagg.node` - a node's state machine for one round;
- :mod:`fedtrain.secagg.server` - the coordinator's, which removes the masks;
- :mod:`fedtrain.secagg.peers` - key advertisements signed with node certificates, and their checks;
- :mod:`fedtrain.secagg.encoding` - updates to uint32 field elements and back, and the sum's bounds;
- :mod:`fedtrain.secagg.crypto` - the primitives, all from ``cryptography`` and Flower.
"""
