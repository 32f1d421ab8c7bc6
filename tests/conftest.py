"""Test-wide settings: never touch the network, keep runs deterministic and small."""

import os

# Set before anything imports huggingface_hub: a hub miss then fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def fashion_mnist_dir():
    """The Fashion-MNIST IDX folder installed by `apt-get install -y dataset-fashion-mnist`."""
    if not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.fail(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR}; install it with "
            "`apt-get install -y dataset-fashion-mnist` (.ci/run does this)."
        )
    return FASHION_MNIST_DIR
