"""Pieces both Gluon kernels share: the aggregate decorator, the launch-scalar field type and the mbarrier phase.

No ``from __future__ import annotations`` here or in the kernel files: an aggregate's field annotations must be the
Gluon types themselves (Triton 3.6 checks every field with ``isinstance``), not strings.
"""
try:  # Gluon ships with Triton >= 3.5; the project pins 3.6 (CPU CI imports this module, never launches it)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    # Triton 3.6 spells Gluon's aggregate this way (its own float2 helpers do); later releases call it gluon.aggregate.
    from triton.language.core import _aggregate as aggregate
    _HAVE_GLUON = True
except ImportError:  # pragma: no cover - older Triton
    _HAVE_GLUON = False

if _HAVE_GLUON:
    # A launch integer as an aggregate field: a tensor, or a constexpr where Triton specialized the argument (== 1).
    SCALAR = (gl.tensor, gl.constexpr)

    @gluon.constexpr_function
    def field(x):
        """An aggregate constructor's argument as a SCALAR field value: ``gluon.constexpr_function`` hands the
        constructor constexprs unwrapped to Python values, which must be wrapped again."""
        return x if isinstance(x, gl.tensor) else gl.constexpr(x)

    @gluon.jit
    def phase(i, NS: gl.constexpr):
        """The mbarrier phase of ring slot ``i`` (stage ``i % NS``): the parity of the ring pass it is in. A consumer
        waits for it on the stage's "ready" barrier; a producer waits for ``phase ^ 1`` on its "empty" barrier (a
        fresh mbarrier counts as having completed phase 1, so the first pass over the ring does not wait)."""
        return (i // NS) & 1
