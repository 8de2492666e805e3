"""Measured privacy: a one-run empirical audit that puts a lower bound on ε next to the
job's claimed ε (issue 16). See :mod:`fedtrain.audit.run`."""

from fedtrain.audit.run import AuditResult, run_audit

__all__ = ["AuditResult", "run_audit"]
