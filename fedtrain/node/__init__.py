"""What runs on a data owner's node: the private round (DP-SGD, its ledger charge), the
owner's signed approvals and the hash-chained audit log. The node agent (``nodes/``) and
the simulation's virtual nodes import it; the coordinator never does."""
