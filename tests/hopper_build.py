"""Compile a Gluon (or Triton) kernel for sm_90a on any machine (Triton builds the cubin on the CPU) and summarize the PTX.

Used by the Gluon kernels' build tests. The compile runs in a fresh process without the Triton interpreter: under
the suite's TRITON_INTERPRET=1 Triton's own helpers (tl.cdiv ...) are interpreter objects and a real build fails."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys


def compile_for_hopper(fn, args: dict, consts: dict, num_warps: int, maxnreg: int | None = None,
                       num_stages: int | None = None, gluon: bool = True):
    """``fn`` (a gluon.jit kernel, or a triton.jit one with ``gluon=False``) built for sm_90a from example ``args``
    (tensors, descriptors, ints) and ``consts`` (its constexpr arguments); ``maxnreg`` / ``num_stages`` are passed
    to the compiler when given."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    signature, constexprs = {}, {}
    defaults = {prm.name: prm.default for prm in fn.params if prm.default is not inspect.Parameter.empty}
    for i, name in enumerate(fn.arg_names):
        if name in consts or (name not in args and name in defaults):  # a constexpr left out: its default
            signature[name], constexprs[(i,)] = "constexpr", consts.get(name, defaults.get(name))
        else:
            signature[name] = mangle_type(args[name])
    options = dict(num_warps=num_warps)
    options.update({k: v for k, v in (("maxnreg", maxnreg), ("num_stages", num_stages)) if v is not None})
    source = (GluonASTSource if gluon else ASTSource)(fn, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def ptx_facts(compiled) -> dict:
    """What the build tests check: Hopper target, wgmma, warp-specialized register split, TMA, shared memory."""
    ptx = compiled.asm["ptx"]
    return {"sm_90a": ".target sm_90a" in ptx, "wgmma": "wgmma.mma_async" in ptx, "setmaxnreg": "setmaxnreg" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx, "shared": compiled.metadata.shared}


def report_from_child(test_file: str, timeout: int = 900) -> list[dict]:
    """Run ``test_file`` as a script without the interpreter; its last stdout line is the JSON build report."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, test_file], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
