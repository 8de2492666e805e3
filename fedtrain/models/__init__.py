"""Model construction from a job spec. Every node and the coordinator build the same
architecture from the same spec; only parameters travel."""

from fedtrain.models.tabular import build_model, initial_state

__all__ = ["build_model", "initial_state"]
