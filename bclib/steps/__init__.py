"""One module per step; each exposes `run_<step>(spark, cfg) -> <Step>Result`.

Steps compose `bclib.tables` (reads, commits) and `bclib.numerics` (math); the CLI and `jobs/` call them.
"""
