"""The end-to-end cluster probe's dispatch (``probes.gemm_cluster_e2e``) hands the CUDA kernel exactly the launches it
supports, in its C signature's argument order, and every other launch to the shipped Gluon kernel unchanged. The
probe's GPU run checks the bits; this checks, on the CPU, that a wrong argument order or a launch the kernel cannot
take would not reach the GPU."""
import importlib

import pytest
import torch

e2e = importlib.import_module("probes.gemm_cluster_e2e")


class FakeLib:
    def __init__(self):
        self.calls = []

    def bk_routed_gemm_cluster(self, *args):
        self.calls.append(args)
        return 0


@pytest.fixture
def dispatch(monkeypatch):
    lib, shipped = FakeLib(), []
    monkeypatch.setattr(e2e, "GLUON", lambda *args: shipped.append(args) or "gluon")
    return e2e.cluster_dispatch(lib, clusters=66), lib, shipped


def bf16(*shape):
    return torch.zeros(*shape, dtype=torch.bfloat16)


def test_a_two_segment_launch_goes_to_the_cuda_kernel_with_its_bounds(dispatch):
    run, lib, shipped = dispatch
    x, w, res = bf16(300, 128), bf16(2, 1, 512, 128), bf16(300, 512)
    out = run(x, w, None, None, False, res, segments=((0, 4, 0), (4, 300, 1)))
    assert not shipped and out.shape == (300, 512)
    (args,) = lib.calls
    assert args[:5] == (x.data_ptr(), w.data_ptr(), out.data_ptr(), None, res.data_ptr())
    # M, N, K, E, P, then the segment bounds b1, b2, b3 and the first segment's expert, the row strides, clusters
    assert args[5:17] == (300, 512, 128, 2, 1, 4, 300, 300, 0, 512, 512, 66)


def test_one_expert_without_segments_is_one_segment(dispatch):
    run, lib, _ = dispatch
    run(bf16(70, 64), bf16(1, 2, 256, 64), bf16(1, 2, 256), None, True)
    (args,) = lib.calls
    assert args[5:14] == (70, 256, 64, 1, 2, 70, 70, 70, 0) and args[3] is not None  # SwiGLU with its bias


@pytest.mark.parametrize("case", ["swiglu+residual", "bias+residual", "five segments", "ids only", "fp16",
                                  "three experts", "ragged N", "ragged K"])
def test_launches_the_cuda_kernel_cannot_take_go_to_the_gluon_kernel(dispatch, case):
    run, lib, shipped = dispatch
    x, w, bias, res, seg = bf16(20, 128), bf16(2, 1, 256, 128), None, None, ((0, 10, 0), (10, 20, 1))
    swiglu = False
    if case == "swiglu+residual":
        w, res, swiglu = bf16(2, 2, 256, 128), bf16(20, 256), True
    elif case == "bias+residual":
        bias, res = bf16(2, 1, 256), bf16(20, 256)
    elif case == "five segments":
        seg = tuple((4 * i, 4 * i + 4, i % 2) for i in range(5))
    elif case == "ids only":
        seg = None
    elif case == "fp16":
        x, w = x.half(), w.half()
    elif case == "three experts":
        w, seg = bf16(3, 1, 256, 128), ((0, 10, 0), (10, 20, 2))
    elif case == "ragged N":
        w = bf16(2, 1, 200, 128)
    elif case == "ragged K":
        x, w = bf16(20, 96), bf16(2, 1, 256, 96)
    assert run(x, w, bias, None, swiglu, res, segments=seg) == "gluon"
    assert not lib.calls and len(shipped) == 1 and shipped[0][0] is x
