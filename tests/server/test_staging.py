"""The per-step upload: one int32 tensor on the device, through a pinned buffer on CUDA."""

from __future__ import annotations

import random

import pytest
import torch

from baton.server.staging import Staging


def test_cpu_upload_is_the_values():
    staging = Staging(torch.device("cpu"))
    assert staging._host is None  # nothing pinned without CUDA
    out = staging.upload([3, -1, 2**31 - 1])
    assert out.dtype == torch.int32 and out.tolist() == [3, -1, 2**31 - 1]


@pytest.mark.gpu
def test_cuda_uploads_in_a_row_and_growth():
    rng = random.Random(0)
    staging = Staging(torch.device("cuda"), capacity=8)
    for n in [1, 8, 9, 100, 3, 5000, 7]:
        values = [rng.randrange(-(2**31), 2**31) for _ in range(n)]
        out = staging.upload(values)
        assert out.is_cuda and out.dtype == torch.int32
        assert staging._host.is_pinned()
        assert out.cpu().tolist() == values
