"""The scheduled job's life: four days of `bcemb run`, registry commands, RESTORE, foreign tables.

Real local Spark + Delta, small tables, the CLI called in-process (its session is the fixture's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bclib.cli import main
from bclib.config import load_config
from bclib.errors import ChecksumError, ForeignTableError
from bclib.tables.delta import current_delta_version, read_delta, table_exists
from conftest import reference_chain

DIMS = [12, 16, 20, 24]


def _write_config(tmp: Path, versions: list[int], **extra) -> Path:
    data = {
        "spark": {"master": "local[2]"},
        "embeddings": {"location": str(tmp / "emb" / "v{version}"), "versions": versions},
        "registry_location": str(tmp / "registry"),
        "output_location": str(tmp / "out"),
        "metrics_location": str(tmp / "metrics"),
        # 1,500 entities: a quarter held out, so that the gate judges on a few hundred (5 % would be ~75)
        "fit": {"sample_size": 100_000, "min_pairs": 50, "holdout": 0.25},
        "backfill": {"deletion_vectors": True},  # day 2's small change is committed incrementally (without: full)
        "evaluate": {"sample_size": 100_000, "label_location": str(tmp / "labels"),
                     "report_dir": str(tmp / "reports"), "neighbours_k": 5, "neighbours_sample": 200},
        "demo": {"n_entities": 1500, "dims": DIMS[: len(versions)], "block_rows": 256, "n_clusters": 6,
                 "latent_dim": 8},
    }
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp / f"job_{len(versions)}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _versions(spark, cfg) -> dict[str, int]:
    """Delta version of every table bcemb writes (-1: not there)."""
    out = {}
    for name in ("registry_location", "output_location", "metrics_location"):
        loc = getattr(cfg, name)
        out[name] = current_delta_version(spark, loc) if table_exists(spark, loc) else -1
    return out


def _load(spark, location, where=None):
    df = spark.read.format("delta").load(location)
    if where:
        df = df.where(where)
    rows = sorted(df.select("id", "vector").collect(), key=lambda r: r.id)
    return np.array([r.id for r in rows]), np.array([r.vector for r in rows], dtype=np.float64)


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("bcemb ")]


def _active(spark, cfg):
    rows = read_delta(spark, cfg.registry_location).where("status = 'active'").collect()
    return {(r.source_version, r.target_version): r for r in rows}


def _expected_space(spark, cfg, space: int, source: int) -> tuple[np.ndarray, np.ndarray]:
    """What a full rewrite gives for `space`: the active chain applied to the current source by the tests' own
    numpy reference (`conftest.reference_chain`), not the product's."""
    from bclib.numerics.serialization import transform_from_bytes

    active = _active(spark, cfg)
    chain = [transform_from_bytes(bytes(active[(k, k - 1)].parameters)) for k in range(source, space, -1)]
    ids, z = _load(spark, cfg.version_location(source))
    return ids, reference_chain(chain, z)


