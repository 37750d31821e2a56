"""S3 dropped, stalled and answering 503 in the middle of a run, through a fault-injecting TCP proxy in
front of moto's server (real HTTP; the server keeps its data through the "outage").

What must hold: shard reads resume at the byte where they stopped (the bytes read are the object's, none
lost or repeated); an upload either ends whole after its retries or fails in one line, leaving the
previous version of the object (never part of the new one); a checkpoint whose upload did not finish is
never the one a run resumes from; a silent endpoint fails a call within its timeouts, in one line naming
it. Each test asserts the faults the proxy counted, so none passes without its fault happening.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import re
import tempfile
import time

import pytest
import torch
from proxies import FaultProxy

from alexnet_dist import storage
from alexnet_dist.data.readahead import ReadAhead
from alexnet_dist.errors import CheckpointError, StorageError
from alexnet_dist.model.file import model_file_bytes
from alexnet_dist.settings import Settings
from alexnet_dist.training.checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_dir_name,
    load_newest_good,
    write_checkpoint,
)

MiB = 1 << 20


@pytest.fixture
def proxy(s3):
    p = FaultProxy(s3.endpoint_url)
    yield p
    p.set_mode("pass")  # lets held connections go before the proxy stops accepting
    p.close()


def read_shard(url: str, endpoint_url: str) -> bytes:
    """One shard's bytes as the loader reads them: ranged GETs of 512 KiB pieces, 3 in flight."""
    size = storage.size(url, endpoint_url=endpoint_url)
    ahead = ReadAhead([(url, size)], depth=3, chunk=512 << 10, endpoint_url=endpoint_url)
    try:
        with ahead.open(0) as f:
            return f.read()
    finally:
        ahead.close()


# fault, set_mode arguments, what the proxy counts for it
SHARD_FAULTS = {
    "drop-0.5s": ("drop", {"for_s": 0.5}, "resets"),
    "http503-1s": ("http503", {"for_s": 1.0}, "answered_503"),
    "stall-1.5s": ("stall", {"for_s": 1.5}, "held"),
    "stall-2.5s-past-a-1s-timeout": ("stall", {"for_s": 2.5}, "held"),
}


@pytest.mark.parametrize("fault", sorted(SHARD_FAULTS))
def test_shard_reads_resume_at_the_byte_where_they_stopped(s3, proxy, monkeypatch, caplog, fault):
    """8 MiB read in ranged GETs; 2 MiB in, the fault starts for a while: the bytes are the object's."""
    mode, kwargs, counter = SHARD_FAULTS[fault]
    if "timeout" in fault:  # a stall longer than the read timeout: the GETs time out and resume
        monkeypatch.setattr(storage, "READ_TIMEOUT_S", 1.0)
    bucket = s3.make_bucket(f"faults-read-{fault.split('-')[0]}-{len(fault)}")
    data = os.urandom(8 * MiB)
    url = f"s3://{bucket}/shard.tar"
    storage.write_bytes(url, data, endpoint_url=s3.endpoint_url)
    start = time.monotonic()
    assert read_shard(url, proxy.endpoint_url) == data
    clean = time.monotonic() - start

    proxy.set_mode(mode, after_bytes=2 * MiB, **kwargs)
    with caplog.at_level(logging.WARNING, logger="alexnet_dist.storage"):
        start = time.monotonic()
        got = read_shard(url, proxy.endpoint_url)
        took = time.monotonic() - start
    assert len(got) == len(data) and got == data  # nothing lost, nothing repeated
    assert getattr(proxy, counter) >= 1, (counter, proxy.resets, proxy.answered_503, proxy.held)
    resumed = [m for m in caplog.messages if "re-opening there" in m]
    print(f"{fault}: {took:.2f} s (clean {clean:.2f} s), resets={proxy.resets} 503s={proxy.answered_503} "
          f"held={proxy.held} GETs={proxy.requests}, re-opens: {resumed}")  # fmt: skip
    if mode == "stall":
        assert took >= kwargs["for_s"] * 0.9  # it waited the stall out on the same object
    if "timeout" in fault:
        assert any("read timeout" in m.lower() for m in resumed), resumed


