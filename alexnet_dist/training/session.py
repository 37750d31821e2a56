"""What the training loop needs from whatever runs it: its rank, its devices, the checkpoint to resume
from, and a way to report metrics with a checkpoint. :class:`RaySession` is Ray Train's.

The loop sees only this interface, so the same ``run_worker`` can run under another runner (one local
process, torchrun) without knowing about Ray.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from alexnet_dist.errors import ClusterError

__all__ = ["RaySession", "Session"]


class Session(Protocol):
    rank: int
    world_size: int

    def devices(self, mode: str) -> tuple[torch.device, torch.device]:
        """The worker's pair for ``scaling.devices``: two GPUs, one GPU twice, or the CPU twice."""
        ...

    def latest_checkpoint(self) -> Any | None:
        """The run's newest committed checkpoint (a ``ray.train.Checkpoint``-like object), or None."""
        ...

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: str | None,
        name: str | None,
        *,
        background: bool = False,
    ) -> None:
        """A barrier over every rank; rank 0 passes the directory of the checkpoint it wrote. With
        ``background`` the upload may finish after this returns, and the runner deletes the directory."""
        ...


class RaySession:
    """The session of a Ray Train worker (``ray.train.get_context()``)."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def devices(self, mode: str) -> tuple[torch.device, torch.device]:
        if mode == "cpu":
            return torch.device("cpu"), torch.device("cpu")
        import ray.train.torch

        devs = ray.train.torch.get_devices()
        if mode == "gpu-pair":
            if len(devs) < 2:
                raise ClusterError(f"scaling.devices='gpu-pair' but this worker got {len(devs)} GPU(s)")
            return devs[0], devs[1]
        return devs[0], devs[0]

    def latest_checkpoint(self) -> Any | None:
        """Ray Train's newest registered checkpoint; when it knows none, the newest checkpoint folder in
        the run's storage. Ray registers a checkpoint only after its upload, so a run stopped in
        between (a preemption that came late, a head restart) leaves complete checkpoints Ray never
        counted; the caller reads each in turn and skips one that is incomplete."""
        registered = self._train.get_checkpoint()
        if registered is not None:
            return registered
        return self._stored_checkpoint()

    def _storage(self) -> tuple[Any, str]:
        """The run's storage filesystem and folder (Ray Train's developer API: AttributeError without it)."""
        storage = self._train.get_context().get_storage()
        return storage.storage_filesystem, storage.experiment_fs_path.rstrip("/")

    def _stored_checkpoint(self) -> Any | None:
        from alexnet_dist.training.checkpoint import checkpoint_names

        try:
            fs, run = self._storage()
            names = checkpoint_names(fs, run)
        except (AttributeError, OSError):  # a Ray without this developer API, or storage not readable
            return None
        return self._train.Checkpoint(path=f"{run}/{names[0]}", filesystem=fs) if names else None

    def _check_room(self, checkpoint_dir: str, name: str | None) -> None:
        """On local storage, a checkpoint the disk has no room for fails here, in one line naming the
        folder and the space needed, before Ray copies any of it (a copy cut by a full disk would leave
        a half folder, never registered and skipped on resume, and an error that names neither)."""
        from alexnet_dist.training.checkpoint import ensure_room

        try:
            fs, run = self._storage()
        except AttributeError:  # a Ray without this developer API: Ray's own error, if any, then
            return
        if type(fs).__name__ == "LocalFileSystem":
            ensure_room(checkpoint_dir, f"{run}/{name or 'checkpoint'}")

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: str | None,
        name: str | None,
        *,
        background: bool = False,
    ) -> None:
        if checkpoint_dir is None:
            self._train.report(metrics, checkpoint=None)
            return
        self._check_room(checkpoint_dir, name)
        checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir)
        mode = self._train.CheckpointUploadMode.ASYNC if background else self._train.CheckpointUploadMode.SYNC
        self._train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=background,
        )
