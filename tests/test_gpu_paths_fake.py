"""The code that only runs on a GPU, run here under a fake so it is not dead on arrival:

- tests/test_kernel_gpu.py's test functions on CPU tensors inside flash_cuda.emulate(), which
  routes them through the same launcher and CUDA kernel source (small shapes, one or two per
  test; the real run covers every instantiation);
- benchmarks/bench_sdpa.py's CUDA path (`--device cuda`, the fa preset's sweep against SDPA's
  flash, efficient, cuDNN and math backends, TFLOP/s, ratios, JSON and plot) with torch.cuda's
  device queries, events and memory statistics faked and the input tensors made on the CPU.
  SDPA's efficient and cuDNN backends have no CPU kernel, so the fake also exercises the
  benchmark's "n/a" path.
"""
import contextlib
import importlib.util
import json
import os
import time
from unittest import mock

import pytest
import torch

import flash_cuda
import test_kernel_gpu as gpu
import test_sm75
from conftest import load_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_forward_test_runs_emulated(dtype):
    with flash_cuda.emulate(check=False) as emu:
        gpu.test_forward_vs_reference_and_sdpa("cpu", dtype, True, 64, 113, 203)
        gpu.test_forward_vs_reference_and_sdpa("cpu", dtype, False, 59, 17, 17)
    assert {r["kernel"].split("<")[0] for r in emu.launches} == {"flash_fwd"}


@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_backward_test_runs_emulated(deterministic):
    with flash_cuda.emulate(check=False) as emu:
        gpu.test_backward_vs_reference_and_sdpa("cpu", torch.bfloat16, True, 96, deterministic, N=37)
    kernels = {r["kernel"].split("<")[0] for r in emu.launches}
    assert "flash_bwd" in kernels and ("flash_bwd_dq" in kernels) == deterministic


@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_dropout_test_runs_emulated(deterministic):
    with flash_cuda.emulate(check=False) as emu:
        gpu.test_dropout_vs_reference_with_its_mask("cpu", torch.bfloat16, 64, deterministic, Nq=37, Nk=45)
    assert any(",band>" in r["kernel"] for r in emu.launches)


@pytest.mark.parametrize("variant", ["band", "mod"])
def test_gpu_variant_test_runs_emulated(variant):
    with flash_cuda.emulate(check=False) as emu:
        gpu.test_variants_forward_backward_vs_reference("cpu", torch.float16, variant, 64, False, Nq=37, Nk=45)
    assert any(f",{variant}>" in r["kernel"] for r in emu.launches)


@pytest.mark.parametrize("case", ["one_key", "diagonal_window"])
def test_gpu_one_key_rows_test_runs_emulated(case):
    with flash_cuda.emulate(check=False) as emu:
        gpu.test_one_key_rows_get_exact_gradients("cpu", torch.float16, 64, True, case, Nq=37)
    assert "flash_bwd_dq" in {r["kernel"].split("<")[0] for r in emu.launches}


def test_gpu_deterministic_test_runs_emulated():
    with flash_cuda.emulate(check=False, order="random", workers=2):
        gpu.test_deterministic_backward_is_bitwise_repeatable("cpu", N=33)


@pytest.mark.parametrize("feature", ["causal", "softcap_alibi"])
def test_gpu_varlen_test_runs_emulated(feature):
    with flash_cuda.emulate(check=False) as emu:
        gpu.test_varlen_vs_per_sequence_reference("cpu", torch.bfloat16, feature, 128)
    kernels = {r["kernel"].split("<")[0] for r in emu.launches}
    assert {"flash_fwd", "flash_bwd", "flash_bwd_dq"} <= kernels  # D = 128: the deterministic pass
    with pytest.raises(pytest.skip.Exception):
        gpu.test_varlen_wrong_cu_seqlens_stay_in_bounds("cpu")


@pytest.mark.parametrize("precision", ["3xtf32", "tf32"])
def test_gpu_fp32_test_runs_emulated(precision):
    with flash_cuda.emulate() as emu:
        gpu.test_fp32_forward_vs_reference("cpu", 64, "mod", precision, Nq=37, Nk=45)
    assert [r["kernel"] for r in emu.launches] == ["flash_fwd<fp32,hdim64,mod>"]
    with flash_cuda.emulate() as emu:
        gpu.test_fp32_backward_vs_reference("cpu", 64, "mod", precision, Nq=37, Nk=45)
    assert [r["kernel"].split("<")[0] for r in emu.launches] == [
        "flash_fwd", "flash_bwd_preprocess", "flash_bwd", "flash_bwd_dq"]


