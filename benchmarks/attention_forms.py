"""Exact forms of STSAM's cross-date attention, timed against the padded-Q/K SDPA kernel the torch path uses.

For each FSG-Net level of a tile (stride 4/8/16: C = 64/128/256 channels, N = (tile/stride)^2 positions,
Q/K at C/8) and a batch, the same softmax(Q K) V computed as:

* ``sdpa``: Q and K zero-padded to C, one fused ``scaled_dot_product_attention`` call (the torch default);
* ``chunked-R``: unpadded, R query rows at a time, both directions batched (``bmm``, softmax, ``bmm``);
* ``per-pair-R``: the same one pair and direction at a time (smaller score blocks, more calls).

Calls interleaved round by round; printed: best ms, ratio to sdpa in the same run, max difference::

    python benchmarks/attention_forms.py --tile 256 --batch 4 --threads 2
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch
    import torch.nn.functional as F

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"tile {args.tile}, batch {args.batch}, {args.threads} thread(s), best of {args.rounds} interleaved rounds")
    print("| level | form | best ms | vs sdpa | max diff |")
    print("|---|---|---:|---:|---:|")
    for stride, c in ((4, 64), (8, 128), (16, 256)):
        n, d, b = (args.tile // stride) ** 2, c // 8, args.batch
        q = torch.randn(2 * b, n, d)  # both directions of each pair: 2B query sets
        k = torch.randn(2 * b, d, n)
        v = torch.randn(2 * b, n, c)
        qp = F.pad(q, (0, c - d)).reshape(b, 2, n, c)
        kp = F.pad(k.transpose(1, 2), (0, c - d)).reshape(b, 2, n, c)
        v4 = v.reshape(b, 2, n, c)

        def sdpa(qp=qp, kp=kp, v4=v4, b=b, n=n, c=c):
            return F.scaled_dot_product_attention(qp, kp, v4, scale=1.0).reshape(2 * b, n, c)

        def chunked(rows, q=q, k=k, v=v, n=n):
            return torch.cat([torch.bmm(torch.softmax(torch.bmm(q[:, s : s + rows], k), -1), v)
                              for s in range(0, n, rows)], 1)

        def per_pair(rows, q=q, k=k, v=v, n=n):
            return torch.stack([torch.cat([torch.softmax(q[i, s : s + rows] @ k[i], -1) @ v[i]
                                           for s in range(0, n, rows)]) for i in range(q.shape[0])])

        forms = {"sdpa": sdpa}
        for rows in (32, 64, 256):
            forms[f"chunked-{rows}"] = lambda rows=rows, f=chunked: f(rows)
        for rows in (32, 128):
            forms[f"per-pair-{rows}"] = lambda rows=rows, f=per_pair: f(rows)
        ref = sdpa()
        diffs = {name: float((f() - ref).abs().max()) for name, f in forms.items()}  # also the warm-up
        best = {name: float("inf") for name in forms}
        for _ in range(args.rounds):
            for name, f in forms.items():
                t = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t)
        for name in forms:
            print(f"| stride {stride} (C {c}, N {n}) | {name} | {best[name] * 1e3:.1f} | "
                  f"{best['sdpa'] / best[name]:.2f} | {diffs[name]:.1e} |")


if __name__ == "__main__":
    main()
