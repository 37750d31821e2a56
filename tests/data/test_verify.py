"""shards verify: every planted fault found, and nothing else; the CLI exits non-zero with a JSON report."""

from __future__ import annotations

import json
from pathlib import Path

from shardkit import build_fashion, rewrite_shard
from typer.testing import CliRunner

from alexnet_dist.cli import app
from alexnet_dist.data.verify import verify_manifest


def test_verify_finds_planted_bad_samples_and_only_them(fashion_mnist_dir, tmp_path):
    m = build_fashion(fashion_mnist_dir, tmp_path / "out", limit=200, shard_size=50)
    assert verify_manifest(m).to_dict() == {"shards": 4, "samples": 200, "good": 200, "bad": []}
    planted = {}

    def corrupt(key, files):
        if not planted.get("jpg"):
            planted["jpg"] = key
            return {**files, "jpg": files["jpg"][:100] + b"\x00garbage" * 20}
        return files

    def relabel(key, files):
        if not planted.get("cls"):
            planted["cls"] = key
            return {**files, "cls": b"10"}
        return files

    m = rewrite_shard(m, 1, corrupt)
    m = rewrite_shard(m, 2, relabel)
    shard3 = Path(m.shards[3].url)
    shard3.write_bytes(shard3.read_bytes()[:30_000])  # truncated mid-sample; the manifest still says 50
    report = verify_manifest(m)
    intact = {(b.shard, b.key) for b in report.bad if b.shard != str(shard3)}
    assert intact == {(m.shards[1].url, planted["jpg"]), (m.shards[2].url, planted["cls"])}
    assert any("label 10 outside 0..9" in b.problem for b in report.bad)
    cut = [b for b in report.bad if b.shard == str(shard3)]  # size, sha256, count, and the sample cut in two
    assert len([b for b in cut if b.key != "*"]) <= 1  # at most the one sample the cut split
    assert any("bytes, manifest says" in b.problem for b in cut) and any("sha256" in b.problem for b in cut)
    read3 = report.samples - 150
    assert 0 < read3 < 50 and report.good == 148 + read3 - len([b for b in cut if b.key != "*"])
    # the CLI: non-zero exit and a one-line summary
    result = CliRunner().invoke(app, ["shards", "verify", m.url, "--json"])
    assert result.exit_code != 0
    doc = json.loads(result.stdout)
    assert {b["key"] for b in doc["bad"] if b["shard"] != str(shard3)} == {planted["jpg"], planted["cls"]}