def test_gpu_kvcache_test_runs_emulated():
    with flash_cuda.emulate(check=False) as emu:
        gpu.test_kvcache_vs_reference("cpu", torch.bfloat16, 64, "paged16", capacity=200)
    kernels = {r["kernel"].split("<")[0] for r in emu.launches}
    assert {"flash_fwd_kvcache", "flash_fwd_kvcache_combine", "kv_append"} <= kernels


def test_gpu_kvcache_fast_path_test_runs_emulated(monkeypatch):
    with flash_cuda.emulate(check=False) as emu:
        gpu.test_kvcache_common_call_skips_the_python_checks("cpu", monkeypatch)
    assert any(r["kernel"].startswith("flash_fwd_kvcache") for r in emu.launches)


def test_gpu_compact_test_runs_the_compact_kernels(monkeypatch):
    """The GPU test of the 99 KiB configurations, emulated on an A100 profile: the variable
    lowers the dispatcher's limit and the compact kernels run."""
    with flash_cuda.emulate(check=False) as emu:
        gpu.test_compact_configurations_vs_reference("cpu", monkeypatch, torch.float16, "causal", 128, True)
    assert {r["kernel"] for r in emu.launches} >= {"flash_bwd<fp16,hdim128,band,99KiB>",
                                                   "flash_bwd_dq<fp16,hdim128,band,99KiB>"}
    monkeypatch.undo()
    # the wide-configuration test, emulated on an H100 profile, runs the wide kernels at 128
    # where the profile's default is the large ones
    with flash_cuda.emulate(device="h100", check=False) as emu:
        gpu.test_backward_vs_reference_and_sdpa("cpu", torch.bfloat16, True, 128, False)
    assert "flash_bwd<bf16,hdim128,band,227KiB>" in {r["kernel"] for r in emu.launches}
    with flash_cuda.emulate(device="h100", check=False) as emu:
        gpu.test_wide_configurations_vs_reference("cpu", monkeypatch, torch.bfloat16, True, 128, False)
    assert "flash_bwd<bf16,hdim128,band>" in {r["kernel"] for r in emu.launches}
    assert not any(r["kernel"].endswith("KiB>") for r in emu.launches)
    monkeypatch.setenv("FLASH_CUDA_SMEM_PER_BLOCK", "lots")
    with flash_cuda.emulate(), pytest.raises(RuntimeError, match="FLASH_CUDA_SMEM_PER_BLOCK must be a positive "
                                                                 "number of bytes, got 'lots'"):
        flash_cuda.attention(*(torch.randn(1, 1, 8, 64).half() for _ in range(3)))


