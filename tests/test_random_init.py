"""Random weights are a pure function of (seed, parameter name, element index): the same on every device, every
GPU partition and however the fill is chunked (torch's CUDA generator follows the launch grid, i.e. the SM count)."""
import torch

from bagel_model.core.config import BagelConfig
from bagel_model.core.model import BagelModel, counter_normal_


def test_counter_normal_does_not_depend_on_how_the_fill_is_cut():
    whole = counter_normal_(torch.empty(100_003), 0.02, 0, "layers.0.mlp.down_proj.weight")
    cut = counter_normal_(torch.empty(100_003), 0.02, 0, "layers.0.mlp.down_proj.weight", chunk=4096)
    assert torch.equal(whole, cut)


def test_counter_normal_is_standard_normal_and_keyed_by_seed_and_name():
    a = counter_normal_(torch.empty(400_000), 1.0, 0, "w")
    assert abs(a.mean().item()) < 0.01 and abs(a.std().item() - 1.0) < 0.01 and torch.isfinite(a).all()
    assert (a.abs() > 3).float().mean().item() < 0.004  # normal tails, not uniform
    for other in (counter_normal_(torch.empty(400_000), 1.0, 1, "w"), counter_normal_(torch.empty(400_000), 1.0, 0, "v")):
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1].item()) < 0.01


def test_random_model_is_reproducible():
    cfg = BagelConfig.preset("tiny")
    a = BagelModel.random(cfg, seed=3, dtype=torch.bfloat16)
    b = BagelModel.random(cfg, seed=3, dtype=torch.bfloat16)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
