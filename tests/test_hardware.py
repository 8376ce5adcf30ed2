import pytest
import torch

from quikft import hardware


@pytest.mark.parametrize(("capability", "avx512_bf16", "amx", "expected"), [
    ("AVX2", True, False, torch.float32),  # the dispatch level decides: AVX2 kernels have no native bf16
    ("AVX2", False, False, torch.float32),
    ("AVX512", False, False, torch.float32),  # AVX-512 without the BF16 extension emulates it
    ("AVX512", True, False, torch.bfloat16),
    ("AVX512", False, True, torch.bfloat16),
    ("DEFAULT", False, False, torch.float32),
])
def test_cpu_dtype_follows_native_bf16(monkeypatch, capability, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    choice = hardware.compute_dtype("cpu")
    assert choice.dtype is expected
    assert capability in choice.reason
    assert hardware.resolve_dtype("auto", "cpu") == choice


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_cuda_dtype_follows_bf16_support(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    choice = hardware.compute_dtype("cuda")
    assert choice.dtype is expected and "Test GPU" in choice.reason


def test_explicit_dtypes_win_and_unknown_names_fail():
    assert hardware.resolve_dtype("fp32").dtype is torch.float32
    assert hardware.resolve_dtype(torch.float16).reason == "requested"
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        hardware.resolve_dtype("int4")


def test_default_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.resolve_device("auto") == "cpu" and hardware.resolve_device("cuda") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.resolve_device(None) == "cuda"
