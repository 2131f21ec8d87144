"""The one-line summaries a scheduler's log keeps stay one short line however long the history (no Spark)."""

from bclib.numerics.records import TransformRecord
from bclib.steps.fit import FitResult, edge_runs


def test_consecutive_edges_collapse_into_runs_and_the_rest_is_counted():
    assert edge_runs([(4, 3), (3, 2), (2, 1), (1, 0)]) == "4->0 (4 edges)"
    assert edge_runs([(2, 1), (5, 3), (3, 2)]) == "5->3, 3->1 (2 edges)"  # a skip edge starts a run of its own
    assert edge_runs([]) == "none"
    assert edge_runs([(9, 8), (7, 6), (5, 4), (3, 2), (1, 0)]) == "9->8, 7->6, 5->4, 3->2 and 1 more edge(s)"


def test_the_fit_line_at_28_edges_is_short():
    edges = [(k, k - 1) for k in range(28, 0, -1)]
    result = FitResult(records=[TransformRecord.__new__(TransformRecord) for _ in edges], fitted=edges[:1],
                       kept=edges[1:], seconds=8.4)
    line = result.summary()
    assert line == "fit: 28 edge(s): fitted 28->27, kept 27->0 (27 edges); 0 transform(s) activated in 8.4s"
    assert len(line) < 120


def test_a_libraries_multi_line_coloured_error_becomes_one_clean_line():
    from bclib.errors import one_line

    raw = "Generic S3 error:\n  \x1b[31mError after 3 retries\x1b[0m in 1.2s,\n\tmax_retries: 3\n" + "x" * 400
    line = one_line(raw, 120)
    assert "\n" not in line and "\x1b" not in line and len(line) == 120 and line.endswith("...")
    assert line.startswith("Generic S3 error: Error after 3 retries in 1.2s, max_retries: 3 xxx")
    assert one_line("short") == "short"
