"""The coordinator's job control: submitting and resuming jobs, their evaluation data, their
status and their reports. The gRPC servicers (``coordinator.servicers``) call into it."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
from flwr.supercore.task_identity import TaskIdentity
from torch.utils.data import TensorDataset

from fedtrain.errors import FedtrainError, NotFound, NotReady, SpecError
from fedtrain.faults import Faults
from fedtrain.models import initial_state, load_dataset
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import encode_values
from fedtrain.protocol.tls import Identity
from fedtrain.server.report import REPORT_HTML, write_report
from fedtrain.server.strategy import MinNodes, build_strategy
from fedtrain.spec import JobSpec, job_spec_from_json
from fedtrain.storage import private_dir
from coordinator.db import Database
from coordinator.job_store import JobStore
from coordinator.mailbox import Mailbox
from coordinator.metrics import Metrics
from coordinator.registry import Registry
from coordinator.runner import JobRunner

log = logging.getLogger("fedtrain.coordinator")

# How long a cancel waits for its job to stop (abandon its round, write its report) before it
# answers: within the operator client's 30 s call timeout.
CANCEL_WAIT_SECONDS = 20.0


@functools.lru_cache(maxsize=256)
def _stored_spec(spec_json: str) -> JobSpec:
    """A stored job's spec (read-only), parsed once per distinct text."""
    return job_spec_from_json(spec_json)


