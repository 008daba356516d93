"""``listeners submit``: run the cluster as a Ray Job on an existing Ray cluster.

The job's entrypoint is ``listeners up CONFIG`` in the foreground: its driver joins the Ray
cluster (Ray Jobs set ``RAY_ADDRESS``), starts the actors and runs until the job is stopped
(``ray job stop`` sends SIGTERM, on which it stops cleanly). The config's folder is uploaded as
the job's working dir, so entrypoints beside the config travel with it; flows elsewhere must be
importable on the cluster (``package.module:function``). Use an absolute ``state_dir`` (or a
network ledger) so the state outlives the job's temporary working dir.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from actors.errors import ListenerError
from cluster.bootstrap import source_env
from cluster.config import ClusterConfig

LISTENING_MARK = "listening:"


class SubmitError(ListenerError):
    """The job could not be submitted, or it stopped before every clock listened."""


def _client(address: str):  # type: ignore[no-untyped-def]
    # Ray 2.60 clusters started with `ray start` require token auth; use the local token if
    # there is one (as `RAY_AUTH_MODE=token` would).
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray.job_submission import JobSubmissionClient

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {exc}") from None


def _submit_retrying(client: Any, **job: Any) -> str:
    """A head that has just started answers "No available agent" for a few seconds."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise SubmitError(f"the Ray Jobs API refused the job: {exc}") from None
            time.sleep(1)


def submit(config: ClusterConfig, config_path: Path, address: str, timeout: float) -> str:
    """Submit the job; return its id once the cluster listens (raise with the log otherwise)."""
    from ray.job_submission import JobStatus

    client = _client(address)
    base = config.base_dir
    excludes = [".git", "__pycache__", "*.pyc"]
    if config.state_path.is_relative_to(base):
        excludes.append(str(config.state_path.relative_to(base)))
    env = source_env(config.clock_specs())
    env.update(
        {t: os.environ[t] for t in (x.token_env for x in config.tenants) if t and t in os.environ}
    )
    job_id = _submit_retrying(
        client,
        entrypoint=f"python -m cluster.cli up {config_path.resolve().relative_to(base)}"
        f" --timeout {timeout:.0f}",
        runtime_env={"working_dir": str(base), "excludes": excludes, "env_vars": env},
        submission_id=f"listeners-{int(time.time())}-{os.getpid()}",
    )
    deadline = time.monotonic() + timeout + 60
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if LISTENING_MARK in logs:
            return job_id
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED):
            raise SubmitError(f"job {job_id} ended ({status}) before listening:\n{logs[-3000:]}")
        time.sleep(1)
    client.stop_job(job_id)
    raise SubmitError(f"job {job_id} not listening after {timeout:.0f}s; stopped it")
