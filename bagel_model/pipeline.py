"""Text-to-image generation with the thin BAGEL model (single device; parallel runs plug in their velocity function)."""
from __future__ import annotations

from bagel_kernels import token_alignment

from .denoise import DenoiseRequest, SamplingParams, VelocityFn, denoise, denoise_batch, initial_noise
from .denoise_step import PackedStep
# The generation pieces moved to ``generation`` (stages needs them, and stages must not import pipeline); they are
# re-exported here for existing callers.
from .generation import (GenerationResult, decode_latent, single_device_velocities, tensor_md5,  # noqa: F401
                         text_to_image_contexts)
from .model import BagelModel, GenSequence, make_gen_sequence
from .stages import IMAGE_OUT, run_stage0, run_stage1_batch
from .tokenizer import BagelTokenizer


class BagelPipeline:
    def __init__(self, model: BagelModel, tokenizer: BagelTokenizer):
        self.model, self.tokenizer = model, tokenizer
        model.set_marker_ids(tokenizer.special["start_of_image"], tokenizer.special["end_of_image"])

    def generate(self, req, kv_layout: str = "flash_attn", progress: bool = False, engine=None):
        """Any mode through both stages in this process (single stage). Returns (stage-0 result, image result or
        None for text outputs). The split runs (``bagel_model.stages.run_split_threads``,
        ``bagel_model.split.run_split_processes``) give the same image bit for bit."""
        return self.generate_batch([req], kv_layout, progress, engine)[0]

    def generate_batch(self, reqs: list, kv_layout: str = "flash_attn", progress: bool = False, engine=None) -> list:
        """Several requests at once (any modes, prompts, seeds, sizes, step counts, CFG settings): stage 0 for each,
        then ONE batched denoise in which every step packs the CFG jobs of all image requests still running into one
        forward. Returns one (stage-0 result, image result or None) per request, each bit-identical to running the
        request alone (the batch-invariance contract: no row's arithmetic depends on the other rows)."""
        if not reqs:
            raise ValueError("generate_batch needs at least one request")
        ids = [r.request_id for r in reqs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request ids must be unique within a batch, got {ids}")
        r0s = [run_stage0(self.model, self.tokenizer, r) for r in reqs]
        img = [i for i, r in enumerate(reqs) if r.mode in IMAGE_OUT]
        r1s: list = [None] * len(reqs)
        if img:
            outs = run_stage1_batch(self.model, [r0s[i].payload for i in img], [r0s[i].contexts for i in img],
                                    kv_layout, progress=progress, engine=engine)
            for i, o in zip(img, outs):
                r1s[i] = o
        return list(zip(r0s, r1s))

    def text_to_image(self, prompt: str, params: SamplingParams, progress: bool = True,
                      velocities: VelocityFn | None = None, seq: GenSequence | None = None,
                      engine=None) -> GenerationResult:
        """Text to image with the prompt's contexts prefilled contiguously (the sweep's path). ``velocities``
        (with ``seq``) runs the per-branch reference loop instead of the packed step."""
        params.validate()
        contexts = text_to_image_contexts(self.model, self.tokenizer, prompt)
        grid = self.model.cfg.check_image_size(params.height, params.width)
        x0 = initial_noise(grid[0] * grid[1], self.model.cfg.patch_latent_dim, params.seed).to(self.model.device)
        if velocities is not None:
            seq = seq or make_gen_sequence(self.model.cfg, params.height, params.width, 1,
                                           token_alignment(self.model.device, self.model.kernels))
            x = denoise(x0, params, velocities, progress=progress)
        else:
            engine = engine if engine is not None else PackedStep(self.model)
            (x,) = denoise_batch([DenoiseRequest(x0, params, grid, contexts)], engine, progress=progress)
        image = decode_latent(self.model, x, grid)
        return GenerationResult(latent=x, image=image, latent_md5=tensor_md5(x), image_md5=tensor_md5(image))