def test_gpu_tests_cover_every_instantiation():
    params = lambda f: {m.args[0]: tuple(m.args[1]) for m in f.pytestmark if m.name == "parametrize"}
    fwd, bwd = params(gpu.test_forward_vs_reference_and_sdpa), params(gpu.test_backward_vs_reference_and_sdpa)
    assert set(gpu.HEAD_DIMS) <= set(fwd["D"]) and set(gpu.HEAD_DIMS) <= set(bwd["D"])
    assert bwd["deterministic"] == (False, True)
    for p in (fwd, bwd):
        assert p["dtype"] == (torch.float16, torch.bfloat16) and p["causal"] == (False, True)
    all_files = [f for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if "_hdim" in f and "_kvcache_" not in f]
    # The sm_75 instantiations run only on sm_75 (a GPU test on a later GPU cannot launch them):
    # each is in test_sm75.py's emulated cases instead.
    sm75 = {f[:-3] for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith("_sm75.cu")}
    variant_suffix = {"dense": "", "band": "_band", "mod": "_mod"}
    assert sm75 == {f"{kind}_hdim{d}_fp16{variant_suffix[v]}_sm75" for kind, d, v in test_sm75.CASES} | {
        f"fwd_kvcache_hdim{d}_fp16_sm75" for d in test_sm75.HEAD_DIMS}
    all_files = [f for f in all_files if not f.endswith("_sm75.cu")]
    files = [f for f in all_files if "_fp32" not in f]
    # the fp32 forwards (tf32.h): every head dim, variant and precision
    fp32 = params(gpu.test_fp32_forward_vs_reference)
    assert {f[:-3] for f in all_files if "_fp32" in f} == {
        f"{kind}_hdim{d}_fp32{s}" for kind in ("fwd", "bwd") for d in gpu.HEAD_DIMS for s in ("", "_band", "_mod")}
    for fp32 in (fp32, params(gpu.test_fp32_backward_vs_reference)):
        assert set(fp32["D"]) == set(gpu.HEAD_DIMS) and set(fp32["variant"]) == {"dense", "band", "mod"}
        assert set(fp32["precision"]) == {"tf32", "3xtf32"}
    generated = {f.split("_")[1] for f in files}
    assert generated == {f"hdim{d}" for d in gpu.HEAD_DIMS}
    variants = params(gpu.test_variants_forward_backward_vs_reference)
    assert set(variants["D"]) == set(gpu.HEAD_DIMS) and set(variants["variant"]) == {"band", "mod"}
    assert variants["deterministic"] == (False, True) and variants["dtype"] == (torch.float16, torch.bfloat16)
    wide = [f.replace("_99kib", "").replace("_227kib", "") for f in files]
    suffixes = {f[:-3].split("_", 3)[3] if f.count("_") == 3 else "" for f in wide}
    assert suffixes == {"", "band", "mod"}
    # the compact (99 KiB) instantiations: every head dim that has one is in the compact GPU test
    compact = params(gpu.test_compact_configurations_vs_reference)
    assert {int(f.split("_")[1][4:]) for f in files if f.endswith("_99kib.cu")} <= set(compact["D"])
    assert set(compact["variant"]) == {"dense", "causal", "mod"} and compact["deterministic"] == (False, True)
    # the large (227 KiB) instantiations: a GPU with that much runs them in the tests above, and the
    # wide ones they replace there in the wide-configuration test
    large = {f[:-3] for f in files if f.endswith("_227kib.cu")}
    wide_test = params(gpu.test_wide_configurations_vs_reference)
    assert large and {f"bwd_hdim{d}_{t}{s}_227kib" for d in wide_test["D"] for t in ("fp16", "bf16")
                      for s in ("", "_band")} == large
    assert wide_test["dtype"] == (torch.float16, torch.bfloat16) and wide_test["causal"] == (False, True)
    assert wide_test["deterministic"] == (False, True)
    kvcache_files = {f[:-3] for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if "_kvcache_" in f and "_sm75" not in f}
    kv = params(gpu.test_kvcache_vs_reference)
    assert {f.replace("_99kib", "") for f in kvcache_files} == {
        f"fwd_kvcache_hdim{d}_{t}" for d in gpu.HEAD_DIMS for t in ("fp16", "bf16")}
    assert {int(f.split("_")[2][4:]) for f in kvcache_files if f.endswith("_99kib")} <= set(
        params(gpu.test_compact_kvcache_vs_reference)["D"])
    assert set(gpu.HEAD_DIMS) <= set(kv["D"]) and kv["dtype"] == (torch.float16, torch.bfloat16)
    varlen = params(gpu.test_varlen_vs_per_sequence_reference)
    assert set(varlen["D"]) == set(gpu.HEAD_DIMS) and varlen["dtype"] == (torch.float16, torch.bfloat16)


