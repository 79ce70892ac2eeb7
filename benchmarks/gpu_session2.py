"""Second GPU call: locate the synchronizing op of the denoise step (traceback), and a layer-count-reduced
full-size step timing split into attention vs the rest."""
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bagel_model.config import BagelConfig  # noqa: E402
from bagel_model.model import BagelModel, BranchContext, make_gen_sequence  # noqa: E402
from bagel_model.pipeline import single_device_velocities  # noqa: E402
from bagel_model.sync_guard import forbid_host_sync  # noqa: E402
from bagel_kernels import token_alignment  # noqa: E402

cfg = BagelConfig.preset("bagel-7b-mot")
cfg.llm.num_hidden_layers = 2
model = BagelModel.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
model.set_marker_ids(151652, 151653)
ctx = model.prefill_text(list(range(100, 164)))
contexts = {"full": ctx, "text": BranchContext.empty(cfg.num_layers), "img": ctx}
seq = make_gen_sequence(cfg, 1024, 1024, 1, token_alignment("cuda"))
fn = single_device_velocities(model, seq, contexts)
x = torch.randn(seq.n_latent, 64, device="cuda")
fn(x, 0.9, ("full",))
torch.cuda.synchronize()
try:
    with forbid_host_sync(cuda=True):
        fn(x, 0.9, ("full", "text", "img"))
    torch.cuda.synchronize()
    print("SYNC-FREE: passed")
except Exception:
    traceback.print_exc()
