"""Prompt lookup for the tree's top-1 chain: per request, the continuation of the
longest n-gram of its recent tokens found earlier in its own prompt and output.

The matcher is vLLM's own (``vllm.v1.spec_decode.ngram_proposer``, numba, the
one behind ``method: "ngram"``), run over the batch in one call on the host
token buffer vLLM keeps for every request (``InputBatch.token_ids_cpu``). As vLLM's
``NgramProposer`` does, the call runs on one numba thread (parallel numba threads
would compete with the model's OpenMP threads for the same cores), and it is
compiled when the engine starts, not on the first request that needs it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["NgramLookup"]


class NgramLookup:
    """Batched prompt lookup with preallocated buffers (one per engine)."""

    def __init__(self, min_n: int, max_n: int, k: int, max_model_len: int,
                 max_num_seqs: int) -> None:
        self.min_n, self.max_n, self.k, self.max_model_len = min_n, max_n, k, max_model_len
        self._drafts = np.zeros((max_num_seqs, k), dtype=np.int32)
        self._counts = np.zeros(max_num_seqs, dtype=np.int32)
        # numba compiles on the first call: pay it at start-up
        self.drafts(np.zeros((1, 2 * max_n + 1), dtype=np.int32),
                    np.array([2 * max_n + 1], dtype=np.int32), [0])

    def drafts(self, token_ids: np.ndarray, num_tokens: np.ndarray, rows: list[int]) -> np.ndarray:
        """``[len(num_tokens), k]`` continuation tokens of ``rows`` (others, and
        positions past a short continuation, are ``-1``).

        ``token_ids[i, :num_tokens[i]]`` is request ``i``'s prompt + output so far.
        """
        from numba import get_num_threads, set_num_threads
        from vllm.v1.spec_decode.ngram_proposer import batch_propose_numba

        b = len(num_tokens)
        out = np.full((b, self.k), -1, dtype=np.int64)
        if not rows:
            return out
        if b > self._counts.shape[0]:
            self._drafts = np.zeros((b, self.k), dtype=np.int32)
            self._counts = np.zeros(b, dtype=np.int32)
        self._counts[:b] = 0
        threads = get_num_threads()
        set_num_threads(1)
        try:
            batch_propose_numba(list(rows), np.asarray(num_tokens), token_ids, self.min_n,
                                self.max_n, self.max_model_len, self.k, self._drafts, self._counts)
        finally:
            set_num_threads(threads)
        for i in rows:
            n = int(self._counts[i])
            out[i, :n] = self._drafts[i, :n]
        return out
