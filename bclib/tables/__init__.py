"""Delta/Spark I/O: embedding versions and hash sampling, the registry, the output and metrics tables.

May import `bclib.numerics`, never `bclib.steps`.
"""
