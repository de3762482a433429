"""Fixtures shared by the recovery tests (imported by tests/test_recover*.py)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from conftest import TOKENIZER_DIR


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models train fastest on one thread, and far faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)
