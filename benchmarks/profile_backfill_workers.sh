#!/usr/bin/env bash
# Profile Spark's Python workers with py-spy during one backfill (1M x 256, 1 space): where the Python-side
# time goes. Needs `pip install py-spy` and the source table from
# `python benchmarks/backfill_throughput.py --rows 1000000 --dim 256 --spaces 1` (without --drop-data).
# Writes /tmp/pyspy_<worker>.raw (collapsed stacks); summarise with any flamegraph tool.
cd /work/main
python - <<'PY' &
import sys, time, logging
sys.path.insert(0, "benchmarks")
import backfill_throughput as bt
from bclib.config import SparkSettings
from bclib.spark import get_or_create
from bclib.steps.backfill import run_backfill
spark = get_or_create(SparkSettings(master="local[*]", conf={"spark.driver.memory": "6g"}))
from pathlib import Path
root = bt.DATA / "run_1000000_256_1"
cfg, versions = bt.job_config(root, None, 1, 256, None)
link = Path(cfg.version_location(1)); link.parent.mkdir(parents=True, exist_ok=True)
if not link.exists(): link.symlink_to((bt.DATA / "src_1000000_256").resolve())
bt.setup_registry(spark, cfg, versions, 256)
run_backfill(spark, cfg)  # warm the workers
open("/tmp/pyspy.ready", "w").write("1")
t = time.time(); run_backfill(spark, cfg); print("profiled backfill", time.time() - t)
open("/tmp/pyspy.stop", "w").write("1")
PY
rm -f /tmp/pyspy.ready /tmp/pyspy.stop
while [ ! -f /tmp/pyspy.ready ]; do sleep 1; done
daemon=$(pgrep -f "pyspark.daemon" | sort -n | head -1)
i=0
for w in $(pgrep -P "$daemon"); do
  timeout 40 py-spy record --nonblocking -p "$w" -d 20 -r 100 -f raw -o /tmp/pyspy_$i.raw > /tmp/pyspy_$i.log 2>&1 &
  i=$((i+1))
done
wait
