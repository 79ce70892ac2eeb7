"""KernelOptions: typed, validated, passed explicitly; the environment override is the documented one only."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import bagel_kernels as bk
from bagel_kernels import KernelOptions
from bagel_kernels.options import ENV_OVERRIDE


def test_defaults_are_exact_auto_with_the_graph_decoder():
    assert KernelOptions() == KernelOptions(backend="auto", mode="exact", attention_schedule="auto", decode_graph=True,
                                           quantization="none")


@pytest.mark.parametrize("field,bad", [("backend", "cudnn"), ("mode", "fastest"), ("attention_schedule", "zigzag"),
                                               ("quantization", "int4")])
def test_an_unknown_value_is_an_error_naming_the_choices(field, bad):
    with pytest.raises(ValueError, match="expected one of") as e:
        KernelOptions(**{field: bad})
    assert repr(bad) in str(e.value)


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        KernelOptions().mode = "fast"  # type: ignore[misc]


def test_from_env_reads_only_the_documented_override():
    env = {"BAGEL_KERNELS_BACKEND": "reference", "BAGEL_KERNELS_MODE": "fast", "BAGEL_ATTN_GLUON": "0",
           "BAGEL_DECODE_GRAPH": "0"}
    assert KernelOptions.from_env(env) == KernelOptions(backend="reference", mode="fast")
    assert KernelOptions.from_env({}) == KernelOptions()
    assert set(ENV_OVERRIDE) == {"BAGEL_KERNELS_BACKEND", "BAGEL_KERNELS_MODE"}  # README's table
    with pytest.raises(ValueError, match="unknown kernel mode"):
        KernelOptions.from_env({"BAGEL_KERNELS_MODE": "turbo"})


def test_backend_gluon_on_cpu_tensors_is_an_error():
    x = torch.zeros(4, 8)
    with pytest.raises(RuntimeError, match="gluon"):
        bk.invariant_linear(x, torch.zeros(3, 8), options=KernelOptions(backend="gluon"))


def test_options_must_be_kernel_options():
    with pytest.raises(TypeError, match="KernelOptions"):
        bk.invariant_linear(torch.zeros(4, 8), torch.zeros(3, 8), options="fast")  # type: ignore[arg-type]


def test_token_alignment_follows_the_backend():
    assert bk.token_alignment("cpu", KernelOptions(backend="triton")) == 128
    assert bk.token_alignment("cpu", KernelOptions(backend="reference")) == bk.token_alignment("cpu")


def test_the_model_carries_its_options_into_every_forward(monkeypatch):
    from bagel_model.core.config import BagelConfig
    from bagel_model.core.model import BagelModel

    opts = KernelOptions(mode="fast", decode_graph=False)
    m = BagelModel.random(BagelConfig.preset("tiny"), kernels=opts)
    assert m.kernels is opts
    seen = []
    orig = bk.routed_linear

    import bagel_model.core.layers as layers

    def spy(*a, options=None, **k):
        seen.append(options)
        return orig(*a, options=options, **k)

    monkeypatch.setattr(layers, "routed_linear", spy)
    from bagel_model.engine.prefill import TextBlock, prefill

    prefill(m, [TextBlock([256, 10, 257])])
    assert seen and all(o is opts for o in seen)
