"""The MoT layer against a straightforward per-token float64 reference."""
import math

import torch

from bagel_kernels import ExpertSegments
from bagel_kernels.attention_reference import naive_attention
from bagel_model.core.layers import LayerInputs, local_attention
from bagel_model.core.model import BagelModel


def _rms(x, w, eps):
    return w.double() * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    f = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([f, f], -1).cos()[:, None], torch.cat([f, f], -1).sin()[:, None]
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def per_token_layer(layer, x, gen_flags, pos, theta, ctx_k=None, ctx_v=None):
    """Each token through its own expert's weights, one token at a time, in float64."""
    a = layer.self_attn
    eps = layer.input_layernorm.eps
    W = lambda mod: (mod.weight.double(), None if mod.bias is None else mod.bias.double())
    def lin(mod, t):
        w, b = W(mod)
        return t @ w.T + (0 if b is None else b)
    x = x.double()
    qs, ks, vs = [], [], []
    for i in range(x.shape[0]):
        sfx = "_moe_gen" if gen_flags[i] else ""
        h = _rms(x[i:i + 1], getattr(layer, "input_layernorm" + sfx).weight, eps)
        q = lin(getattr(a, "q_proj" + sfx), h).view(1, a.num_heads, a.head_dim)
        k = lin(getattr(a, "k_proj" + sfx), h).view(1, a.num_kv_heads, a.head_dim)
        v = lin(getattr(a, "v_proj" + sfx), h).view(1, a.num_kv_heads, a.head_dim)
        q = _rms(q, getattr(a, "q_norm" + sfx).weight, eps)
        k = _rms(k, getattr(a, "k_norm" + sfx).weight, eps)
        qs.append(_rope(q, pos[i:i + 1], theta)); ks.append(_rope(k, pos[i:i + 1], theta)); vs.append(v)
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    if ctx_k is not None:
        k, v = torch.cat([ctx_k.double(), k]), torch.cat([ctx_v.double(), v])
    o = naive_attention(q, k, v, 1 / math.sqrt(a.head_dim)).reshape(x.shape[0], -1)
    out = []
    for i in range(x.shape[0]):
        sfx = "_moe_gen" if gen_flags[i] else ""
        y = x[i:i + 1] + lin(getattr(a, "o_proj" + sfx), o[i:i + 1])
        h = _rms(y, getattr(layer, "post_attention_layernorm" + sfx).weight, eps)
        mlp = getattr(layer, "mlp" + sfx)
        g, u = lin(mlp.gate_proj, h), lin(mlp.up_proj, h)
        out.append(y + lin(mlp.down_proj, torch.nn.functional.silu(g) * u))
    return torch.cat(out)


def _perturb_norms(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "norm" in n and p.dim() == 1:
            p.data.add_(0.1 * torch.randn(p.shape, generator=g))


def test_layer_matches_per_token_reference_with_mixed_routing(tiny_cfg):
    model = BagelModel.random(tiny_cfg, seed=1)
    _perturb_norms(model)
    layer = model.language_model.model.layers[0]
    n = 21
    flags = [False] + [True] * 18 + [False, True]
    x = torch.randn(n, tiny_cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5, 5 + n)
    cos, sin = model._cos_sin(pos)
    li = LayerInputs(routing=ExpertSegments.from_flags(flags), cos=cos, sin=sin, gen_mode=True)
    ctx_k = torch.randn(7, tiny_cfg.num_kv_heads, tiny_cfg.head_dim)
    ctx_v = torch.randn(7, tiny_cfg.num_kv_heads, tiny_cfg.head_dim)
    from bagel_kernels import ContiguousKV
    attn = local_attention([ContiguousKV(ctx_k, ctx_v)] * tiny_cfg.num_layers, n)
    got = layer(x, li, attn)
    want = per_token_layer(layer, x, flags, pos, tiny_cfg.rope_theta, ctx_k, ctx_v)
    assert got.shape == (n, tiny_cfg.hidden_size)
    assert torch.isfinite(got).all()
    rel = (got.double() - want).norm() / want.norm()
    assert rel < 1e-5, rel


def test_experts_really_differ_by_route(tiny_cfg):
    """Routing a token to the other expert changes its output: the reference is not comparing one expert to itself."""
    model = BagelModel.random(tiny_cfg, seed=1)
    layer = model.language_model.model.layers[0]
    x = torch.randn(4, tiny_cfg.hidden_size)
    cos, sin = model._cos_sin(torch.zeros(4, dtype=torch.long))
    attn = local_attention([], 4)
    und = layer(x, LayerInputs(ExpertSegments.uniform(4, False), cos, sin, True), attn)
    gen = layer(x, LayerInputs(ExpertSegments.uniform(4, True), cos, sin, True), attn)
    assert not torch.allclose(und, gen)


def test_routing_segments_from_flags():
    r = ExpertSegments.from_flags([False, True, True, False, True])
    assert r.segments == ((0, 1, False), (1, 3, True), (3, 4, False), (4, 5, True))
    assert r.slice(2, 5).segments == ((0, 1, True), (1, 2, False), (2, 3, True))
    assert r.gen_mask().tolist() == [False, True, True, False, True]
