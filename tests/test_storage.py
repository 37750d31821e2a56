"""Storage by URL: local paths and S3 over real HTTP (moto's server), including a cut connection."""

from __future__ import annotations

import multiprocessing
import os

import pytest
from proxies import CuttingProxy

from alexnet_dist import storage
from alexnet_dist.errors import NotFoundError, StorageError


def test_local_roundtrip_atomic_list_delete(tmp_path):
    url = f"file://{tmp_path}/a/b.bin"
    storage.write_bytes(url, b"x" * 1000)
    assert storage.read_bytes(str(tmp_path / "a" / "b.bin")) == b"x" * 1000
    assert storage.exists(url) and storage.size(url) == 1000
    storage.write_bytes(url, b"new")  # replaced whole; no temporary file left behind
    assert storage.read_bytes(url) == b"new"
    assert os.listdir(tmp_path / "a") == ["b.bin"]
    storage.write_bytes(str(tmp_path / "a" / "c.bin"), b"c")
    assert storage.list_prefix(str(tmp_path / "a")) == [
        str(tmp_path / "a" / "b.bin"),
        str(tmp_path / "a" / "c.bin"),
    ]
    storage.delete(url)
    storage.delete(url)  # idempotent
    assert not storage.exists(url)
    with pytest.raises(NotFoundError, match="b.bin: not found"):
        storage.read_bytes(url)


def test_url_parsing_and_unknown_scheme():
    assert storage.parse_url("s3://bkt/some/key.tar") == storage.Location("s3", "bkt", "some/key.tar")
    assert storage.parse_url("file:///abs/x").key == "/abs/x"
    assert storage.join("s3://bkt/pre", "x.tar") == "s3://bkt/pre/x.tar"
    assert storage.join("s3://bkt", "x.tar") == "s3://bkt/x.tar"
    with pytest.raises(StorageError, match="gs://b/k: unknown scheme 'gs'"):
        storage.read_bytes("gs://b/k")
    with pytest.raises(StorageError, match="no bucket"):
        storage.parse_url("s3:///key")


def test_s3_roundtrip_list_exists_delete(s3):
    bucket = s3.make_bucket("store-basic")
    data = os.urandom(300_000)
    storage.write_bytes(f"s3://{bucket}/p/one.bin", data)  # endpoint from AWS_ENDPOINT_URL, as users set it
    storage.write_bytes(f"s3://{bucket}/p/two.bin", b"2")
    storage.write_bytes(f"s3://{bucket}/q/three.bin", b"3")
    assert storage.read_bytes(f"s3://{bucket}/p/one.bin") == data
    assert storage.size(f"s3://{bucket}/p/one.bin") == 300_000
    assert storage.list_prefix(f"s3://{bucket}/p/") == [
        f"s3://{bucket}/p/one.bin",
        f"s3://{bucket}/p/two.bin",
    ]
    assert storage.exists(f"s3://{bucket}/q/three.bin")
    storage.delete(f"s3://{bucket}/q/three.bin")
    assert not storage.exists(f"s3://{bucket}/q/three.bin")
    with pytest.raises(NotFoundError, match=f"s3://{bucket}/nope: not found"):
        storage.read_bytes(f"s3://{bucket}/nope", endpoint_url=s3.endpoint_url)
    with pytest.raises(NotFoundError, match="bucket does not exist"):
        storage.list_prefix("s3://no-such-bucket-here/x")


def test_s3_large_write_is_multipart(s3, monkeypatch):
    bucket = s3.make_bucket("store-multipart")
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)  # S3's smallest part size
    data = os.urandom(11 * 1024 * 1024)
    storage.write_bytes(f"s3://{bucket}/big.bin", data)
    head = s3.client().head_object(Bucket=bucket, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: 3 parts
    assert storage.read_bytes(f"s3://{bucket}/big.bin") == data


def test_s3_read_resumes_after_connection_cuts(s3):
    bucket = s3.make_bucket("store-cut")
    data = os.urandom(2_000_000)
    storage.write_bytes(f"s3://{bucket}/obj.bin", data)
    proxy = CuttingProxy(s3.endpoint_url, cut_after=300_000, cuts=2)
    try:
        with storage.open_read(f"s3://{bucket}/obj.bin", endpoint_url=proxy.endpoint_url) as f:
            got = f.read()
            reconnects = f.raw.reconnects
    finally:
        proxy.close()
    assert proxy.cuts == 2 and reconnects == 2
    assert len(got) == len(data) and got == data  # nothing lost, nothing repeated


def test_s3_read_range_resumes_inside_its_range_and_reads_past_the_end_as_empty(s3, tmp_path):
    bucket = s3.make_bucket("store-range")
    data = os.urandom(1_000_000)
    url = f"s3://{bucket}/obj.bin"
    storage.write_bytes(url, data)
    proxy = CuttingProxy(s3.endpoint_url, cut_after=200_000, cuts=2)
    try:
        span = storage.read_range(url, 100_000, 699_999, endpoint_url=proxy.endpoint_url)
    finally:
        proxy.close()
    assert proxy.cuts == 2 and span.etag  # cut twice inside the range: resumed with Range both times
    assert span.start == 100_000 and span.data == data[100_000:700_000] and span.size == 1_000_000
    tail = storage.read_range(url, 999_000, 1_999_999)  # the object ends first
    assert tail.data == data[999_000:] and tail.size == 1_000_000
    past = storage.read_range(url, 1_000_000, 1_000_999)  # starts past the end: empty, as a file read is
    assert past.data == b"" and past.size == 1_000_000
    with pytest.raises(NotFoundError, match=f"s3://{bucket}/nope: not found"):
        storage.read_range(f"s3://{bucket}/nope", 0, 9)
    (tmp_path / "f.bin").write_bytes(data[:5000])
    local = storage.read_range(str(tmp_path / "f.bin"), 4000, 5999)
    assert local.data == data[4000:5000] and local.size == 5000 and local.etag is None


def _read_in_child(url: str) -> tuple[bytes, int]:
    return storage.read_bytes(url), id(storage._session)


def test_forked_worker_reads_s3_through_the_inherited_session(s3):
    """Loader workers are forked: they make their S3 client from the parent's session (75 ms -> 3 ms)."""
    bucket = s3.make_bucket("store-fork")
    storage.write_bytes(f"s3://{bucket}/x.bin", b"abc")  # the parent has made its session and a client
    with multiprocessing.get_context("fork").Pool(1) as pool:
        data, session = pool.apply(_read_in_child, (f"s3://{bucket}/x.bin",))
    assert data == b"abc" and session == id(storage._session)
