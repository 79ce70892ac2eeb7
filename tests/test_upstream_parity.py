"""Parity with ByteDance-Seed/Bagel's own code: the project must compute what upstream computes.

``fixtures/bagel_upstream_tiny`` holds a tiny random-weight BAGEL-MoT checkpoint in the released layout and the
tensors upstream's unmodified modeling code (commit 056b5fd, InterleaveInferencer path, fp32 CPU, exact softmax)
produced from it: a text-to-image case, an image-editing case and a greedy text answer (see its README). Everything
here goes through the public loader and entry points, from upstream's own inputs (prompt ids, initial noise, the
VAE posterior's noise, upstream's x_t at each step), and must agree to fp32 rounding: relative error <= 1e-5 at
every stage, the same uint8 image up to +-1, the same token ids.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from bagel_model.engine.cfg import combine_cfg
from bagel_model.core.checkpoint import from_pretrained, save_pretrained
from bagel_model.core.sampling import SamplingParams
from bagel_model.engine.denoise import DenoiseRequest, denoise, timestep_schedule
from bagel_model.engine.kv_cache import Context
from bagel_model.engine.output import decode_latent
from bagel_model.engine.prefill import TextBlock, prefill, vae_block, vit_block
from bagel_model.engine.step import PackedStep
from bagel_model.oracle import branch_velocity
from bagel_model.pipeline import BagelPipeline
from bagel_model.serving.stages import Request, run_stage0
from bagel_model.core.transforms import to_pixels
from scripts.upstream_parity_report import params_of, rel  # one reading of the fixture's parameters

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "bagel_upstream_tiny")
RTOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    return torch.load(os.path.join(FIXTURE, "reference.pt"), weights_only=True)


@pytest.fixture(scope="module")
def loaded(ref):
    """The fixture loaded like any checkpoint; it has no tokenizer files, so BAGEL's special ids come from its
    ``new_token_ids`` and prompts are given as token ids."""
    model, tok = from_pretrained(FIXTURE, byte_tokenizer=True)  # the fixture has no tokenizer files: ids are given
    tok = tok.with_special_ids(ref["meta"]["new_token_ids"])
    BagelPipeline(model, tok)  # sets the vision marker ids
    return model, tok


def assert_kv_matches(ctx: Context, upstream: dict, what: str) -> None:
    assert ctx.cache.length == upstream["seq_len"], what
    for layer, (k_ref, v_ref) in enumerate(zip(upstream["key"], upstream["value"])):
        k, v = ctx.cache.read(layer)
        assert rel(k, k_ref) < RTOL and rel(v, v_ref) < RTOL, f"{what} layer {layer}: K {rel(k, k_ref):.2e} V {rel(v, v_ref):.2e}"


# ---- the checkpoint ------------------------------------------------------------------------------------------------
def test_release_config_with_vae_downsample_loads(ref, loaded):
    model, _ = loaded
    assert model.cfg.vae.downsample == ref["meta"]["vae_config"]["downsample"] == 8
    assert model.cfg.vae.ch_mult == tuple(ref["meta"]["vae_config"]["ch_mult"])


def test_vit_patch_embedding_is_the_release_linear_over_row_column_channel_patches(loaded):
    """The release stores the Conv2d (E, 3, p, p) as the Linear (E, p*p*3) over (row, column, channel)-flattened
    patches; loading must invert exactly that, and saving must write it back."""
    model, _ = loaded
    conv = model.vit_model.vision_model.embeddings.patch_embedding.weight
    key = "vit_model.vision_model.embeddings.patch_embedding.weight"
    with safe_open(os.path.join(FIXTURE, "ema.safetensors"), "pt") as f:
        stored = f.get_tensor(key).float()
    assert torch.equal(conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1), stored)


def test_save_writes_the_release_layout_back(loaded, tmp_path):
    model, _ = loaded
    save_pretrained(model, str(tmp_path))
    key = "vit_model.vision_model.embeddings.patch_embedding.weight"
    with safe_open(os.path.join(FIXTURE, "ema.safetensors"), "pt") as a, \
            safe_open(os.path.join(tmp_path, "ema.safetensors"), "pt") as b:
        assert torch.equal(b.get_tensor(key), a.get_tensor(key).float())
    again, _ = from_pretrained(str(tmp_path), byte_tokenizer=True)
    assert torch.equal(again.vit_model.vision_model.embeddings.patch_embedding.weight,
                       model.vit_model.vision_model.embeddings.patch_embedding.weight)


# ---- text-to-image -------------------------------------------------------------------------------------------------
def test_t2i_prefill_kv(ref, loaded):
    model, tok = loaded
    case = ref["cases"]["t2i_cfg3"]
    r0 = run_stage0(model, tok, Request("text2img", "", params_of(case), prompt_ids=ref["meta"]["prompt_ids"]))
    assert_kv_matches(r0.diffusion.contexts["full"], case["contexts"]["gen"], "t2i full context")
    assert r0.diffusion.contexts["text"].length == case["contexts"]["cfg_text"]["seq_len"] == 0


def _image_case(ref, loaded, name: str, contexts: dict[str, Context]) -> None:
    """Per-branch (the oracle) and CFG-combined velocities at every step from upstream's x_t, then the whole denoise
    (the packed step) from upstream's initial noise, the final latent and the decoded image."""
    model, _ = loaded
    case = ref["cases"][name]
    p = params_of(case)
    ts, dts = timestep_schedule(p.steps, p.timestep_shift)
    assert torch.allclose(torch.tensor(ts), case["timesteps"]) and torch.allclose(torch.tensor(dts), case["dts"])
    grid = model.cfg.check_image_size(p.height, p.width)
    for i, step in enumerate(case["steps"]):
        vs = {b: branch_velocity(model, step["x_t"], step["t"], grid, contexts[b], 16) for b in ("full", "text", "img")}
        for ours, theirs in (("full", "v_gen"), ("text", "v_cfg_text"), ("img", "v_cfg_img")):
            assert rel(vs[ours], step[theirs]) < RTOL, f"{name} step {i} {ours}: {rel(vs[ours], step[theirs]):.2e}"
        v = combine_cfg(vs["full"], vs["text"], vs["img"], text_scale=step["cfg_text_scale_used"],
                        img_scale=step["cfg_img_scale_used"], renorm_min=p.cfg_renorm_min,
                        renorm_type=p.cfg_renorm_type)
        assert rel(v, step["v_t"]) < RTOL, f"{name} step {i} combined: {rel(v, step['v_t']):.2e}"
    (x,) = denoise([DenoiseRequest(case["init_noise"], p, grid, contexts)], PackedStep(model), progress=False)
    assert rel(x, case["final_latent"]) < RTOL, f"{name} final latent: {rel(x, case['final_latent']):.2e}"
    image = decode_latent(model, x, grid)
    assert (image.int() - case["image_uint8"].int()).abs().max() <= 1