class FakeEvent:
    """torch.cuda.Event on the host clock."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@contextlib.contextmanager
def fake_cuda(bench):
    props = mock.Mock(total_memory=24 * 2 ** 30, name="fake", multi_processor_count=108)
    real_make = bench.make_inputs
    with contextlib.ExitStack() as stack:
        for name, value in {"is_available": lambda: True, "synchronize": lambda *a: None,
                            "empty_cache": lambda: None, "reset_peak_memory_stats": lambda *a: None,
                            "memory_allocated": lambda *a: 0, "max_memory_allocated": lambda *a: 0,
                            "mem_get_info": lambda *a: (16 * 2 ** 30, 24 * 2 ** 30),
                            "get_device_properties": lambda *a: props,
                            "get_device_name": lambda *a: "fake CUDA device (CPU tensors)",
                            "Event": FakeEvent}.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        stack.enter_context(mock.patch.object(flash_cuda, "has_cuda_kernels", lambda: True))
        stack.enter_context(mock.patch.object(bench, "make_inputs", lambda group, device, seed=0: real_make(group, "cpu", seed)))
        yield


def load_bench():
    return load_benchmark("bench_sdpa")


def test_bench_cuda_defaults_and_fa_sweep_construct():
    bench = load_bench()
    with fake_cuda(bench):
        args = bench.parse_args([])
        assert (args.device, args.preset, args.warmup) == ("cuda", "fa", 3)
        points = list(bench.sweep_points(args))
        assert len(points) == 12 and all(p["B"] * p["N"] == 16384 and p["H"] * p["D"] == 2048 for p in points)
        assert set(bench.implementations("cuda", args.sdpa)) == {"flash_cuda", "sdpa-flash", "sdpa-efficient",
                                                                "sdpa-cudnn", "sdpa-math"}
        for p in points:  # every point's inputs construct (shape and dtype only: meta tensors)
            q = torch.empty(p["B"], p["H"], p["N"], p["D"], dtype=p["dtype"], device="meta")
            assert bench.flops(dict(p, causal=True), "fwdbwd") > 0 and bench.math_need(dict(p, causal=False), "fwd") > 0
            assert q.shape[-1] == p["D"]


def test_bench_cuda_path_end_to_end(tmp_path, capsys):
    bench = load_bench()
    tiny = {"shapes": [(1, 64, 2, 64)], "dtypes": ["bfloat16"]}
    with fake_cuda(bench), mock.patch.dict(bench.PRESETS, {"fa": tiny}):
        plot = importlib.util.find_spec("matplotlib") is not None
        bench.main(["--reps", "1", "--warmup", "1", "--out", str(tmp_path)] + ([] if plot else ["--no-plot"]))
    out = capsys.readouterr().out
    assert "device cuda (fake CUDA device (CPU tensors))" in out and "r:flash" in out and "fc TF/s" in out
    data = json.loads((tmp_path / "bench_cuda_fa.json").read_text())
    assert data["meta"]["device"] == "cuda" and len(data["results"]) == 4  # causal x modes
    for r in data["results"]:
        impls = r["impls"]
        assert impls["flash_cuda"]["ms"] > 0 and impls["sdpa-flash"]["ms"] > 0 and impls["sdpa-math"]["ms"] > 0
        assert all(impls[n]["status"].startswith("n/a: no available kernel") for n in ("sdpa-efficient", "sdpa-cudnn"))
    assert data["meta"]["complete"] is True
    if plot:
        assert (tmp_path / "bench_cuda_fa.png").stat().st_size > 0


def test_bench_keeps_the_points_of_a_stopped_run(tmp_path):
    """A sweep killed by a time limit (tools/gpu_check.sh's stage caps) leaves a JSON of the
    points it measured, marked incomplete."""
    bench = load_bench()
    tiny = {"shapes": [(1, 64, 2, 64)], "dtypes": ["bfloat16"]}
    real_measure, calls = bench.measure_point, []

    def stop_at_the_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run stops mid-sweep
        return real_measure(*a, **kw)

    with fake_cuda(bench), mock.patch.dict(bench.PRESETS, {"fa": tiny}), \
            mock.patch.object(bench, "measure_point", stop_at_the_third), pytest.raises(KeyboardInterrupt):
        bench.main(["--reps", "1", "--warmup", "1", "--out", str(tmp_path), "--no-plot"])
    data = json.loads((tmp_path / "bench_cuda_fa.json").read_text())
    assert data["meta"]["complete"] is False and len(data["results"]) == 2


def test_bench_validates_the_last_batch_head_and_rows(tmp_path):
    """bench_sdpa's validation compares batch 0 head 0's first rows and the last batch and head's
    last rows with the float64 reference: an output wrong only past row 255 of the last head (a
    benchmark review's plant passed the first slice alone) is marked wrong, not timed; the
    correct one passes (CPU path, a tiny preset)."""
    bench = load_bench()
    tiny = {"shapes": [(2, 300, 2, 32)], "dtypes": ["float32"], "sdpa": ["flash"]}
    real = bench.flash_cuda_fn

    def wrong_late(q, k, v, causal):
        out = real(q, k, v, causal)
        return torch.cat([out[:, :, :256], torch.zeros_like(out[:, :, 256:])], dim=2)

    for fn, wrong in ((real, False), (wrong_late, True)):
        with mock.patch.dict(bench.PRESETS, {"cpu-tiny": tiny}), mock.patch.object(bench, "flash_cuda_fn", fn):
            bench.main(["--device", "cpu", "--preset", "cpu-tiny", "--reps", "1", "--out", str(tmp_path), "--no-plot"])
        data = json.loads((tmp_path / "bench_cpu_cpu-tiny.json").read_text())
        statuses = [r["impls"]["flash_cuda"]["status"] for r in data["results"]]
        assert statuses and all(s.startswith("wrong") == wrong for s in statuses), statuses
