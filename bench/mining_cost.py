"""Cost of exact top-k neighbour mining (tfssl.mining) on this machine, projected to ImageNet-1k.

Times :func:`tfssl.mining.topk_neighbours` on random embeddings (after one warm-up call that traces), reports the
achieved GFLOP/s (2·N²·D) and projects the time of one mining of N = 1,281,167 images, plus the memory terms of the
module docstring for the chosen chunks.

    python bench/mining_cost.py --n 20000 --dims 512 2048 --query-chunk 1024 --bank-chunk 65536
"""
import argparse
import time

import numpy as np

from tfssl.mining import topk_neighbours

IMAGENET = 1_281_167


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--query-chunk", type=int, default=1024)
    ap.add_argument("--bank-chunk", type=int, default=65536)
    a = ap.parse_args()
    block = a.query_chunk * a.bank_chunk * 4
    print(f"similarity block {a.query_chunk}x{a.bank_chunk} float32 = {block / 1e6:.0f} MB; "
          f"table {IMAGENET}x{a.k} int32 = {IMAGENET * a.k * 4 / 1e6:.1f} MB")
    rng = np.random.default_rng(0)
    for d in a.dims:
        x = rng.normal(size=(a.n, d)).astype(np.float32)
        topk_neighbours(x[: a.k + 2], a.k, a.query_chunk, a.bank_chunk)            # trace once
        t0 = time.perf_counter()
        topk_neighbours(x, a.k, a.query_chunk, a.bank_chunk).numpy()
        sec = time.perf_counter() - t0
        gflops = 2 * a.n * a.n * d / sec / 1e9
        full = 2 * IMAGENET ** 2 * d
        print(f"D={d}: N={a.n} in {sec:.2f}s = {gflops:.1f} GFLOP/s; ImageNet: embeddings "
              f"{IMAGENET * d * 4 / 1e9:.2f} GB, {full / 1e15:.2f} PFLOP -> {full / gflops / 1e9 / 3600:.1f} h "
              f"here, {full / 14e12 / 60:.1f} min at 14 TFLOP/s")


if __name__ == "__main__":
    main()