def test_a_silent_endpoint_fails_reads_and_writes_within_the_timeouts_in_one_line(s3, proxy, monkeypatch):
    """An endpoint that accepts TCP and never answers: each call ends after its tries' timeouts."""
    monkeypatch.setattr(storage, "CONNECT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "READ_TIMEOUT_S", 1.0)
    monkeypatch.setattr(storage, "S3_ATTEMPTS", 3)
    bound = storage.S3_ATTEMPTS * (storage.CONNECT_TIMEOUT_S + storage.READ_TIMEOUT_S)  # 6 s configured
    bucket = s3.make_bucket("faults-silent")
    url = f"s3://{bucket}/k.bin"
    storage.write_bytes(url, b"x" * 1000, endpoint_url=s3.endpoint_url)
    proxy.set_mode("stall")
    want = (
        rf"^{url}: S3 at {proxy.endpoint_url}: no answer within 1 s \(connect\) / 1 s \(read\) in 3 tries "
        r"\(ReadTimeoutError\); check AWS_ENDPOINT_URL and the network to it$"
    )
    for name, call in [
        ("read_range", lambda: storage.read_range(url, 0, 99, endpoint_url=proxy.endpoint_url)),
        ("write_bytes", lambda: storage.write_bytes(url, b"y" * 1000, endpoint_url=proxy.endpoint_url)),
    ]:
        held = proxy.held
        start = time.monotonic()
        with pytest.raises(StorageError, match=want):
            call()
        took = time.monotonic() - start
        print(f"{name}: silent endpoint failed after {took:.2f} s ({proxy.held - held} requests held)")
        assert proxy.held - held >= storage.S3_ATTEMPTS  # every try was sent and left unanswered
        assert storage.S3_ATTEMPTS * storage.READ_TIMEOUT_S * 0.9 <= took < 3 * bound
    proxy.set_mode("pass")  # the held PUTs go on to the server now, after the client gave up on them
    time.sleep(0.5)
    after = storage.read_bytes(url, endpoint_url=s3.endpoint_url)
    print(f"after the stall: the object is the {'new' if after[:1] == b'y' else 'old'} one, whole")
    assert after in (b"x" * 1000, b"y" * 1000)  # a write given up on may still land, but only whole


def test_an_endpoint_resetting_every_connection_is_one_line_naming_it(s3, proxy, monkeypatch, tmp_path):
    """Reads re-open, and writes start again, a few times; then one line, and nothing half-written."""
    monkeypatch.setattr(storage, "S3_ATTEMPTS", 3)
    monkeypatch.setattr(storage, "READ_RETRIES", 2)
    monkeypatch.setattr(storage, "_RETRY_BASE_S", 0.05)
    monkeypatch.setattr(storage, "WRITE_RETRIES", 1)
    monkeypatch.setattr(storage, "_WRITE_RETRY_BASE_S", 0.05)
    bucket = s3.make_bucket("faults-reset")
    url = f"s3://{bucket}/k.bin"
    storage.write_bytes(url, b"x" * 1000, endpoint_url=s3.endpoint_url)
    local = tmp_path / "new.bin"
    local.write_bytes(b"z" * 1000)
    proxy.set_mode("drop")
    for name, call, tries in [
        (
            "read_bytes",
            lambda: storage.read_bytes(url, endpoint_url=proxy.endpoint_url),
            1 + storage.READ_RETRIES,
        ),
        ("write_bytes", lambda: storage.write_bytes(url, b"y" * 1000, endpoint_url=proxy.endpoint_url), 2),
        ("put_file", lambda: storage.put_file(local, url, endpoint_url=proxy.endpoint_url), 2),
    ]:
        resets = proxy.resets
        start = time.monotonic()
        with pytest.raises(StorageError) as err:
            call()
        took = time.monotonic() - start
        print(f"reset endpoint, {name}: failed after {took:.2f} s, {proxy.resets - resets} connections reset")
        again = "re-opens" if name == "read_bytes" else "restart"
        want = rf"^{url}: S3 at {proxy.endpoint_url}: unreachable after 3 tries and {tries - 1} {again} over "
        assert re.match(
            want + r"[0-9.]+ s \(\w+\); check AWS_ENDPOINT_URL and the network to it$", str(err.value)
        )
        assert "\n" not in str(err.value)
        assert proxy.resets - resets >= storage.S3_ATTEMPTS * tries  # botocore's tries, each (re-)start
    assert local.read_bytes() == b"z" * 1000  # kept for another try
    proxy.set_mode("pass")
    assert storage.read_bytes(url, endpoint_url=s3.endpoint_url) == b"x" * 1000


UPLOAD_FAULTS = {
    "drop": ("drop", {"for_s": 0.5}, "resets"),
    "http503": ("http503", {"for_s": 1.0}, "answered_503"),
}


@pytest.mark.parametrize("multipart", [False, True], ids=["single-put", "multipart"])
@pytest.mark.parametrize("fault", sorted(UPLOAD_FAULTS))
def test_an_upload_rides_out_a_fault_and_ends_whole(s3, proxy, monkeypatch, tmp_path, fault, multipart):
    """The fault, for a while, 1 MiB into the upload (a 503 phase for one PUT from its start: it answers
    new requests only): the object ends whole (write_bytes for one PUT, put_file for 3 parts)."""
    mode, kwargs, counter = UPLOAD_FAULTS[fault]
    after = MiB if mode == "drop" or multipart else 0
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * MiB)  # S3's smallest part
    bucket = s3.make_bucket(f"faults-up-{fault}-{int(multipart)}")
    data = os.urandom(11 * MiB if multipart else 3 * MiB)
    url = f"s3://{bucket}/obj.bin"
    proxy.set_mode(mode, after_bytes=after, **kwargs)
    start = time.monotonic()
    if multipart:
        local = tmp_path / "obj.bin"
        local.write_bytes(data)
        storage.put_file(local, url, endpoint_url=proxy.endpoint_url)
        assert not local.exists()  # moved once uploaded
    else:
        storage.write_bytes(url, data, endpoint_url=proxy.endpoint_url)
    took = time.monotonic() - start
    print(f"{fault} during {'multipart' if multipart else 'single'} upload: whole after {took:.2f} s, "
          f"resets={proxy.resets} 503s={proxy.answered_503} requests={proxy.requests}")  # fmt: skip
    assert getattr(proxy, counter) >= 1
    client = s3.client()
    assert client.get_object(Bucket=bucket, Key="obj.bin")["Body"].read() == data
    etag = client.head_object(Bucket=bucket, Key="obj.bin")["ETag"].strip('"')
    assert etag.endswith("-3") if multipart else "-" not in etag


