"""The run lease: put-if-absent on the output's own storage, expiry, heartbeat, takeover, checked before commits.

Local disk (obstore's LocalStore: a hard link that fails when the name exists) and an S3-compatible server
started here on 127.0.0.1 (moto's, which honours `If-None-Match: *`). Two real `bcemb backfill` processes
on one output: whatever the interleaving, one writes, the other waits or exits 75, no duplicate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from bclib.errors import LeaseHeldError, LeaseLostError
from bclib.storage import pyarrow_s3_options, store_options
from bclib.tables.lease import Lease, holder_is_dead

from conftest import REPO, generated_and_fitted, s3a_jars_conf


def _leases(tmp_path):
    return Lease(str(tmp_path / "lease"), 30), Lease(str(tmp_path / "lease"), 30)


def test_one_holder_at_a_time_and_a_named_error_for_the_second(tmp_path):
    a, b = _leases(tmp_path)
    a.acquire()
    with pytest.raises(LeaseHeldError, match=r"held by .* pid %d .*--wait-lease SECONDS" % os.getpid()):
        b.acquire(wait_seconds=0)
    a.verify()
    a.release()
    b.acquire()  # free again
    b.release()


def test_an_expired_lease_is_taken_over_once_and_its_old_holder_cannot_commit(tmp_path):
    a, b = _leases(tmp_path)
    a.acquire()
    a._stop.set()  # a stalls: no heartbeat
    a.expires_at = time.time() - 1  # ... past its ttl
    import obstore

    obstore.put(a.store, a._name(a.generation), a._body())  # what a's last heartbeat wrote
    c = Lease(str(tmp_path / "lease"), 30)
    b.acquire()
    assert c.try_acquire() is not None  # b's generation is live: c may not take it
    with pytest.raises(LeaseLostError):
        a.verify()
    a.expires_at = time.time() + 30  # even with a fresh clock, the newest generation is b's
    with pytest.raises(LeaseLostError, match="taken over"):
        a.verify()
    b.release()


def test_a_killed_holder_on_this_host_frees_the_lease_at_once(tmp_path):
    code = (f"from bclib.tables.lease import Lease; import time; Lease({str(tmp_path / 'lease')!r}, 600).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    b = Lease(str(tmp_path / "lease"), 30)
    with pytest.raises(LeaseHeldError):
        b.acquire(0)
    _, body = b.current()
    assert not holder_is_dead(body)
    proc.kill()
    proc.wait()
    assert holder_is_dead(body)
    b.acquire(0)  # no wait for the 600 s ttl
    b.release()


def test_the_heartbeat_keeps_a_lease_past_its_ttl(tmp_path):
    a = Lease(str(tmp_path / "lease"), 5).acquire()  # renewed every 1.25 s
    deadline = time.time() + 7
    while time.time() < deadline:  # a condition, not an ordering: the lease must stay live the whole time
        assert Lease(str(tmp_path / "lease"), 5).try_acquire() is not None
        time.sleep(0.5)
    a.verify()
    a.release()


def test_storage_options_reach_obstore_with_its_names():
    config, client = store_options("s3a://b/x", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "aws_allow_http": "true",
                                                "region": "us-east-1", "aws_access_key_id": "k"})
    assert config == {"aws_endpoint": "http://127.0.0.1:9", "aws_region": "us-east-1", "aws_access_key_id": "k"}
    assert client == {"allow_http": True}


def test_storage_options_reach_pyarrow_with_its_names_and_small_files_as_one_put():
    opts = pyarrow_s3_options({"AWS_ENDPOINT_URL": "127.0.0.1:9", "aws_allow_http": "true", "region": "eu-west-1",
                               "aws_access_key_id": "k", "secret_access_key": "s", "aws_conditional_put": "etag"})
    assert opts == {"endpoint_override": "127.0.0.1:9", "scheme": "http", "region": "eu-west-1", "access_key": "k",
                    "secret_key": "s", "allow_delayed_open": True}
    # pyarrow's own names pass through; a user can turn the single PUT off; a URL endpoint gives the scheme
    assert pyarrow_s3_options({"allow_delayed_open": "false", "endpoint": "https://s3.example:9000"}) == {
        "allow_delayed_open": False, "endpoint_override": "s3.example:9000", "scheme": "https"}


def test_on_an_s3_compatible_store_the_lease_is_a_conditional_put(s3_server):
    location = "s3a://bcemb-lease/warehouse/_bcemb_leases/out"
    a = Lease(location, 30, s3_server).acquire()
    b = Lease(location, 30, s3_server)
    with pytest.raises(LeaseHeldError):
        b.acquire(0)
    # two racers for the next generation: the conditional PUT lets exactly one create it
    import obstore
    from obstore.exceptions import AlreadyExistsError

    name = a._name(a.generation + 1)
    obstore.put(b.store, name, b"{}", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(a.store, name, b"{}", mode="create")
    with pytest.raises(LeaseLostError):  # a newer generation exists: a no longer holds it
        a.verify()
    a.release()


# --------------------------------------------------------------------------- two bcemb processes


@pytest.fixture(scope="module")
def project(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lease_project")
    cfg = generated_and_fitted(spark, tmp, evaluate={"label_location": None})
    data = {"spark": {"master": "local[1]"},
            "embeddings": {"location": cfg.embeddings.location, "versions": [0, 1, 2]},
            "registry_location": cfg.registry_location, "output_location": str(tmp / "out"),
            "metrics_location": cfg.metrics_location, "transform": {"bias": False},
            "fit": {"holdout": 0.25}, "gate": {"min_heldout_ids": 50},
            "evaluate": {"label_location": None, "report_dir": str(tmp / "reports"), "neighbours_k": 5,
                         "neighbours_sample": 200}}
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    n_src = spark.read.format("delta").load(cfg.version_location(2)).count()
    return path, n_src


def _with_output(path, output, dest):
    """The project's job config with `output_location` = output, written to dest (returned)."""
    data = yaml.safe_load(path.read_text())
    data["output_location"] = str(output)
    dest.write_text(yaml.safe_dump(data))
    return dest


