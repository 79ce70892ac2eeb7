import os

# The Triton interpreter must be chosen before triton is imported anywhere: kernel tests run the very kernels the
# GPU compiles, on the CPU. Model code on CPU still dispatches to the plain-torch reference unless asked otherwise.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cfg():
    from bagel_model.core.config import BagelConfig

    return BagelConfig.preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    from bagel_model.core.model import BagelModel

    m = BagelModel.random(tiny_cfg, seed=0)
    m.set_marker_ids(258, 259)
    return m


@pytest.fixture(scope="session")
def tokenizer():
    from bagel_model.core.tokenizer import BagelTokenizer

    return BagelTokenizer.from_directory(None)
