"""Tests run on every available backend: CPU always, CUDA when this build has the kernels."""
import pytest
import torch

import flash_cuda

BACKENDS = ["cpu"] + (["cuda"] if torch.cuda.is_available() and flash_cuda.has_cuda_kernels() else [])


@pytest.fixture(params=BACKENDS)
def device(request):
    return request.param


def dtypes_for(device):
    if device == "cuda":  # the CUDA kernels are 16-bit (tensor cores)
        return [torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16, torch.bfloat16, torch.float64]
