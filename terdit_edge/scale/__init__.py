"""Sampling at scale: resumable sharded jobs (job), engines (local processes, Ray), merge."""
from .engines import LocalEngine, RayEngine
from .job import JobError, JobSpec, run_job, sample_labels, sample_seed, sample_seeds
from .merge import merge

__all__ = ["JobSpec", "JobError", "run_job", "LocalEngine", "RayEngine", "merge", "sample_seed", "sample_seeds",
           "sample_labels"]
