"""Training checkpoints: one plain dict per checkpoint, written into a Ray Train checkpoint directory.

A checkpoint directory holds ``checkpoint.pt`` (``torch.save`` of a dict of tensors and plain values:
model, optimizer, schedule, epoch and step, the data pipeline's state, RNG states, the spec as JSON,
the per-epoch history) and ``meta.json`` (where it stands, for people and listings). It loads with
``torch.load(..., weights_only=True)``: nothing in it needs pickle.

Directories are named ``checkpoint_<global step>_<time ns>`` so that names sort by progress, and a run
resumed from an older checkpoint (after a corrupt newest one) writes new names rather than reusing one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alexnet_dist.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "meta.json"
FORMAT = 1
_REQUIRED = ("format", "model", "optimizer", "schedule", "epoch", "step", "global_step", "data", "spec")


def checkpoint_dir_name(global_step: int) -> str:
    return f"checkpoint_{global_step:010d}_{time.time_ns()}"


def _sort_key(name: str) -> tuple[int, int]:
    parts = name.split("_")
    try:
        return int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return -1, -1


def write_checkpoint(directory: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (see the module docstring) into ``directory``."""
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint state: missing {missing}")
    directory = Path(directory)
    try:
        torch.save(state, directory / CHECKPOINT_FILE)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError of its writer
        if _disk_full(err) or "No space left" in str(err):
            raise CheckpointError(
                f"{directory / CHECKPOINT_FILE}: no room to write the checkpoint (the disk is full); free "
                "space there (TMPDIR for the staging copy)"
            ) from None
        raise
    meta = {k: state[k] for k in ("epoch", "step", "global_step", "finished") if k in state}
    meta["history"] = state.get("history", [])[-1:]
    (directory / META_FILE).write_text(json.dumps(meta))


def folder_bytes(directory: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def copy_with_room(source: str | Path, target: Path) -> None:
    """Copy the checkpoint folder ``source`` to ``target`` whole or not at all (through a ``.partial``
    folder renamed at the end). A disk without room for it is a one-line :class:`CheckpointError`
    naming the folder and the space needed, checked before copying and caught while copying, and
    the checkpoints already there are left as they were."""
    target.parent.mkdir(parents=True, exist_ok=True)
    needed = ensure_room(source, target)
    staging = target.parent / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(source, staging)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if _disk_full(err):
            raise no_room(target, needed, shutil.disk_usage(target.parent).free) from None
        raise CheckpointError(f"{target}: checkpoint not written ({err.strerror or err})") from None
    os.replace(staging, target)  # committed whole or not at all


def ensure_room(source: str | Path, target: str | Path) -> int:
    """The bytes of the checkpoint folder ``source``; a :class:`CheckpointError` naming ``target`` when
    the disk of ``target``'s parent (which must exist) has less room than that."""
    needed = folder_bytes(source)
    free = shutil.disk_usage(Path(target).parent).free
    if free < needed:
        raise no_room(target, needed, free)
    return needed


def _disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def no_room(target: Path | str, needed: int, free: int) -> CheckpointError:
    return CheckpointError(
        f"{target}: no room for the checkpoint ({needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB "
        "free); free space there or set checkpoint.storage elsewhere (the previous checkpoints are kept)"
    )


def read_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Load ``checkpoint.pt`` from a local directory; a truncated or foreign file is a CheckpointError."""
    path = Path(directory) / CHECKPOINT_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"{path}: unreadable, truncated or corrupt ({first})") from None
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        raise CheckpointError(f"{path}: not an alexnet-dist checkpoint (keys {sorted(state)[:8]})")
    if state["format"] != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']}, this version reads {FORMAT}")
    return state


def checkpoint_names(fs: Any, folder: str) -> list[str]:
    """The checkpoint folders in ``folder`` of the pyarrow filesystem ``fs``, newest first (none if the
    folder does not exist); an unreadable storage raises OSError."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
    names = [
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
    ]
    return sorted(names, key=_sort_key, reverse=True)


def _sibling_checkpoints(latest: Any) -> list[Any]:
    """Every checkpoint directory beside ``latest`` (a ray.train.Checkpoint, or anything with a
    ``siblings()`` method, as the local runner's checkpoints), newest first."""
    if hasattr(latest, "siblings"):
        return latest.siblings()
    from ray.train import Checkpoint

    fs, path = latest.filesystem, latest.path.rstrip("/")
    parent = path.rsplit("/", 1)[0]
    try:
        names = checkpoint_names(fs, parent)
    except OSError as err:
        log.warning("%s: cannot list checkpoints (%s); using the newest only", parent, err)
        return [latest]
    out = [Checkpoint(path=f"{parent}/{n}", filesystem=fs) for n in names]
    if not any(c.path.rstrip("/") == path for c in out):
        out.insert(0, latest)
    return out


def iter_good_checkpoints(latest: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Yield (checkpoint, state) from newest to oldest, skipping each unreadable one with a warning.

    Unreadable is what the checkpoint holds: ``checkpoint.pt`` missing (an upload that never finished:
    Ray Train can count one whose files did not all reach S3), truncated or foreign; or the folder gone
    (deleted after it was listed). Storage that cannot be read (S3 unreachable, no room for the
    download) is a :class:`CheckpointError` instead: skipping every checkpoint for it would start the run
    over from step 0; failing the attempt lets it be retried from the newest good one.
    """
    for ckpt in _sibling_checkpoints(latest):
        try:
            with ckpt.as_directory() as d:
                state = read_checkpoint(d)
        except CheckpointError as err:
            log.warning("skipping checkpoint %s: %s; trying the previous one", ckpt.path, err)
            continue
        except FileNotFoundError as err:
            log.warning("skipping checkpoint %s: gone (%s); trying the previous one", ckpt.path, err)
            continue
        except OSError as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise CheckpointError(
                f"{ckpt.path}: cannot read the checkpoint from its storage ({first}); check the storage "
                "(S3 endpoint, network, local disk): the attempt stops here rather than start over"
            ) from None
        yield ckpt, state


def load_newest_good(latest: Any | None) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint of the run that loads, or None when there is none to resume from."""
    if latest is None:
        return None
    for ckpt, state in iter_good_checkpoints(latest):
        return ckpt, state
    log.warning("no readable checkpoint beside %s: starting from scratch", latest.path)
    return None
