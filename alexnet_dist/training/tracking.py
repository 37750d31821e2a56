"""MLflow logging of a run (optional: the ``mlflow`` extra, ``pip install 'alexnet-dist[mlflow]'``).

When the worker config names an MLflow tracking URI (``config["mlflow_tracking_uri"]``, from the
settings), rank 0 logs to one MLflow run per training run: the spec flattened into params
(``optim.lr``, ``train.epochs``, ...), the same scalars as TensorBoard under the same keys and global steps
(:mod:`~alexnet_dist.training.tensorboard`), and the final model file with its JSON sidecar as artifacts.

Invariants:

- a resumed run logs into the MLflow run it started (found by its run URL tag), so its curves continue;
  a run that starts from scratch gets a new MLflow run;
- logging never raises into training and never stalls it: every call to the tracking server runs on a
  background thread; a failure logs one warning and the run goes on. Metrics are sent in batches at every
  event but a step event, at most ``sync_every_s`` apart otherwise, and on close.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from alexnet_dist import storage
from alexnet_dist.training.tensorboard import Background, StepClock, WarnOnce, metric_points

log = logging.getLogger(__name__)

__all__ = ["EXTRA_HINT", "MlflowSink", "flatten_spec", "mlflow_installed"]

EXTRA_HINT = "pip install 'alexnet-dist[mlflow]'"
RUN_URL_TAG = "alexnet_dist.run_url"  # the tag that finds a resumed run's MLflow run
DEFAULT_EXPERIMENT = "alexnet-dist"
_MAX_PARAMS_PER_BATCH = 100  # MLflow's limits on one log_batch call
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_LENGTH = 6000
_SYNC_NOW = frozenset({"resumed", "epoch", "lr_decay", "final", "yielded"})


def mlflow_installed() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def flatten_spec(spec_json: str) -> dict[str, str]:
    """The spec as MLflow params: nested sections joined with dots, values as strings (lists as JSON)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[prefix] = text[:_MAX_PARAM_LENGTH]

    walk("", json.loads(spec_json))
    return out


class MlflowSink:
    """Rank 0's MLflow run (see the module docstring)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        spec_json: str,
        run_name: str,
        model_url: str,
        experiment: str | None = None,
        endpoint_url: str | None = None,
        sync_every_s: float = 30.0,
        close_timeout_s: float = 300.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.spec_json, self.run_name, self.model_url = spec_json, run_name, model_url
        self.run_url = model_url.rsplit("/", 1)[0]
        self.experiment = experiment or DEFAULT_EXPERIMENT
        self.endpoint_url = endpoint_url
        self.sync_every_s, self.close_timeout_s = sync_every_s, close_timeout_s
        self.clock = StepClock()
        self.warn = WarnOnce(f"mlflow {tracking_uri}")
        self.run_id: str | None = None  # set on the background thread once the run exists
        self._client: Any = None
        self._started = self._final = False
        self._pending: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self._last_sync = time.monotonic()
        self._calls = Background("mlflow", self.warn)

    # --- the sink (training thread) --------------------------------------------------------------------

    def emit(self, event: dict[str, Any]) -> None:
        try:
            kind = event.get("type")
            step = self.clock.advance(event)
            if not self._started:
                self._started = True
                resumed = kind == "resumed"
                self._calls.submit("starting the MLflow run", lambda: self._start(resumed))
            now_ms = int(time.time() * 1000)
            self._pending.extend((key, value, now_ms, step) for key, value in metric_points(event))
            if kind in _SYNC_NOW or time.monotonic() - self._last_sync >= self.sync_every_s:
                self._sync()
            if kind == "final":
                self._final = True
                self._calls.submit("logging the model file", self._log_model)
        except Exception as err:
            self.warn(f"logging a {event.get('type')} event", err)

    def close(self) -> None:
        try:
            if self._started:
                self._sync()
                status = "FINISHED" if self._final else "SCHEDULED"  # not final: it yielded, to resume
                self._calls.submit("ending the MLflow run", lambda: self._end(status))
        except Exception as err:
            self.warn("closing", err)
        self._calls.close(self.close_timeout_s)

    def _sync(self) -> None:
        self._last_sync = time.monotonic()
        if self._pending:
            batch, self._pending = self._pending, []
            self._calls.submit("logging metrics", lambda: self._log_metrics(batch))

    # --- calls to the tracking server (background thread) ----------------------------------------------

    def _start(self, resumed: bool) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(self.experiment)
            except Exception:  # another run created it in between
                found = client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        if resumed and "'" not in self.run_url:
            runs = client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{RUN_URL_TAG}` = '{self.run_url}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if runs:
                self._client, self.run_id = client, runs[0].info.run_id
                client.update_run(self.run_id, status="RUNNING")
                return
        spec = json.loads(self.spec_json)
        tags = {RUN_URL_TAG: self.run_url, "alexnet_dist.job": str(spec.get("name", ""))}
        run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self._client, self.run_id = client, run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten_spec(self.spec_json).items()]
        for i in range(0, len(params), _MAX_PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=params[i : i + _MAX_PARAMS_PER_BATCH])

    def _log_metrics(self, batch: list[tuple[str, float, int, int]]) -> None:
        if self.run_id is None:
            return  # the run could not be started: that failure was reported
        from mlflow.entities import Metric

        metrics = [Metric(key, value, ts, step) for key, value, ts, step in batch]
        for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[i : i + _MAX_METRICS_PER_BATCH])

    def _log_model(self) -> None:
        """The model file and its sidecar as artifacts (an S3 model is copied to a local file first)."""
        if self.run_id is None:
            return
        urls = [self.model_url, self.model_url.removesuffix(".pt") + ".json"]
        with tempfile.TemporaryDirectory(prefix="alexnet-mlflow-") as tmp:
            for url in urls:
                loc = storage.parse_url(url)
                if loc.scheme == "file":
                    path = loc.key
                else:
                    path = str(Path(tmp) / url.rsplit("/", 1)[-1])
                    src = storage.open_read(url, endpoint_url=self.endpoint_url)
                    with src, open(path, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                self._client.log_artifact(self.run_id, path)

    def _end(self, status: str) -> None:
        if self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)
