"""Pure numpy/torch: transform families, fits, losses, metrics, the executor kernel, serialisation.

Nothing in this package imports pyspark or delta (tests/test_layers.py enforces it); executors need
only numpy and pyarrow from it, the driver adds torch for the torch fits and joint-training losses.
"""
