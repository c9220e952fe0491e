import os

import pytest
import torch

os.environ.setdefault("OFFLOAD_NO_PROGRESS", "1")

pytest_plugins = ["fixtures_models"]   # smollm2_gguf, smollm2_transformers, smollm2_hf_tokenizer


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
