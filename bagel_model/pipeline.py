"""Text-to-image generation with the thin BAGEL model (single device; parallel runs plug in their velocity function)."""
from __future__ import annotations

from bagel_kernels import token_alignment

from .denoise import SamplingParams, VelocityFn, denoise, initial_noise
# The generation pieces moved to ``generation`` (stages needs them, and stages must not import pipeline); they are
# re-exported here for existing callers.
from .generation import (GenerationResult, decode_latent, single_device_velocities, tensor_md5,  # noqa: F401
                         text_to_image_contexts)
from .model import BagelModel, GenSequence, make_gen_sequence
from .stages import IMAGE_OUT, run_stage0, run_stage1
from .tokenizer import BagelTokenizer


class BagelPipeline:
    def __init__(self, model: BagelModel, tokenizer: BagelTokenizer):
        self.model, self.tokenizer = model, tokenizer
        model.set_marker_ids(tokenizer.special["start_of_image"], tokenizer.special["end_of_image"])

    def generate(self, req, kv_layout: str = "flash_attn", progress: bool = False):
        """Any mode through both stages in this process (single stage). Returns (stage-0 result, image result or
        None for text outputs). The split runs (``bagel_model.stages.run_split_threads``,
        ``bagel_model.split.run_split_processes``) give the same image bit for bit."""
        r0 = run_stage0(self.model, self.tokenizer, req)
        r1 = run_stage1(self.model, r0.payload, r0.contexts, kv_layout, progress=progress) if req.mode in IMAGE_OUT else None
        return r0, r1

    def text_to_image(self, prompt: str, params: SamplingParams, progress: bool = True,
                      velocities: VelocityFn | None = None, seq: GenSequence | None = None) -> GenerationResult:
        params.validate()
        seq = seq or make_gen_sequence(self.model.cfg, params.height, params.width, 1,
                                       token_alignment(self.model.device, self.model.kernels))
        contexts = text_to_image_contexts(self.model, self.tokenizer, prompt)
        fn = velocities or single_device_velocities(self.model, seq, contexts)
        x0 = initial_noise(seq.n_latent, self.model.cfg.patch_latent_dim, params.seed).to(self.model.device)
        x = denoise(x0, params, fn, progress=progress)
        image = decode_latent(self.model, x, seq)
        return GenerationResult(latent=x, image=image, latent_md5=tensor_md5(x), image_md5=tensor_md5(image))
