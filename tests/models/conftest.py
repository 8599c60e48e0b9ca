"""Fixtures for the model tests: parity cases (tests/models/hf_cases.py) and attention backends."""

from __future__ import annotations

import os

import pytest
import torch

from tests.models.hf_cases import CASES, HFCase

os.environ.setdefault("WANDB_MODE", "disabled")


BACKENDS = ["eager", "sdpa", "chunked"]


@pytest.fixture(params=list(CASES))
def hf_case(request: pytest.FixtureRequest) -> HFCase:
    torch.manual_seed(0)
    return CASES[request.param]()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param
