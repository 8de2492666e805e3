"""What runs on the coordinator's side of a job: the Flower strategy and round loop, the
checks of a node's update against the job's DP plan, and the job's report. The
coordinator (``coordinator/``) and the simulation's server import it; nodes never do."""