def test_t2i_velocities_final_latent_and_image(ref, loaded):
    model, tok = loaded
    case = ref["cases"]["t2i_cfg3"]
    r0 = run_stage0(model, tok, Request("text2img", "", params_of(case), prompt_ids=ref["meta"]["prompt_ids"]))
    _image_case(ref, loaded, "t2i_cfg3", r0.diffusion.contexts)


# ---- image editing -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def edit_contexts(ref, loaded) -> dict[str, Context]:
    """The editing contexts from upstream's input image and its VAE posterior noise: full = [VAE, ViT, text],
    no-text = [VAE, ViT], no-image = [text]."""
    model, tok = loaded
    case = ref["cases"]["edit_cfg3_64x64"]
    image = case["input_image_uint8"]
    vae = vae_block(model, image, seed=0, noise=case["vae_encode"]["eps"])
    vit = vit_block(model, image)
    text = TextBlock(tok.wrap_prompt_ids(ref["meta"]["prompt_ids"], model.cfg.llm.vocab_size))
    return {"full": prefill(model, [vae, vit, text])[0], "text": prefill(model, [vae, vit])[0],
            "img": prefill(model, [text])[0]}


def test_edit_vae_latents(ref, loaded):
    model, _ = loaded
    enc = ref["cases"]["edit_cfg3_64x64"]["vae_encode"]
    image = ref["cases"]["edit_cfg3_64x64"]["input_image_uint8"]
    assert torch.equal(to_pixels(image), enc["input"])  # ToTensor + Normalize(0.5, 0.5), bit for bit
    z = model.vae.encode(to_pixels(image), noise=enc["eps"])
    assert rel(z, enc["z"]) < RTOL


def test_edit_vit_embeddings(ref, loaded):
    """The ViT block's rows (connector output + position embedding) are the ViT context call's input rows."""
    model, _ = loaded
    case = ref["cases"]["edit_cfg3_64x64"]
    call = next(c for c in case["context_calls"] if c["phase"] == "context_vit_image")
    emb = vit_block(model, case["input_image_uint8"]).embeddings
    assert emb.shape[0] == call["input"].shape[0] - 2
    assert rel(emb, call["input"][1:-1]) < RTOL


