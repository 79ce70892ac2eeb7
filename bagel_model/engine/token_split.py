"""Token split for sequence parallelism: contiguous chunks, padding only at the global tail.

Each of ``degree`` ranks holds ``chunk`` rows, ``chunk = ceil(n / degree)`` rounded up to a multiple of ``align``
(the attention kernel's KV block), so every real token keeps its block position in every layout (docs/DESIGN.md §3).
The single-device run is the same split with degree 1.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenSplit:
    n: int
    degree: int = 1
    align: int = 16

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"token split needs at least one token, got {self.n}")
        if self.degree < 1:
            raise ValueError(f"parallel degree must be >= 1, got {self.degree}")
        if self.align < 1:
            raise ValueError(f"alignment must be >= 1, got {self.align}")

    @property
    def chunk(self) -> int:
        per = -(-self.n // self.degree)
        return -(-per // self.align) * self.align

    @property
    def padded(self) -> int:
        return self.chunk * self.degree

    def rows(self, rank: int) -> tuple[int, int]:
        """Global row range [start, end) held by ``rank`` (may be all padding on the last ranks)."""
        if not 0 <= rank < self.degree:
            raise ValueError(f"rank {rank} outside a split of degree {self.degree}")
        return rank * self.chunk, (rank + 1) * self.chunk

    def valid(self, rank: int) -> int:
        """How many of ``rank``'s rows are real tokens."""
        s, e = self.rows(rank)
        return max(0, min(e, self.n) - s)
