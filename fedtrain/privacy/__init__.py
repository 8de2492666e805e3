"""Privacy accounting both sides agree on: a node plans and charges its rounds with it, the
coordinator checks the plans nodes report against the job's ε and δ."""