def test_vit_of_a_non_square_image_is_upstreams_navit_packing(loaded):
    """Upstream's recipe, written out from the release's tensors: a 48x64 image is a 6x8 grid of 8-pixel patches,
    each flattened (row, column, channel) through the stored Linear, plus SigLIP's position embedding at
    row * vit_max_num_patch_per_side + column; then SigLIP's layers, post-LayerNorm, connector, vit_pos_embed."""
    model, _ = loaded
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (48, 64, 3), generator=g, dtype=torch.uint8)
    p, side = model.cfg.vit.patch_size, model.cfg.vit_max_num_patch_per_side
    with safe_open(os.path.join(FIXTURE, "ema.safetensors"), "pt") as f:
        lin_w = f.get_tensor("vit_model.vision_model.embeddings.patch_embedding.weight").float()
        lin_b = f.get_tensor("vit_model.vision_model.embeddings.patch_embedding.bias").float()
    x = to_pixels(image)[0]  # (3, 48, 64)
    patches = torch.einsum("chpwq->hwpqc", x.reshape(3, 6, p, 8, p)).reshape(48, p * p * 3)  # upstream's patchify
    ids = (torch.arange(6)[:, None] * side + torch.arange(8)[None, :]).reshape(-1)
    vm = model.vit_model.vision_model
    h = patches @ lin_w.T + lin_b + vm.embeddings.position_embedding(ids)
    h = vm.post_layernorm(vm.encoder(inputs_embeds=h[None]).last_hidden_state[0])
    want = model.connector(h) + model.vit_pos_embed(ids)
    got = vit_block(model, image).embeddings
    assert got.shape == (48, model.cfg.hidden_size)
    assert rel(got, want) < RTOL


def test_edit_prefill_kv(ref, edit_contexts):
    ups = ref["cases"]["edit_cfg3_64x64"]["contexts"]
    for ours, theirs in (("full", "gen"), ("text", "cfg_text"), ("img", "cfg_img")):
        assert_kv_matches(edit_contexts[ours], ups[theirs], f"edit {ours} context")


def test_edit_velocities_final_latent_and_image(ref, loaded, edit_contexts):
    _image_case(ref, loaded, "edit_cfg3_64x64", edit_contexts)


# ---- text answers --------------------------------------------------------------------------------------------------
def test_text_answer_token_ids(ref, loaded):
    """Upstream feeds <|im_start|> after the prompt and decodes greedily from it; its ``max_length`` 8 counts that
    start token, so the answer is the 7 ids after it (and would never include <|im_end|>)."""
    model, tok = loaded
    case = ref["cases"]["text2text"]
    assert int(case["generated_ids"][0]) == tok.special["bos_token_id"]
    answer = case["generated_ids"][1:].tolist()
    r0 = run_stage0(model, tok, Request("text2text", "", SamplingParams(), max_tokens=len(answer),
                                        prompt_ids=ref["meta"]["prompt_ids"]))
    assert r0.text_ids == answer


def test_text_answer_excludes_the_end_of_turn_token(ref, loaded, monkeypatch):
    """Upstream stops before <|im_end|>: the end-of-turn token is not part of the answer (ids nor text)."""
    import bagel_model.serving.stages as stages

    model, tok = loaded
    eos = tok.special["eos_token_id"]
    monkeypatch.setattr(stages, "greedy_decode", lambda *a, **k: [113, 238, eos])
    r0 = run_stage0(model, tok, Request("text2text", "", SamplingParams(), max_tokens=7,
                                        prompt_ids=ref["meta"]["prompt_ids"]))
    assert r0.text_ids == [113, 238]


def test_vae_posterior_sample_is_unclamped_like_upstreams(loaded):
    """Upstream's DiagonalGaussian samples mean + exp(logvar / 2) * eps with no clamp of the log-variance."""
    model, _ = loaded

    class Moments(torch.nn.Module):  # an encoder whose log-variance is far outside [-30, 20]
        def forward(self, x):
            return torch.cat([torch.zeros(1, 16, 2, 2), torch.full((1, 16, 2, 2), 50.0)], 1)

    vae = model.vae
    real, vae.encoder = vae.encoder, Moments()
    try:
        eps = torch.full((1, 16, 2, 2), 1e-6)
        z = vae.encode(torch.zeros(1, 3, 16, 16), noise=eps)
    finally:
        vae.encoder = real
    want = vae.cfg.scale_factor * (torch.exp(torch.tensor(25.0)) * 1e-6 - vae.cfg.shift_factor)
    assert torch.allclose(z, torch.full_like(z, float(want)), rtol=1e-6)