def model_file(seed: int) -> bytes:
    """A model file as the run's end writes it (model_file_bytes), 12 MiB of weights."""
    gen = torch.Generator().manual_seed(seed)
    state = {"features.0.weight": torch.randn(3 * MiB, generator=gen)}
    meta = {"config": {}, "num_classes": 10, "preprocess": {}, "classes": [], "source": {"seed": seed}}
    return model_file_bytes(state, meta)


@pytest.mark.parametrize("fault", ["drop", "http503"])
def test_a_model_file_upload_that_keeps_failing_leaves_the_previous_one_whole(s3, proxy, monkeypatch, fault):
    """The run's model file, above the (lowered) multipart threshold: S3 fails for good 3 MiB into the
    new one's upload; the upload is one line, and the old model file is still there, whole."""
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * MiB)
    monkeypatch.setattr(storage, "S3_ATTEMPTS", 3)
    monkeypatch.setattr(storage, "WRITE_RETRIES", 1)
    monkeypatch.setattr(storage, "_WRITE_RETRY_BASE_S", 0.1)
    bucket = s3.make_bucket(f"faults-model-{fault}")
    url = f"s3://{bucket}/runs/r/model.pt"
    old, new = model_file(1), model_file(2)
    assert len(old) > 2 * storage.MULTIPART_THRESHOLD
    storage.write_bytes(url, old, endpoint_url=s3.endpoint_url)
    proxy.set_mode(fault, after_bytes=3 * MiB)
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        storage.write_bytes(url, new, endpoint_url=proxy.endpoint_url)
    took = time.monotonic() - start
    message = str(err.value)
    print(f"{fault} for good: failed after {took:.2f} s, resets={proxy.resets} 503s={proxy.answered_503}: "
          f"{message}")  # fmt: skip
    assert "\n" not in message and message.startswith(f"{url}: S3 at {proxy.endpoint_url}: ")
    if fault == "drop":
        assert proxy.resets >= 1 and "unreachable after 3 tries and 1 restart over " in message
    else:
        assert proxy.answered_503 >= 1
        assert message.endswith(
            "still answering SlowDown (HTTP 503) after 3 tries; S3 is throttling or failing: retry later"
        )
    proxy.set_mode("pass")
    client = s3.client()
    assert client.get_object(Bucket=bucket, Key="runs/r/model.pt")["Body"].read() == old  # whole, the old one
    assert torch.load(io.BytesIO(old), weights_only=True)["source"] == {"seed": 1}
    leftover = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    print(f"incomplete multipart uploads left (invisible; S3 still failing when they were aborted): "
          f"{len(leftover)}")  # fmt: skip
    storage.write_bytes(url, new, endpoint_url=proxy.endpoint_url)  # S3 back: the next try lands whole
    assert client.get_object(Bucket=bucket, Key="runs/r/model.pt")["Body"].read() == new