def _joint_transform_file(spark, cfg, tmp: Path) -> Path:
    """Version 3 -> 2 trained with AlignmentLoss (a few hundred Adam steps), exported as registry bytes."""
    import torch

    from bclib.numerics.losses import AlignmentLoss, export_bytes

    ids3, z3 = _load(spark, cfg.version_location(3))
    ids2, z2 = _load(spark, cfg.version_location(2))
    common, a, b = np.intersect1d(ids3, ids2, return_indices=True)
    x, y = torch.from_numpy(z3[a].astype(np.float32)), torch.from_numpy(z2[b].astype(np.float32))
    torch.manual_seed(0)
    align = AlignmentLoss(DIMS[3], DIMS[2], weight=1.0, normalize=True)
    opt = torch.optim.Adam(align.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss = align(x, y)
        loss.backward()
        opt.step()
    data, digest = export_bytes(align)
    path = tmp / "b3_joint.npz"
    path.write_bytes(data)
    (tmp / "b3_joint.sha256").write_text(digest)
    return path


def test_four_days_of_scheduled_runs(spark, tmp_path, capsys):
    from delta.tables import DeltaTable

    from bclib.steps.generate import run_generate

    # ---- day 1: versions 0..2 exist; run publishes spaces 0 and 1
    conf3 = _write_config(tmp_path, [0, 1, 2])
    cfg3 = load_config(conf3)
    run_generate(spark, cfg3)
    code, out, err = _run(["run", "--config", str(conf3)], capsys)
    assert code == 0, err
    active = _active(spark, cfg3)
    assert set(active) == {(1, 0), (2, 1)} and {r.origin for r in active.values()} == {"posthoc"}
    for space in (0, 1):
        ids, want = _expected_space(spark, cfg3, space, 2)
        got_ids, got = _load(spark, cfg3.output_location, f"space_version = {space}")
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    gate_rows = read_delta(spark, cfg3.metrics_location).where("metric = 'gate'").collect()
    assert {r.space_version for r in gate_rows} == {0, 1} and all(r.value == 1.0 for r in gate_rows)

    # ---- the same day again: nothing changed, nothing committed
    before = _versions(spark, cfg3)
    code, out, err = _run(["run", "--config", str(conf3)], capsys)
    assert code == 0, err
    assert _versions(spark, cfg3) == before
    assert "0 commit(s)" in out

    # ---- day 2: a few entities of version 2 are re-embedded, added and deleted; no refit, one MERGE
    src = DeltaTable.forPath(spark, cfg3.version_location(2))
    ids2, z2 = _load(spark, cfg3.version_location(2))
    changed = ids2[:5]
    rng = np.random.default_rng(5)
    updates = spark.createDataFrame([(int(i), (z2[k] + 0.05 * rng.normal(size=DIMS[2])).astype(np.float32).tolist())
                                     for k, i in enumerate(changed)], "id long, vector array<float>")
    src.alias("t").merge(updates.alias("s"), "t.id = s.id").whenMatchedUpdateAll().execute()
    new = spark.createDataFrame([(10**6 + i, rng.normal(size=DIMS[2]).astype(np.float32).tolist()) for i in range(3)],
                                "id long, vector array<float>")
    new.write.format("delta").mode("append").save(cfg3.version_location(2))
    src.delete(f"id IN ({int(ids2[10])}, {int(ids2[11])})")
    reg_before = current_delta_version(spark, cfg3.registry_location)
    out_before = current_delta_version(spark, cfg3.output_location)
    code, out, err = _run(["run", "--config", str(conf3)], capsys)
    assert code == 0, err
    assert current_delta_version(spark, cfg3.registry_location) == reg_before  # every transform kept
    assert current_delta_version(spark, cfg3.output_location) == out_before + 1  # one commit
    assert "evaluate: 2 of 3 (source, space) pairs (those this run changed)" in out  # the merged spaces only
    last = DeltaTable.forPath(spark, cfg3.output_location).history(1).first()
    # INSERT REPLACE ON: a WRITE whose parameters hold the replaceOn condition
    assert last.operation == "WRITE" and json.loads(last.userMetadata)["mode"] == "incremental"
    assert "bcemb_replace_keys_" in str(last.operationParameters), last.operationParameters
    for space in (0, 1):  # the same content as a full rewrite
        ids, want = _expected_space(spark, cfg3, space, 2)
        got_ids, got = _load(spark, cfg3.output_location, f"space_version = {space}")
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # ---- day 3: version 3 arrives with a jointly trained 3 -> 2, imported; run fits nothing for that edge
    conf4 = _write_config(tmp_path, [0, 1, 2, 3], demo={"overwrite": None})
    cfg4 = load_config(conf4)
    run_generate(spark, cfg4)  # writes version 3 (and regenerates the demo's own tables 0..2)
    joint = _joint_transform_file(spark, cfg4, tmp_path)
    digest = (tmp_path / "b3_joint.sha256").read_text()
    code, out, err = _run(["registry", "import", str(joint), "--source", "3", "--target", "2", "--origin", "joint",
                           "--checksum", digest, "--config", str(conf4)], capsys)
    assert code == 0, err
    joint_id = _active(spark, cfg4)[(3, 2)].transform_id
    code, out, err = _run(["run", "--config", str(conf4)], capsys)
    assert code == 0, err
    active = _active(spark, cfg4)
    assert "evaluate: 3 of 6 (source, space) pairs (those this run changed)" in out  # the rewritten spaces
    assert active[(3, 2)].transform_id == joint_id and active[(3, 2)].origin == "joint"
    assert set(active) == {(1, 0), (2, 1), (3, 2)}
    for space in (0, 1, 2):
        ids, want = _expected_space(spark, cfg4, space, 3)
        got_ids, got = _load(spark, cfg4.output_location, f"space_version = {space}")
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # ---- day 4: a deliberately bad transform is activated; run exits 3 and publishes nothing
    from bclib.numerics.serialization import transform_to_bytes
    from bclib.numerics.transforms import AffineTransform

    bad = tmp_path / "bad.npz"
    bad.write_bytes(transform_to_bytes(AffineTransform(np.random.default_rng(9).normal(size=(DIMS[3], DIMS[2])))))
    code, out, err = _run(["registry", "import", str(bad), "--source", "3", "--target", "2",
                           "--config", str(conf4)], capsys)
    assert code == 0, err
    out_version = current_delta_version(spark, cfg4.output_location)
    code, out, err = _run(["run", "--config", str(conf4)], capsys)
    assert code == 3
    assert len(err) == 1 and err[0].startswith("bcemb run: GateRejectedError: ") and "space 2" in err[0]
    assert current_delta_version(spark, cfg4.output_location) == out_version
    code, out, err = _run(["registry", "list", "--json", "--config", str(conf4)], capsys)
    listed = {r["transform_id"]: r for r in json.loads(out)}
    bad_id = _active(spark, cfg4)[(3, 2)].transform_id
    assert listed[bad_id]["gate"] == "rejected" and listed[joint_id]["gate"] == "passed"
    # roll back: the previous transform again, and service is restored (the output already holds its chain)
    code, out, err = _run(["registry", "activate", joint_id, "--reason", "bad import", "--config", str(conf4)], capsys)
    assert code == 0, err
    code, out, err = _run(["run", "--config", str(conf4)], capsys)
    assert code == 0, err
    assert current_delta_version(spark, cfg4.output_location) == out_version
    code, out, err = _run(["status", "--json", "--config", str(conf4)], capsys)
    status = json.loads(out)
    assert [s["state"] for s in status["spaces"]] == ["current"] * 3
    history = DeltaTable.forPath(spark, cfg4.registry_location).history(1).first()
    meta = json.loads(history.userMetadata)
    assert meta["action"] == "activate" and meta["reason"] == "bad import" and meta["actor"]


def test_restore_of_the_output_makes_run_rewrite(spark, tmp_path, capsys):
    from delta.tables import DeltaTable

    from bclib.steps.generate import run_generate

    conf = _write_config(tmp_path, [0, 1, 2])
    cfg = load_config(conf)
    run_generate(spark, cfg)
    assert _run(["run", "--config", str(conf)], capsys)[0] == 0
    DeltaTable.forPath(spark, cfg.output_location).delete("space_version = 0")  # someone deletes a space
    assert _run(["run", "--config", str(conf)], capsys)[0] == 0
    ids, want = _expected_space(spark, cfg, 0, 2)
    got_ids, got = _load(spark, cfg.output_location, "space_version = 0")
    np.testing.assert_array_equal(got_ids, ids)
    DeltaTable.forPath(spark, cfg.output_location).restoreToVersion(0)
    code, out, err = _run(["status", "--config", str(conf)], capsys)
    assert "not written by bcemb" in out
    assert _run(["run", "--config", str(conf)], capsys)[0] == 0
    last = DeltaTable.forPath(spark, cfg.output_location).history(1).first()
    assert last.operation == "WRITE" and json.loads(last.userMetadata)["mode"] == "full"
    for space in (0, 1):
        ids, want = _expected_space(spark, cfg, space, 2)
        got_ids, got = _load(spark, cfg.output_location, f"space_version = {space}")
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_generate_refuses_a_table_it_did_not_create(spark, tmp_path):
    from bclib.steps.generate import run_generate

    cfg = load_config(_write_config(tmp_path, [0, 1]))
    foreign = spark.createDataFrame([(1, [1.0] * 12)], "id long, vector array<float>")
    foreign.write.format("delta").save(cfg.version_location(0))
    before = current_delta_version(spark, cfg.version_location(0))
    with pytest.raises(ForeignTableError, match=r"embedding version 0 table '.*v0' exists and was not created by "
                                                r"`bcemb generate`.*--set demo.overwrite=true"):
        run_generate(spark, cfg)
    assert current_delta_version(spark, cfg.version_location(0)) == before
    assert read_delta(spark, cfg.version_location(0)).count() == 1
    forced = load_config(_write_config(tmp_path, [0, 1], demo={"overwrite": True}))
    assert run_generate(spark, forced).counts[0] > 1000


def test_registry_commands_and_a_tampered_checksum(spark, tmp_path, capsys):
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    from bclib.steps.fit import run_fit
    from bclib.steps.generate import run_generate

    conf = _write_config(tmp_path, [0, 1, 2])
    cfg = load_config(conf)
    run_generate(spark, cfg)
    first = {r.edge: r.transform_id for r in run_fit(spark, cfg).records}
    # refit an edge explicitly with another config: the old one is retired in the same commit
    refit = run_fit(spark, load_config(conf, {"transform.ridge": 0.01}), refit=["2:1"])
    assert refit.fitted == [(2, 1)] and refit.kept == [(1, 0)]
    code, out, err = _run(["registry", "list", "--json", "--config", str(conf)], capsys)
    rows = json.loads(out)
    assert {(r["edge"], r["status"]) for r in rows} == {("1->0", "active"), ("2->1", "active"), ("2->1", "retired")}
    code, out, err = _run(["registry", "show", first[(2, 1)], "--json", "--config", str(conf)], capsys)
    shown = json.loads(out)
    assert shown["status"] == "retired" and shown["checksum_ok"] and shown["origin"] == "posthoc"
    assert _run(["registry", "activate", first[(2, 1)], "--config", str(conf)], capsys)[0] == 0
    assert _active(spark, cfg)[(2, 1)].transform_id == first[(2, 1)]
    assert _run(["registry", "retire", first[(1, 0)], "--reason", "test", "--config", str(conf)], capsys)[0] == 0
    assert (1, 0) not in _active(spark, cfg)
    code, out, err = _run(["backfill", "--config", str(conf)], capsys)
    assert code == 1 and "RegistryError: no active transform for edge 1 -> 0" in err[0]
    assert _run(["registry", "verify", "--config", str(conf)], capsys)[0] == 0
    # tamper with one transform's stored parameters: verify names it, exit 1
    victim = first[(2, 1)]
    DeltaTable.forPath(spark, cfg.registry_location).update(
        F.col("transform_id") == F.lit(victim),
        {"parameters": F.concat(F.col("parameters"), F.lit(b"\x00").cast("binary"))})
    code, out, err = _run(["registry", "verify", "--config", str(conf)], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("bcemb registry verify: ChecksumError: ")
    assert f"transform {victim}" in err[0]
    # an import whose checksum does not match the file is refused, nothing committed
    version = current_delta_version(spark, cfg.registry_location)
    from bclib.numerics.serialization import transform_to_bytes
    from bclib.numerics.transforms import AffineTransform

    f = tmp_path / "t.npz"
    f.write_bytes(transform_to_bytes(AffineTransform(np.eye(20)[:, :16])))
    code, out, err = _run(["registry", "import", str(f), "--source", "2", "--target", "1", "--checksum", "0" * 64,
                           "--config", str(conf)], capsys)
    assert code == 1 and "ChecksumError" in err[0]
    wrong_dims = tmp_path / "w.npz"
    wrong_dims.write_bytes(transform_to_bytes(AffineTransform(np.eye(16)[:, :12])))
    code, out, err = _run(["registry", "import", str(wrong_dims), "--source", "2", "--target", "1",
                           "--config", str(conf)], capsys)
    assert code == 1 and "DimensionMismatchError" in err[0] and "input dimension is 16 but version 2's vectors have 20" \
        in err[0]
    assert current_delta_version(spark, cfg.registry_location) == version
    with pytest.raises(ChecksumError):
        from bclib.tables.registry import active_transforms

        cfg_active = active_transforms(spark, cfg.registry_location)  # the tampered one is active: refused on load
        del cfg_active


def test_a_run_killed_before_its_evaluate_is_scored_by_the_rerun(spark, tmp_path):
    """The fit and backfill committed, the process died before evaluate (kill -9 in the field): the rerun fits
    nothing and writes nothing, and scores exactly the pairs left unscored; a third run scores nothing."""
    from bclib.steps.backfill import run_backfill
    from bclib.steps.run import run_scheduled
    from bclib.tables.metrics_table import scored_chains
    from conftest import generated_and_fitted

    cfg = generated_and_fitted(spark, tmp_path)  # versions 0, 1, 2 fitted; nothing scored yet
    run_backfill(spark, cfg)
    assert scored_chains(spark, cfg.metrics_location) == set()
    rerun = run_scheduled(spark, cfg)
    assert rerun.fit.committed == [] and rerun.backfill.skipped
    assert rerun.evaluate is not None
    assert sorted((p.source_version, p.space_version) for p in rerun.evaluate.pairs) == [(1, 0), (2, 0), (2, 1)]
    assert {(s, j) for s, j, _ in scored_chains(spark, cfg.metrics_location)} == {(1, 0), (2, 0), (2, 1)}
    assert run_scheduled(spark, cfg).evaluate is None
