"""Blend: many sources -> one endless, prefix-stable stream of draws (source, k-th draw of that source).

Source i is drawn at the fixed "times" (k + 0.5) / share_i, k = 0, 1, ...; the stream is every source's
draws merged in time order (ties: the lower source index first). So:
- at every prefix of the stream, source i has been drawn share_i x position times, give or take one;
- what comes at position p depends on the shares and p only: never on max_steps or the world size, so
  the data position stays one integer and resume, rollback and a new world size keep working;
- any window of positions is computed directly (bisection to its start, then a sort of the draws in
  it), in numpy, without walking the stream from the start.

Shares are of rows: `row_shares` turns token weights into row shares by each source's mean row length,
so the tokens drawn from each source follow the weights (exactly with full packed rows, on average
otherwise).
"""

from __future__ import annotations

import numpy as np


def row_shares(weights, mean_row_tokens) -> np.ndarray:
    """Row shares whose token shares are the weights' (weight_i / mean row tokens_i, normalised)."""
    raw = np.asarray(weights, dtype=np.float64) / np.maximum(np.asarray(mean_row_tokens, np.float64), 1e-9)
    return raw / raw.sum()


class Blend:
    def __init__(self, shares):
        s = np.asarray(shares, dtype=np.float64)
        self.shares = s / s.sum()

    def _drawn_by(self, t: float) -> np.ndarray:
        """Per source: how many of its draws come at a time <= t (the same float times as `draws`)."""
        counts = np.zeros(len(self.shares), dtype=np.int64)
        for i, s in enumerate(self.shares):
            k = max(0, int(np.floor(t * s - 0.5)) + 1)
            while k > 0 and (k - 1 + 0.5) / s > t:
                k -= 1
            while (k + 0.5) / s <= t:
                k += 1
            counts[i] = k
        return counts

    def draws(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, k) of the draws at stream positions start .. start + count - 1."""
        n = len(self.shares)
        if n == 1:
            return np.zeros(count, dtype=np.int64), np.arange(start, start + count, dtype=np.int64)
        t0 = float(max(0, start - n))  # at most start - n/2 draws come at or before t0
        before = self._drawn_by(t0)
        skip = start - int(before.sum())
        need = skip + count
        take = np.ceil((need + n + 1) * self.shares).astype(np.int64) + 2
        while True:
            ks = [before[i] + np.arange(take[i], dtype=np.int64) for i in range(n)]
            times = np.concatenate([(k + 0.5) / self.shares[i] for i, k in enumerate(ks)])
            src = np.concatenate([np.full(len(k), i, dtype=np.int64) for i, k in enumerate(ks)])
            order = np.lexsort((src, times))[:need]
            last = times[order[-1]] if need else t0
            # enough when every source's next undrawn time lies past the last draw taken
            if all((k[-1] + 0.5) / self.shares[i] > last for i, k in enumerate(ks)):
                break
            take *= 2
        order = order[skip:]
        k_all = np.concatenate(ks)
        return src[order], k_all[order]