# --- checkpoints: Ray Train persists them with pyarrow; the resume lookup reads them back. -------------


def ckpt_state(step: int, mib: int = 1) -> dict:
    """A checkpoint's state (every key the resume lookup requires), ``mib`` MiB of weights."""
    weights = {"w": torch.full((mib << 18,), float(step))}
    return {"format": 1, "model": weights, "optimizer": {}, "schedule": {}, "epoch": 0, "step": step,
            "global_step": step, "data": {}, "spec": "{}"}  # fmt: skip


def arrow_store(endpoint_url: str):
    """The pyarrow S3 filesystem the driver gives Ray Train for ``checkpoint.storage`` (runs go under it)."""
    from alexnet_dist.training.driver import resolve_storage

    return resolve_storage(
        "s3://unused", settings=Settings(s3_endpoint_url=endpoint_url, aws_region="us-east-1")
    )


def persist(fs, state: dict, fs_path: str) -> None:
    """A checkpoint written and persisted as a Ray Train run does (StorageContext.persist_current_checkpoint:
    create the folder, then pyarrow's copy_files of the local one)."""
    from ray.train.v2._internal.execution.storage import _pyarrow_fs_copy_files

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, state)
        fs.create_dir(fs_path)
        _pyarrow_fs_copy_files(tmp, fs_path, destination_filesystem=fs)


def latest(fs, fs_path: str):
    from ray.train import Checkpoint

    return Checkpoint(path=fs_path, filesystem=fs)


