"""Test-wide settings: no network access to the Hugging Face Hub, and a fixed torch seed."""

import os
import sys

import pytest

# Set before any test module imports huggingface_hub or transformers, which read these at import time.
# Tests build tiny models from configs, so a Hub download would be a bug and fails fast.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def seed_torch() -> None:
    """Seed torch's default generator with 0 before each test, when torch is already imported.

    The fixture never imports torch, so tests that do not use it skip its import time. A test that first
    imports torch inside its own body is not seeded here and should call `torch.manual_seed` itself.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)
