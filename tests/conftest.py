import os
import shutil

# Set before torch/triton are imported: without a GPU, Triton kernels run in its interpreter
# (how CI tests them); on a GPU machine they compile for real.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Tests run on CPU; DeepSpeed must not look for a GPU.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

# wandb must never reach the network from a test.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests are skipped where there is no CUDA device, with the reason said."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reset_kernel_backend():
    """Code under test (bench_step, the training loop) may pick a kernel backend in-process; no test
    may inherit another's choice."""
    import eva_kernels

    yield
    eva_kernels.set_backend(None)
