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


def test_a_run_scores_the_pairs_it_changed_not_the_square_of_the_history():
    from bclib.steps.evaluate import all_pairs, changed_pairs

    versions = list(range(29))  # 28 edges; spaces 0, 7, 14, 21, 27 pinned
    pinned = [0, 7, 14, 21, 27]
    assert len(all_pairs(versions)) == 406
    new_version = changed_pairs(versions, pinned, 28, edges=[(28, 27)], written_spaces=pinned)
    assert new_version == [(28, 27), (28, 21), (28, 14), (28, 7), (28, 0)]  # 5, whatever the history's length
    assert len(changed_pairs(list(range(5)), [0, 1, 2, 3], 4, [(4, 3)], [0, 1, 2, 3])) == 4
    # an old edge refitted changes every pair whose chain crosses it, toward pinned spaces and its own step
    refit = changed_pairs(versions, pinned, 28, edges=[(8, 7)], written_spaces=[0, 7])
    assert (8, 7) in refit and (9, 7) in refit and (28, 0) in refit and (28, 7) in refit
    assert (9, 8) not in refit and (28, 14) not in refit and (6, 0) not in refit
    # only the data changed (a MERGE of the source's new rows): the written spaces' pairs
    assert changed_pairs(versions, pinned, 28, edges=[], written_spaces=[14]) == [(28, 14)]
    assert changed_pairs(versions, pinned, 28, edges=[], written_spaces=[]) == []


def test_pairs_an_earlier_run_committed_but_never_scored_are_scored_by_the_rerun():
    """A run killed between its fit (or backfill) commit and its evaluate: the rerun changes nothing, yet the
    pairs whose active chain has no evaluate rows are scored (`unscored_pairs`), the others are not."""
    import numpy as np

    from bclib.numerics.records import chain_id, chain_records
    from bclib.numerics.transforms import AffineTransform
    from bclib.steps.evaluate import scored_candidates, unscored_pairs

    versions, pinned = [0, 1, 2, 3], [0]
    active = {(k, k - 1): TransformRecord(f"t{k}", k, k - 1, "linear", "single_step", AffineTransform(np.eye(2)))
              for k in (1, 2, 3)}
    candidates = scored_candidates(versions, pinned)
    assert sorted(candidates) == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 2)]
    chains = {(s, j): chain_id(chain_records(active, versions, s, j)) for s, j in candidates}
    everything = {(s, j, c) for (s, j), c in chains.items()}
    assert unscored_pairs(active, versions, pinned, everything) == []
    # the killed run's new edge 1 -> 0 was committed but (1, 0), (2, 0), (3, 0) were scored on the old chains
    stale = {(s, j, c if 0 not in (j,) else "an-older-chain") for (s, j), c in chains.items()}
    assert sorted(unscored_pairs(active, versions, pinned, stale)) == [(1, 0), (2, 0), (3, 0)]
    assert sorted(unscored_pairs(active, versions, pinned, set())) == sorted(candidates)
    # an edge without an active transform: its pairs cannot be scored and are left out
    partial = {e: r for e, r in active.items() if e != (2, 1)}
    assert sorted(unscored_pairs(partial, versions, pinned, set())) == [(1, 0), (3, 2)]