class Coordinator:
    """What both services share: the state (node registry and job store), the mailbox and the
    running jobs."""

    def __init__(self, state_dir: Path, identity: Identity | None = None, eval_dir: Path | None = None,
                 faults: Faults = Faults(), audit_canaries: int = 0):
        """``audit_canaries``: audit every ended job that has evaluation data with this many
        canaries (0: no audits; see :meth:`audit`)."""
        private_dir(state_dir)
        # With an identity the coordinator speaks mutual TLS only, and knows nodes by certificate.
        self.identity = identity
        self.db = Database(state_dir / "coordinator.db")
        self.registry = Registry(self.db)
        self.job_store = JobStore(self.db)
        self.reports = private_dir(state_dir / "reports")  # one directory per ended job
        # The only files a job's evaluation.data may name.
        self.eval_dir = private_dir(state_dir / "eval") if eval_dir is None else eval_dir
        self.faults = faults
        self.audit_canaries = audit_canaries
        self.mailbox = Mailbox()
        self.metrics = Metrics(self.registry, self.job_store)
        self.runners: dict[str, JobRunner] = {}
        # Flower stamps messages with a process-wide task identity; the coordinator plays
        # the server's role in every job.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self._resume_jobs()

    def _resume_jobs(self) -> None:
        """Jobs a stop or crash interrupted go on after their last checkpoint."""
        for job in self.job_store.active_jobs():
            spec = _stored_spec(job.spec_json)
            try:
                strategy = build_strategy(spec)
                eval_data = self.evaluation_data(spec)
            except FedtrainError as err:
                self.job_store.set_job_state(job.id, "failed", f"cannot resume: {err}")
                continue
            # A job that stopped before its first checkpoint starts over (the starting model is seeded).
            initial = None if self.job_store.has_model(job.id) else initial_state(spec)
            log.info("resuming job %s (%s)", job.id, job.name)
            self._start(job.id, spec, strategy, eval_data, initial)

    def _start(self, job_id: str, spec: JobSpec, strategy: MinNodes,
               eval_data: TensorDataset | None, initial: dict[str, np.ndarray] | None) -> None:
        runner = JobRunner(job_id, spec, strategy, self.job_store, self.registry, self.mailbox,
                           len(self.runners) + 1, eval_data, self.metrics, initial, on_end=self.write_report,
                           faults=self.faults)
        self.runners[job_id] = runner
        runner.start()
        self.mailbox.wake()

    def submit(self, spec_json: str) -> str:
        """Store and start a job; a job that cannot run is refused (``SpecError``) and nothing is stored."""
        try:
            spec = job_spec_from_json(spec_json, source="submitted job spec")
            # Build its strategy (which checks the strategy's params) and its starting model (which
            # checks a transformer base against the job's hash), and read the evaluation data, all
            # before storing anything.
            strategy = build_strategy(spec)
            initial = initial_state(spec)
            eval_data = self.evaluation_data(spec)
        except SpecError:
            raise
        except (FedtrainError, ValueError) as err:  # e.g. a base model that is not the job's
            raise SpecError(str(err)) from None
        job_id = self.job_store.create_job(spec.name, spec.canonical_json())
        self._start(job_id, spec, strategy, eval_data, initial)
        return job_id

    def evaluation_path(self, spec: JobSpec) -> Path:
        """The job's evaluation table, from the evaluation directory only (symlinks and ``..``
        resolved first). Errors name the path as the job gave it, never what a file holds: the
        operator who submits a job may not read the coordinator's disk through them."""
        name = spec.evaluation.data
        try:
            root = self.eval_dir.resolve()
            path = (root / name).resolve()
            found = path.is_relative_to(root) and path.is_file()
        except (OSError, ValueError):  # e.g. a name too long, or with a NUL byte
            found = False
        if not found:
            raise SpecError(f"evaluation.data {name[:200]!r} is not a file in the coordinator's evaluation"
                            " directory (`fedtrain coordinator start --eval-dir`)")
        return path

    def evaluation_data(self, spec: JobSpec) -> TensorDataset | None:
        if spec.evaluation is None:
            return None
        path = self.evaluation_path(spec)
        try:
            return load_dataset(path, spec)
        except Exception as err:  # whatever the reader raises may quote the file
            log.warning("evaluation table %s cannot be read for job %s (%s)", path, spec.name, type(err).__name__)
            raise SpecError(f"evaluation.data {spec.evaluation.data[:200]!r} cannot be read as this job's"
                            " evaluation table: check its format, columns and labels") from None

    def audit(self, spec: JobSpec) -> dict | None:
        """The one-run privacy audit of ``spec`` (``fedtrain.audit``) on the coordinator's own
        evaluation table, never a node's data: the job's pipeline (model, preprocessing, DP
        parameters, strategy) run in-process over ``min_nodes`` nodes, with canaries in one.
        None when audits are off, the job has no evaluation data, or the audit cannot take it."""
        if not self.audit_canaries or spec.evaluation is None:
            return None
        from fedtrain.audit import run_audit
        from fedtrain.audit.canaries import capacity

        try:
            canaries = min(self.audit_canaries, capacity(spec))
            result = run_audit(spec, self.evaluation_path(spec), nodes=max(spec.min_nodes, 2), canaries=canaries)
        except FedtrainError as err:  # e.g. a causal-lm job: the report shows no audit
            log.info("job %s is not audited: %s", spec.name, err)
            return None
        except Exception:  # a failed audit costs the audit, not the report
            log.exception("job %s: the audit failed", spec.name)
            return None
        log.info("job %s audited: ε lower bound %.3f against the claimed %g (%s)", spec.name,
                 result.epsilon_lower_bound, result.claimed_epsilon, result.verdict)
        return result.model_dump()

    def job_status(self, job_id: str) -> pb.JobStatus | None:
        job = self.job_store.job(job_id)
        if job is None:
            return None
        status = pb.JobStatus(
            job_id=job.id, name=job.name, state=job.state, error=job.error,
            rounds_total=_stored_spec(job.spec_json).training.rounds, spec_json=job.spec_json,
            approval_wait_seconds=job.approval_wait_seconds,
        )
        report = self.reports / job_id / REPORT_HTML
        if report.exists():
            status.report_path = str(report.resolve())
        for node_id, name, decision, reason in self.job_store.decisions(job_id):
            status.nodes.add(node_id=node_id, name=name, decision=decision, reason=reason)
        node_rounds = self.job_store.node_rounds(job_id)
        for round, metrics, wall in self.job_store.rounds(job_id):
            r = status.rounds.add(round=round, metrics=metrics, wall_seconds=wall)
            for node_id, name, node_metrics, refusal, nbytes in node_rounds.get(round, ()):
                r.nodes.add(node_id=node_id, name=name, metrics=encode_values(node_metrics),
                            refusal=refusal, bytes_received=nbytes)
        return status

    def write_report(self, job_id: str, state: str, error: str, examples: list[dict[str, str]]) -> None:
        """The report of a job that has just ended in ``state``, with its model's ``examples``
        (see ``JobRunner``)."""
        status = self.job_status(job_id)
        status.state, status.error = state, error
        try:
            audit = self.audit(_stored_spec(status.spec_json))
            path = write_report(status, private_dir(self.reports / job_id), audit, examples)
        except Exception:  # a report that cannot be written costs the report, not the job
            log.exception("job %s: cannot write its report", job_id)
            return
        log.info("job %s: report written to %s", job_id, path)

    def cancel(self, job_id: str, operator: str) -> pb.JobStatus:
        """Stop a waiting or running job for ``operator`` (see ``JobRunner.cancel``); its status
        once it has stopped, or after ``CANCEL_WAIT_SECONDS`` (still stopping, e.g. evaluating)."""
        if self.job_store.job(job_id) is None:
            raise NotFound(f"unknown job {job_id!r}; `fedtrain job status` lists jobs")
        runner = self.runners.get(job_id)
        if runner is None or not runner.cancel(operator):
            if runner is not None:
                runner.join(CANCEL_WAIT_SECONDS)  # an ending job is storing its state
            raise NotReady(f"job {job_id} has already ended ({self.job_store.job(job_id).state}); only a waiting"
                           " or running job can be cancelled")
        self.mailbox.wake()  # a round or a wait for nodes in progress notices now
        runner.join(CANCEL_WAIT_SECONDS)
        return self.job_status(job_id)

    def stop(self) -> None:
        for runner in self.runners.values():
            runner.cancelled.set()
        self.mailbox.wake()
