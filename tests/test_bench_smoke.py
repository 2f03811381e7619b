"""The benchmark entry points at the tiny sizes on the CPU: each runs, writes a result in the shared schema and
prints its table. Times mean nothing here; the point is that `make bench` on a GPU does not die on a typo."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import common as c


def _rows(out: Path, name: str) -> list[c.Row]:
    report = c.load_report(out / f"{name}.json")
    if name != "writer":  # the writer takes a frame size, not a network size
        assert report.env["size"] == "tiny"
    assert all(r.error is None for r in report.rows), [r.error for r in report.rows if r.error]
    return report.rows


def test_forward_eager_variants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import forward

    assert forward.main(["--size", "tiny", "--only", "reference", "--only", "eager", "--repeat", "1",
                         "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path, "forward")
    assert [r.case.split(":")[0].split(",")[0] for r in rows] == ["reference-equivalent", "eager bf16"]
    assert all(r.seconds and r.seconds > 0 and r.metrics["finite"] for r in rows)
    assert rows[0].metrics["x_vs_reference"] == 1.0 and "| forward | eager bf16" in capsys.readouterr().out


def test_lowmem_streamed_equals_resident(tmp_path: Path) -> None:
    from bench import lowmem

    assert lowmem.main(["--size", "tiny", "--repeat", "1", "--caps", "16", "--vae-buckets", "",
                        "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path, "lowmem")
    assert [r.case for r in rows] == ["resident", "set-up: blocks to pinned host memory", "streamed, 16 GiB cap"]
    assert rows[2].metrics["max_abs_diff_vs_resident"] == 0.0


def test_writer_foreground_and_background(tmp_path: Path) -> None:
    from bench import writer

    assert writer.main(["--size", "32x64", "--chunks", "2", "--gpu-s", "0", "--repeat", "1", "--content", "noise",
                        "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path, "writer")
    assert [r.case.split()[0] for r in rows] == ["foreground", "background"]
    assert all(r.seconds is not None and r.seconds > 0 for r in rows)


def test_suite_rejects_unknown_parts() -> None:
    from bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--only", "forwardd"])


def test_fleet_overhead_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/fleet.py's ingest and status parts at a tiny size (the claim part starts daemons: the fleet tests
    in tests/daemon/test_fleet.py cover those)."""
    import json

    from bench import fleet

    assert fleet.main(["--only", "ingest,status", "--stems", "3", "--jobs", "30", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "fleet.json").read_text())
    assert doc["results"]["ingest"]["stems_per_s"] > 0 and doc["results"]["status"]["median_s"] > 0
    assert "| status |" in capsys.readouterr().out


def test_checkpoint_share_and_size(tmp_path: Path, tiny_models: Path) -> None:
    """bench/checkpoint.py: the checkpoint's size at a real bucket (3 bytes per output pixel) and the render part on
    the tiny models, both ways (resumable and one file)."""
    from bench import checkpoint

    assert checkpoint.main(["--size", "32x32", "--window", "17", "--chunks", "2", "--repeat", "1", "--warmup", "0",
                            "--models", str(tiny_models), "--out", str(tmp_path)]) == 0
    report = c.load_report(tmp_path / "checkpoint.json")
    assert all(r.error is None for r in report.rows), [r.error for r in report.rows if r.error]
    sizes, render = report.rows[:-1], report.rows[-1]
    assert [r.case.split(" (")[0] for r in sizes] == [f"checkpoint at {h}x{w}" for h, w in checkpoint.BUCKETS]
    assert all(abs(r.metrics["bytes_per_output_pixel"] - 3.0) < 0.01 for r in sizes)
    assert render.metrics["chunks_timed"] == 2 and 0 < render.seconds < 1
