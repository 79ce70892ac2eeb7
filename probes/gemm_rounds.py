"""Question: why does the routed GEMM stay at 0.87–0.89 of dense cuBLAS on the img2img prefill? Finding (H100, 2026-11-24): its fixed tiles fill only 0.87–0.94 of the rounds a 132-program persistent grid takes there (0.99 at the generation step), and the measurements meet that fill.

``python -m probes.gemm_rounds [--sms 132]`` prints, per token set and projection, the tile plan of
``routed_gemm_gluon`` (row tiles start at each routing segment; 128 x 256 tiles, 128 x 128 x 2 for SwiGLU), the
rounds a persistent grid of one program per SM takes, and the **fill**: useful rows x columns over what those rounds
could compute. A tile costs the same however few of its rows are real, so at equal speed per tile ours / dense
cuBLAS cannot exceed the fill (cuBLAS picks its tile from M; a batch-invariant kernel may not). With the ragged
last round split (``split_tail_wanted``: whole rounds >= 8) the rounds are fractional. No GPU needed.
"""
from __future__ import annotations

import argparse
import math

from bagel_kernels.routed_gemm_gluon import BLOCK_M, _block_n, _row_tiles, _segment_bounds, split_tail_wanted
from benchmarks.shapes import PROJECTIONS, token_sets


def tile_plan(segments: tuple[tuple[int, int, int], ...], n: int, swiglu: bool, sms: int) -> dict:
    """Tiles, rounds (fractional where the last round is split) and fill of one launch."""
    m = segments[-1][1]
    bn = _block_n(swiglu)
    row_tiles = _row_tiles(_segment_bounds(segments, m), m)
    tiles = row_tiles * math.ceil(n / bn)
    rounds = tiles / sms if split_tail_wanted(tiles, sms) else math.ceil(tiles / sms)
    return {"M": m, "N": n, "row_tiles": row_tiles, "dense_row_tiles": round(m / BLOCK_M, 2), "tiles": tiles,
            "rounds": round(rounds, 2), "fill": round(m * n / (rounds * sms * BLOCK_M * bn), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sms", type=int, default=132, help="programs of the persistent grid (H100 SXM: 132)")
    args = ap.parse_args()
    print(f"{'tokens':<20} {'proj':<8} {'row tiles':>9} {'tiles':>6} {'rounds':>7} {'fill':>6}")
    for tname, routing in token_sets().items():
        for pname, n, _, swiglu in PROJECTIONS:
            p = tile_plan(routing.segments, n, swiglu, args.sms)
            print(f"{tname:<20} {pname:<8} {p['row_tiles']:>9} {p['tiles']:>6} {p['rounds']:>7} {p['fill']:>6}")


if __name__ == "__main__":
    main()
