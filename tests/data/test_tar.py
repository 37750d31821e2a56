"""The tar stream reader against the standard library's tarfile."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from alexnet_dist.data import tar as tarstream


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("chunk", [512, 1300, 1 << 20])
def test_tar_reader_matches_tarfile_across_read_boundaries(tmp_path, monkeypatch, chunk, fmt):
    """Long names (GNU "L" members, pax paths, ustar prefixes), empty members, members bigger than a read;
    a cut inside a member and a bad size field are errors, not short samples."""
    path = tmp_path / "t.tar"
    rng = np.random.default_rng(0)
    long = "a/" + "x" * 120 + ".jpg" if fmt != tarfile.USTAR_FORMAT else "p" * 90 + "/" + "x" * 90 + ".jpg"
    members = [(long, 3000), ("b.cls", 1), ("c.json", 0), ("d" * 30 + ".png", 700), ("e.bin", 5000)]
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, size in members:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(rng.bytes(size)))
    monkeypatch.setattr(tarstream, "_TAR_CHUNK", chunk)
    with tarfile.open(path) as tar:
        want = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [n for n, _ in want] == [n for n, _ in members]
    with open(path, "rb") as f:
        got = [(name, bytes(blob)) for name, blob in tarstream.members(f)]
    assert got == want
    whole = path.read_bytes()
    cut = io.BytesIO(whole[: whole.rindex(b"e.bin") + 512 + 1000])  # 1000 of the 5000 bytes of e.bin
    with pytest.raises(EOFError):
        list(tarstream.members(cut))
    bad = bytearray(whole)
    header = whole.rindex(b"b.cls")  # its own header (pax: after the extended one)
    bad[header + 124 : header + 136] = b"12x4567\0\0\0\0\0"  # its size field: not octal
    with pytest.raises(tarfile.ReadError):
        list(tarstream.members(io.BytesIO(bytes(bad))))