def _bcemb(path, *args, jvm_options=""):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "bclib.cli", "backfill", "--config", str(path), *args]
    if jvm_options:
        cmd += ["--conf", f"spark.driver.extraJavaOptions={jvm_options}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _failures(procs, results) -> str:
    """Each failed process's error lines in full (a stderr tail alone is mostly Spark's start-up log)."""
    parts = []
    for proc, (_, stderr) in zip(procs, results):
        if proc.returncode:
            lines = [ln for ln in stderr.splitlines() if "Error" in ln or "ERROR" in ln or "Exception" in ln]
            parts.append(f"rc {proc.returncode}: " + "\n".join(lines[-12:] or stderr.splitlines()[-20:]))
    return "\n---\n".join(parts)


def test_a_held_lease_makes_backfill_exit_75_and_wait_lease_waits(spark, project, capsys, monkeypatch, tmp_path):
    """The CLI's exit code and the wait, run in this process (`bclib.cli.main`, the suite's session): the
    holder is another Lease object, which is all a second process would see. The release happens once the
    waiting run has been refused at least once (a seam on Lease.try_acquire, not a sleep). Two real
    processes on one output: the tests below."""
    import threading

    from bclib.cli import main
    from bclib.tables.delta import table_exists

    project_path, n_src = project
    out = tmp_path / "out1"  # an output of its own: the test can run again on the same module fixture
    path = _with_output(project_path, out, tmp_path / "held.yaml")
    holder = Lease(str(out.parent / "_bcemb_leases" / "out1"), 600).acquire()  # another bcemb process, as far as it can tell
    refused_once = threading.Event()
    try_acquire = Lease.try_acquire

    def seam(self):
        body = try_acquire(self)
        if body is not None and self is not holder:
            refused_once.set()
        return body

    monkeypatch.setattr(Lease, "try_acquire", seam)
    results: dict = {}
    try:
        assert main(["backfill", "--config", str(path)]) == 75  # the exit code `bcemb backfill` returns
        stderr = capsys.readouterr().err
        assert "LeaseHeldError" in stderr and "--wait-lease" in stderr, stderr[-2000:]
        assert not table_exists(spark, str(out))  # nothing written
        refused_once.clear()
        waiting = threading.Thread(target=lambda: results.update(
            rc=main(["backfill", "--config", str(path), "--wait-lease", "600"])))
        waiting.start()
        assert refused_once.wait(timeout=300), "the waiting run never asked for the lease"
        assert waiting.is_alive()  # it waits instead of exiting 75
    finally:
        holder.release()  # the waiting run gets the lease at its next poll
    waiting.join(timeout=600)
    assert results.get("rc") == 0, (results, capsys.readouterr().err[-2000:])
    counts = {r.space_version: r["count"] for r in spark.read.format("delta").load(str(out))
              .groupBy("space_version").count().collect()}
    assert counts == {0: n_src, 1: n_src}


def test_two_backfill_processes_on_one_output_write_once(spark, project, subprocess_jvm_options, tmp_path):
    path, n_src = project
    both = _with_output(path, tmp_path / "out2", tmp_path / "both.yaml")
    procs = [_bcemb(both, "--wait-lease", "600", jvm_options=subprocess_jvm_options) for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    out = str(tmp_path / "out2")
    df = spark.read.format("delta").load(out)
    assert {r.space_version: r["count"] for r in df.groupBy("space_version").count().collect()} == {0: n_src, 1: n_src}
    assert df.groupBy("space_version", "id").count().where("count > 1").count() == 0
    from bclib.tables.delta import delta_table

    writes = [h.operation for h in delta_table(spark, out).history().collect()]
    assert len(writes) == 1, writes  # the second run found the spaces up to date


def _lease_holder_pid(s3: dict, prefix: str):
    """The pid in the newest lease object under `prefix` on the moto server (None: no lease), read with boto3."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3["aws_endpoint"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="bcemb-lease", Prefix=prefix).get("Contents", []))
    if not keys:
        return None
    try:
        return json.loads(client.get_object(Bucket="bcemb-lease", Key=keys[-1])["Body"].read()).get("pid")
    except client.exceptions.NoSuchKey:  # released between the listing and the read
        return None


@pytest.mark.parametrize("first", ["arrow", "spark"])
def test_two_processes_on_one_output_on_an_s3_compatible_store_lose_no_commit(project, subprocess_jvm_options,
                                                                                s3_server, tmp_path, first):
    """The object-store case of the issue: Spark's S3 log store PUTs the next commit without a condition, so
    only the lease keeps two bcemb processes (one on each engine, both told to wait) from both "winning" a
    version. Output on the S3-compatible server, sources on local disk; read back with delta-rs.

    The order is fixed, not raced: the second process starts once the first holds the lease (its pid in the
    newest lease object), so each engine's S3 write is the one tested in one of the two cases."""
    from deltalake import DeltaTable

    path, n_src = project
    data = yaml.safe_load(path.read_text())
    output = f"s3a://bcemb-lease/warehouse/out_{first}"
    data["output_location"] = output
    data["spark"]["conf"] = s3a_jars_conf()
    data["storage"] = {"options": s3_server}  # one set of options: Spark's S3A, pyarrow, delta-rs, the lease
    data["backfill"] = {}
    procs = []
    for engine in (first, "spark" if first == "arrow" else "arrow"):
        data["backfill"]["engine"] = engine
        conf = tmp_path / f"s3_{engine}.yaml"
        conf.write_text(yaml.safe_dump(data))
        procs.append(_bcemb(conf, "--wait-lease", "600", jvm_options=subprocess_jvm_options))
        deadline = time.monotonic() + 300
        while len(procs) == 1 and _lease_holder_pid(s3_server, f"warehouse/_bcemb_leases/out_{first}/") != \
                procs[0].pid:
            assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first process never took the lease"
            time.sleep(0.2)
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], _failures(procs, results)
    table = DeltaTable(output.replace("s3a://", "s3://"), storage_options=s3_server)
    rows = table.to_pyarrow_table(columns=["space_version", "id"]).to_pylist()
    per_space: dict = {}
    for r in rows:
        per_space.setdefault(r["space_version"], []).append(r["id"])
    assert {s: len(ids) for s, ids in per_space.items()} == {0: n_src, 1: n_src}  # nothing lost
    assert all(len(set(ids)) == len(ids) for ids in per_space.values())  # nothing duplicated
    # the log's commits, listed with boto3: delta-rs's history() holds the GIL while it waits for this
    # in-process server's answer (the server's thread needs the GIL), so it would wait for its own timeout
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server["aws_endpoint"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    listing = client.list_objects_v2(Bucket="bcemb-lease", Prefix=f"warehouse/out_{first}/_delta_log/")
    commits = sorted(o["Key"] for o in listing.get("Contents", []) if o["Key"].endswith(".json"))
    infos = [next(json.loads(line)["commitInfo"] for line in client.get_object(
        Bucket="bcemb-lease", Key=key)["Body"].read().decode().splitlines() if '"commitInfo"' in line)
        for key in commits]
    # one process wrote (one commit): the first; the other waited for the lease, then found the spaces up to date
    assert len(infos) == 1 and table.version() == 0, infos
    writer = "spark" if str(infos[0].get("engineInfo", "")).startswith("Apache-Spark") else "arrow"
    assert writer == first, infos


def test_a_lease_lost_before_the_commit_stops_the_run_and_writes_nothing(spark, project, tmp_path):
    import obstore

    from bclib.steps.backfill import run_backfill
    from bclib.tables import commits
    from bclib.tables.delta import table_exists

    path, _ = project
    data = yaml.safe_load(path.read_text())
    data["output_location"] = str(tmp_path / "out3")
    from bclib.config import config_from_dict

    cfg = config_from_dict(data)

    def take_over(stage, location, read_version):  # another process took the lease over while we were paused
        other = Lease(str(tmp_path / "_bcemb_leases" / "out3"), 60)
        gen, _ = other.current()
        other.expires_at = time.time() + 60
        obstore.put(other.store, other._name(gen + 1), other._body(), mode="create")

    with commits.commit_seam(take_over), pytest.raises(LeaseLostError, match="taken over"):
        run_backfill(spark, cfg)
    assert not table_exists(spark, cfg.output_location)
