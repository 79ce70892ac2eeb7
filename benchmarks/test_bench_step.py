"""pytest-benchmark entry for the denoise step: the packed, graph-replayed text2img CFG step of BAGEL-7B-MoT (random
bf16 weights) at 1024², against the torch.compile'd plain PyTorch step doing the same work (GPU only).

    python -m pytest benchmarks/test_bench_step.py --benchmark-only      # on the GPU machine
End to end, batches and every shape: ``python -m benchmarks.bench_step``.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")


@pytest.fixture(scope="module")
def model():
    from bagel_model.core.config import BagelConfig
    from bagel_model.core.model import BagelModel

    m = BagelModel.random(BagelConfig.preset("bagel-7b-mot"), seed=0, dtype=torch.bfloat16, device="cuda")
    m.set_marker_ids(0, 1)
    return m


@pytest.mark.parametrize("impl", ["bagel_packed", "torch_compile_peer"])
def test_text2img_cfg_step_1024(benchmark, model, impl):
    from bagel_model.engine.step import GenJob, PackedStep
    from benchmarks.bench_step import random_context, step_flops
    from benchmarks.peer_torch_step import TorchStep

    grid = model.cfg.check_image_size(1024, 1024)
    n = grid[0] * grid[1]
    ctxs = [random_context(model, 64, 0), random_context(model, 0, 1)]  # full (prompt) and no-text (empty)
    if impl == "bagel_packed":
        eng = PackedStep(model)
        jobs = [GenJob(grid, c) for c in ctxs]
        xs = [torch.randn(n, model.cfg.patch_latent_dim, device="cuda") for _ in jobs]
        fn = lambda: eng(jobs, xs, [0.7, 0.7])  # noqa: E731  (eager once, then captured, then replayed)
    else:
        peer = TorchStep(model, [[ctxs[0].cache.read(i) for i in range(model.cfg.num_layers)], None],
                         [c.rope_position for c in ctxs])
        h_lat = torch.randn(2, n, model.cfg.hidden_size, device="cuda", dtype=model.dtype)
        h_mk = torch.randn(2, 2, model.cfg.hidden_size, device="cuda", dtype=model.dtype)
        for _ in range(2):
            peer(h_lat, h_mk)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            peer(h_lat, h_mk)
        fn = graph.replay

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, warmup_rounds=3)
    benchmark.extra_info["TFLOP/s"] = step_flops(model.cfg, [n + 2] * 2, [64, 0]) / benchmark.stats.stats.median / 1e12
