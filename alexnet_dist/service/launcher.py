"""The cluster side of the dispatcher: what it needs from Ray (:class:`Launcher`) and the real one, Ray Jobs.

A job runs as one Ray Job whose entrypoint is a command line (``alexnet-dist run-job JOB --attempt N``), so
the service never imports the training code: the Ray Job's driver does, on the cluster. Its environment
(:func:`job_env`) tells it where Redis, the job store and S3 are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from alexnet_dist.errors import ClusterError
from alexnet_dist.ray_token import use_cluster_token
from alexnet_dist.settings import Settings

__all__ = ["LIVE", "LaunchStatus", "Launcher", "RayJobsLauncher", "default_entrypoint", "job_env"]

log = logging.getLogger(__name__)

LIVE = frozenset({"PENDING", "RUNNING"})  # Ray Job states of a job that holds (or will hold) its workers


@dataclass(frozen=True)
class LaunchStatus:
    state: str  # Ray's JobStatus: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED
    message: str = ""

    @property
    def live(self) -> bool:
        return self.state in LIVE


class Launcher(Protocol):
    """What the dispatcher needs from the cluster; :class:`RayJobsLauncher` is the real one."""

    def submit(self, submission_id: str, entrypoint: str, env: dict[str, str]) -> None: ...
    def status(self, submission_id: str) -> LaunchStatus | None: ...  # None: the cluster never saw it
    def statuses(self) -> dict[str, LaunchStatus]: ...  # every submission the cluster knows
    def stop(self, submission_id: str) -> None: ...
    def logs(self, submission_id: str) -> str: ...
    def nodes(self) -> list[dict[str, float]]: ...  # total resources of each alive node


def default_entrypoint(job_id: str, attempt: int) -> str:
    """The Ray Job's command line: the CLI's hidden ``run-job`` command trains the job's spec."""
    return f"alexnet-dist run-job {job_id} --attempt {attempt}"


def job_env(settings: Settings) -> dict[str, str]:
    """Environment of the Ray Job's driver: what `run-job` needs to find Redis, the store and S3."""
    env = {
        "ALEXNET_DIST_REDIS_URL": settings.redis_url,
        "ALEXNET_DIST_REDIS_PREFIX": settings.redis_prefix,
        "ALEXNET_DIST_STORAGE": settings.storage_root,
    }
    if settings.s3_endpoint_url:
        env["AWS_ENDPOINT_URL"] = settings.s3_endpoint_url
    if settings.aws_region:
        env["AWS_REGION"] = settings.aws_region
    if settings.mlflow_tracking_uri:  # the dispatcher's MLflow server is the jobs' too
        env["MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
        if settings.mlflow_experiment:
            env["MLFLOW_EXPERIMENT_NAME"] = settings.mlflow_experiment
    return env


class RayJobsLauncher:
    """Ray Jobs through the dashboard's REST API (``JobSubmissionClient``)."""

    def __init__(self, dashboard_url: str) -> None:
        from ray.job_submission import JobSubmissionClient

        use_cluster_token()
        self.url = dashboard_url
        try:
            self._client = JobSubmissionClient(dashboard_url)
        except (ConnectionError, RuntimeError, OSError) as err:
            raise ClusterError(
                f"{dashboard_url}: Ray dashboard unreachable ({type(err).__name__}); check "
                "ALEXNET_DIST_RAY_DASHBOARD and that the Ray head runs with the dashboard (ray[default])"
            ) from None

    def _fail(self, what: str, err: Exception) -> ClusterError:
        text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return ClusterError(f"{what}: Ray refused or is unreachable ({text}); check {self.url}")

    def submit(self, submission_id: str, entrypoint: str, env: dict[str, str]) -> None:
        try:
            self._client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id, runtime_env={"env_vars": env}
            )
        except Exception as err:
            if "already exists" in str(err):  # launched before: the submission id makes launching once
                log.info("Ray job %s: already submitted", submission_id)
                return
            raise self._fail(f"Ray job {submission_id}", err) from None

    def status(self, submission_id: str) -> LaunchStatus | None:
        try:
            info = self._client.get_job_info(submission_id)
        except Exception as err:
            if "does not exist" in str(err):
                return None
            raise self._fail(f"Ray job {submission_id}", err) from None
        return LaunchStatus(str(info.status.value), info.message or "")

    def statuses(self) -> dict[str, LaunchStatus]:
        try:
            jobs = self._client.list_jobs()
        except Exception as err:
            raise self._fail("Ray jobs", err) from None
        return {
            j.submission_id: LaunchStatus(str(j.status.value), j.message or "")
            for j in jobs
            if j.submission_id
        }

    def stop(self, submission_id: str) -> None:
        try:
            self._client.stop_job(submission_id)
        except Exception as err:
            if "does not exist" not in str(err):
                raise self._fail(f"Ray job {submission_id}", err) from None

    def logs(self, submission_id: str) -> str:
        try:
            return self._client.get_job_logs(submission_id)
        except Exception as err:
            raise self._fail(f"Ray job {submission_id}", err) from None

    def nodes(self) -> list[dict[str, float]]:
        from ray.util.state import list_nodes

        try:
            # A dead node stays listed (and unreachable) for a while: without raise_on_missing_output=False
            # Ray refuses the whole listing, and nothing would launch until the dead node is forgotten.
            nodes = list_nodes(
                address=self.url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
            )
        except Exception as err:
            raise self._fail("Ray nodes", err) from None
        return [dict(n.resources_total) for n in nodes]