def test_resume_skips_a_checkpoint_missing_its_file_or_truncated_in_s3(s3, caplog):
    bucket = s3.make_bucket("faults-ckpt-skip")
    fs = arrow_store(s3.endpoint_url).filesystem
    names = [checkpoint_dir_name(step) for step in (10, 20, 30)]
    persist(fs, ckpt_state(10), f"{bucket}/runs/r/{names[0]}")
    persist(fs, ckpt_state(20), f"{bucket}/runs/r/{names[1]}")
    key = f"runs/r/{names[1]}/{CHECKPOINT_FILE}"
    whole = storage.read_bytes(f"s3://{bucket}/{key}", endpoint_url=s3.endpoint_url)
    storage.write_bytes(f"s3://{bucket}/{key}", whole[: len(whole) // 2], endpoint_url=s3.endpoint_url)
    storage.write_bytes(f"s3://{bucket}/runs/r/{names[2]}/meta.json", b"{}", endpoint_url=s3.endpoint_url)
    with caplog.at_level(logging.WARNING, logger="alexnet_dist.training.checkpoint"):
        ckpt, state = load_newest_good(latest(fs, f"{bucket}/runs/r/{names[2]}"))
    assert state["global_step"] == 10 and ckpt.path.endswith(names[0])
    skipped = [m for m in caplog.messages if m.startswith("skipping checkpoint")]
    assert len(skipped) == 2
    assert names[2] in skipped[0] and f"{CHECKPOINT_FILE}: missing" in skipped[0]
    assert names[1] in skipped[1] and "unreadable, truncated or corrupt" in skipped[1]


CHECKPOINT_FAULTS = {
    "drop-0.5s": ("drop", {"for_s": 0.5}, "resets"),
    "http503-1s": ("http503", {"for_s": 1.0}, "answered_503"),
    "stall-2s": ("stall", {"for_s": 2.0}, "held"),
}


@pytest.mark.parametrize("fault", sorted(CHECKPOINT_FAULTS))
def test_a_checkpoint_upload_rides_out_a_fault_and_lands_whole(s3, proxy, fault):
    """1 MiB into a 4 MiB checkpoint's upload (pyarrow, as Ray Train persists it), the fault for a while:
    pyarrow's retries carry it through, and the checkpoint read back is the one written."""
    mode, kwargs, counter = CHECKPOINT_FAULTS[fault]
    bucket = s3.make_bucket(f"faults-ckpt-{mode}")
    fs = arrow_store(proxy.endpoint_url).filesystem
    name = checkpoint_dir_name(20)
    proxy.set_mode(mode, after_bytes=0 if mode == "http503" else MiB, **kwargs)
    start = time.monotonic()
    persist(fs, ckpt_state(20, mib=4), f"{bucket}/runs/r/{name}")
    took = time.monotonic() - start
    print(f"{fault} during a checkpoint upload: persisted in {took:.2f} s, resets={proxy.resets} "
          f"503s={proxy.answered_503} held={proxy.held}")  # fmt: skip
    assert getattr(proxy, counter) >= 1
    ckpt, state = load_newest_good(latest(arrow_store(s3.endpoint_url).filesystem, f"{bucket}/runs/r/{name}"))
    assert state["global_step"] == 20 and torch.equal(
        state["model"]["w"], ckpt_state(20, mib=4)["model"]["w"]
    )


def test_a_checkpoint_upload_cut_off_is_never_the_resume_point(s3, proxy, caplog):
    """S3 resets every connection 1 MiB into a 4 MiB checkpoint's upload, for good: whether pyarrow
    reports the failure or not (it may only log it while closing the file, and Ray Train then counts the
    checkpoint as persisted), the checkpoint's file is not in S3, and resuming picks the previous one."""
    bucket = s3.make_bucket("faults-ckpt-cut")
    fs = arrow_store(proxy.endpoint_url).filesystem
    first, second = checkpoint_dir_name(10), checkpoint_dir_name(20)
    persist(fs, ckpt_state(10), f"{bucket}/runs/r/{first}")
    proxy.set_mode("drop", after_bytes=MiB)
    start = time.monotonic()
    try:
        persist(fs, ckpt_state(20, mib=4), f"{bucket}/runs/r/{second}")
        outcome = "returned"
    except OSError as err:
        outcome = f"raised {str(err).splitlines()[0][:100]}"
    gc.collect()  # pyarrow streams closed now, not at a later collection
    for _ in range(20):  # until pyarrow's retries are over: no connection reset for a second
        resets = proxy.resets
        time.sleep(1.0)
        if proxy.resets == resets:
            break
    print(f"cut-off checkpoint upload {outcome} after {time.monotonic() - start:.2f} s, "
          f"{proxy.resets} connections reset")  # fmt: skip
    assert proxy.resets >= 1
    proxy.set_mode("pass")
    keys = [k for k in storage.list_prefix(f"s3://{bucket}/runs/r/{second}", endpoint_url=s3.endpoint_url)]
    assert not any(k.endswith(CHECKPOINT_FILE) for k in keys), keys
    with caplog.at_level(logging.WARNING, logger="alexnet_dist.training.checkpoint"):
        ckpt, state = load_newest_good(latest(fs, f"{bucket}/runs/r/{second}"))
    assert state["global_step"] == 10 and ckpt.path.endswith(first)
    assert any(second in m and f"{CHECKPOINT_FILE}: missing" in m for m in caplog.messages), caplog.messages


def test_checkpoint_storage_unreachable_at_resume_fails_the_attempt_rather_than_start_over(s3, proxy):
    bucket = s3.make_bucket("faults-ckpt-down")
    fs = arrow_store(proxy.endpoint_url).filesystem
    name = checkpoint_dir_name(10)
    persist(fs, ckpt_state(10), f"{bucket}/runs/r/{name}")
    assert load_newest_good(latest(fs, f"{bucket}/runs/r/{name}"))[1]["global_step"] == 10
    proxy.set_mode("drop")
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        load_newest_good(latest(fs, f"{bucket}/runs/r/{name}"))
    took = time.monotonic() - start
    print(f"checkpoint storage unreachable at resume: {took:.2f} s, {proxy.resets} resets: {err.value}")
    assert proxy.resets >= 1 and "\n" not in str(err.value)
    assert str(err.value).startswith(f"{bucket}/runs/r/{name}: cannot read the checkpoint from its storage (")
    assert str(err.value).endswith("the attempt stops here rather than start over")
