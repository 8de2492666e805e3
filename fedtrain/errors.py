"""Errors that name what is wrong and, where there is one, what to do about it."""


class FedtrainError(Exception):
    """Base class of every error fedtrain raises on purpose."""


class SpecError(FedtrainError, ValueError):
    """A job spec or policy file is malformed."""


class WireError(FedtrainError, ValueError):
    """A message from the other side is malformed (shape, dtype, size, NaN...)."""


class BudgetExceeded(FedtrainError):
    """Running the requested work would spend more privacy budget than the policy allows."""


class SecAggError(FedtrainError):
    """A secure aggregation round cannot go on, e.g. too few nodes are left to unmask the sum."""
