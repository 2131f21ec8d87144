"""Storage failures on the executors get a name, and a failed arrow task leaves no files behind.

A real full disk: a 96 KiB tmpfs mounted for the test (the suite runs as root on CI's machines; where
mounting is not permitted the test says so and is skipped).
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from bclib.errors import OutputWriteError, output_write_error

from conftest import generated_and_fitted


def test_pyarrow_and_os_errors_are_named():
    assert "no space left on device at /x/f.parquet" in str(
        output_write_error(OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"),
                           "/x/f.parquet"))
    assert "read-only filesystem at /y" in str(output_write_error(OSError(30, "Read-only file system"), "/y"))
    assert "permission denied at /z" in str(output_write_error(PermissionError(13, "Permission denied"), "/z"))


@pytest.fixture
def full_disk(tmp_path):
    mount = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the full-disk test needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_arrow_engine_by_name_and_frees_its_files(spark, tmp_path, full_disk):
    from bclib.steps.backfill import run_backfill

    cfg = generated_and_fitted(spark, tmp_path, evaluate={"label_location": None},
                               output_location=str(full_disk / "out"),
                               backfill={"engine": "arrow", "target_file_mb": 1}, lease={"enabled": False})
    with pytest.raises(OutputWriteError, match=r"no space left on device at .*/out/space_version=\d/part-"):
        run_backfill(spark, cfg)
    left = [os.path.join(d, f) for d, _, files in os.walk(full_disk) for f in files]
    assert left == [], left  # no partial or finished part file stays, no table was created
