"""Prompt lookup for the tree's top-1 chain (vLLM's own matcher, batched)."""

from __future__ import annotations

import numpy as np

from medusa_vllm.engine.ngram import NgramLookup


def _buffer(rows: list[list[int]], width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's host token buffer: one row per request, prompt + output, then padding."""
    buf = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        buf[i, : len(r)] = r
    return buf, np.array([len(r) for r in rows], dtype=np.int32)


def test_continuation_of_the_matched_ngram_per_request():
    lookup = NgramLookup(min_n=2, max_n=5, k=3, max_model_len=64, max_num_seqs=4)
    buf, n = _buffer([
        [1, 2, 3, 4, 5, 9, 9, 1, 2, 3],  # suffix 1 2 3 occurred at the start: 4 5 9 follow
        [10, 11, 12, 13],  # no repeated n-gram
        [7, 8, 6, 7, 8],  # suffix 7 8 occurred at the start: 6 7 8 follow
        [1, 2, 3, 4, 5, 9, 9, 1, 2, 3],  # same as row 0, but not asked for
    ])
    out = lookup.drafts(buf, n, [0, 1, 2])
    assert out.tolist() == [[4, 5, 9], [-1, -1, -1], [6, 7, 8], [-1, -1, -1]]


def test_no_rows_and_min_length():
    lookup = NgramLookup(min_n=3, max_n=3, k=2, max_model_len=64, max_num_seqs=2)
    buf, n = _buffer([[5, 6, 5, 6], [1, 2, 3, 1, 2, 3]])
    assert lookup.drafts(buf, n, []).tolist() == [[-1, -1], [-1, -1]]
    # a 2-token repeat is below min_n=3; a 3-token one is found
    assert lookup.drafts(buf, n, [0, 1]).tolist() == [[-1, -1], [1, 2]]


def test_buffers_grow_with_the_batch():
    lookup = NgramLookup(min_n=1, max_n=2, k=1, max_model_len=64, max_num_seqs=1)
    buf, n = _buffer([[3, 4, 3], [8, 9, 8], [1, 2]])
    assert lookup.drafts(buf, n, [0, 1, 2]).tolist() == [[4], [9], [-1]]


def test_the_matcher_runs_on_one_numba_thread_and_restores_the_count(monkeypatch):
    import numba

    lookup = NgramLookup(min_n=2, max_n=3, k=2, max_model_len=64, max_num_seqs=2)
    calls = []
    real = numba.set_num_threads
    monkeypatch.setattr(numba, "set_num_threads", lambda n: (calls.append(n), real(n)))
    before = numba.get_num_threads()
    buf, n = _buffer([[1, 2, 3, 1, 2]])
    assert lookup.drafts(buf, n, [0]).tolist() == [[3, 1]]
    assert calls == [1, before] and numba.get_num_threads() == before
