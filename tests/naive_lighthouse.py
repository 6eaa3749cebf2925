"""An independent, deliberately naive Lighthouse implementation written from the specification.

Python loops over batch, heads, tiles and entries, float64 math and explicit softmax: slow but
obviously right, and sharing no code with lighthouse_hf. It also implements the package's
documented rule for sequences the published method does not define (coarse level padded at the
end with entries that score below every real entry and whose outputs are dropped).
"""

from __future__ import annotations

import math

import torch


def naive_lighthouse(q, k, v, levels, pooling, topk, scale=None):
    """Returns (output float64 [B, H, S, D], entries) with entries[b][h] = [(key, level, j), ...]
    in causal order and key exact (a Fraction-free float: keys here are multiples of 2**-levels)."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, seq, dim = q.shape
    group = heads // k.shape[1]
    scale = 1 / math.sqrt(dim) if scale is None else scale
    coarse_width = pooling ** (levels - 1)
    n_real = seq // coarse_width
    tiles = topk // 128
    tile_len = max(128, -(-n_real // tiles))
    n_padded = tiles * tile_len
    padded_len = n_padded * coarse_width
    out = torch.zeros(batch, heads, seq, dim, dtype=torch.float64)
    all_entries = []
    for b in range(batch):
        all_entries.append([])
        for h in range(heads):
            qh, kh, vh = q[b, h], k[b, h // group], v[b, h // group]

            norms = {id(qh): qh.float().norm(dim=-1).tolist(), id(kh): kh.float().norm(dim=-1).tolist()}

            def norm_score(x, level, j):
                # scores are float32 norms, as the specification asks
                width = pooling**level
                values = [norms[id(x)][t] for t in range(j * width, (j + 1) * width) if t < n_real * coarse_width]
                return max(values) if values else -1.0

            def pooled(x, level, j):
                width = pooling**level
                rows = [x[t] if t < seq else torch.zeros(dim, dtype=torch.float64) for t in range(j * width, (j + 1) * width)]
                return torch.stack(rows).mean(0)

            entries = []
            for t in range(tiles):
                candidates = list(range(t * tile_len, (t + 1) * tile_len))
                for level in range(levels - 1, 0, -1):
                    width = pooling**level
                    by_q = sorted(candidates, key=lambda j: -norm_score(qh, level, j))[:64]
                    rest = [j for j in candidates if j not in by_q]
                    by_k = sorted(rest, key=lambda j: -norm_score(kh, level, j))[:64]
                    chosen = set(by_q) | set(by_k)
                    for j in candidates:
                        key = (j + 1) * width - 2.0 ** (-level) if j in chosen else j * width
                        entries.append((key, level, j))
                    candidates = sorted(j * pooling + r for j in chosen for r in range(pooling))
                entries.extend((float(i), 0, i) for i in candidates)
            entries.sort()
            all_entries[b].append(entries)

            q_sel = torch.stack([pooled(qh, lv, j) for _, lv, j in entries])
            k_sel = torch.stack([pooled(kh, lv, j) for _, lv, j in entries])
            v_sel = torch.stack([pooled(vh, lv, j) for _, lv, j in entries])
            scores = (q_sel @ k_sel.T) * scale
            n = len(entries)
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            o = scores.softmax(-1) @ v_sel
            for (key, level, j), row in zip(entries, o):
                width = pooling**level
                if j * width >= n_real * coarse_width:  # padding entry: dropped
                    continue
                for t in range(j * width + width - 1, min(seq, j * width + 2 * width - 1)):
                    out[b, h, t] += row
    assert padded_len >= n_real * coarse_width
    return out, all_entries
