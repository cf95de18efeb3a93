"""Tests run on every available backend: CPU always, CUDA when this build has the kernels."""
import importlib.util
import os
import shutil

import pytest
import torch

import flash_cuda

BACKENDS = ["cpu"] + (["cuda"] if torch.cuda.is_available() and flash_cuda.has_cuda_kernels() else [])


@pytest.fixture(params=BACKENDS)
def device(request):
    return request.param


def dtypes_for(device):
    if device == "cuda":  # the generic tests cover the 16-bit kernels (fp32: test_fp32_kernels.py)
        return [torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def widest_dtype(device):
    """float32 on CPU; bfloat16 on CUDA (the generic tests cover the 16-bit kernels there; the fp32
    TF32 kernels have their own, test_fp32_kernels.py and test_kernel_gpu.py)."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def skip_unless_supported(device, dtype):
    """float64 CUDA tensors raise TypeError (test_errors.py checks that); float32 ones run the TF32
    kernels, tested on their own (test_fp32_kernels.py): skip both here."""
    if dtype not in dtypes_for(device):
        pytest.skip(f"the {device} kernels do not take {dtype}")


def cpu_has(*flags):
    """Whether this CPU's /proc/cpuinfo lists every one of flags (False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return all(flag in line.split() for flag in flags)


def load_script(folder, name):
    """<folder>/<name>.py of the repository as a module (benchmarks and examples are scripts, not
    packages), so a test can run its main() end to end."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name):
    return load_script("benchmarks", name)


def find_nvcc():
    """The CUDA toolkit's nvcc (CUDA_HOME, else /usr/local/cuda, else PATH), or None: the tests
    that compile kernel sources themselves skip without it."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")
