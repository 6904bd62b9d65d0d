"""--attention-backend: None resolves to flashinfer only where it can run (CUDA, package
installed, a 16-bit dtype), and on CPU to cpu (sgl_kernel) where sgl_kernel is built, else
torch_native; asking for flashinfer elsewhere is a start-up error that says why."""

from __future__ import annotations

import importlib.util

import pytest
from sglang.srt import server_args as server_args_module
from sglang.srt.server_args import ServerArgs


@pytest.fixture
def flashinfer_installed(monkeypatch):
    """Sets whether the flashinfer package is found, whatever this machine has."""
    real_find_spec = importlib.util.find_spec

    def set_installed(installed: bool, sgl_kernel: bool = True) -> None:
        def find_spec(name, *args, **kwargs):
            if name == "flashinfer":
                return real_find_spec("os") if installed else None  # any spec stands for "found"
            if name == "sgl_kernel" and not sgl_kernel:
                return None
            return real_find_spec(name, *args, **kwargs)

        monkeypatch.setattr(server_args_module.importlib.util, "find_spec", find_spec)

    return set_installed


@pytest.mark.parametrize(
    "device,dtype,installed,expected",
    [
        ("cuda", "auto", True, "flashinfer"),
        ("cuda", "bfloat16", True, "flashinfer"),
        ("cuda", "float32", True, "torch_native"),
        ("cuda", "auto", False, "torch_native"),
        ("cpu", "auto", True, "cpu"),
        ("cpu", "float32", False, "cpu"),
    ],
)
def test_default(flashinfer_installed, device: str, dtype: str, installed: bool, expected: str):
    flashinfer_installed(installed)
    assert ServerArgs(device=device, dtype=dtype).resolve().attention_backend == expected


@pytest.mark.parametrize(
    "device,dtype,installed,reason",
    [
        ("cpu", "auto", True, "it needs CUDA"),
        ("cuda", "auto", False, "the flashinfer package is not installed"),
        ("cuda", "float32", True, "it has no float32 kernels"),
    ],
)
def test_explicit_flashinfer_where_it_cannot_run(
    flashinfer_installed, device: str, dtype: str, installed: bool, reason: str
):
    flashinfer_installed(installed)
    with pytest.raises(ValueError, match=f"--attention-backend flashinfer cannot run here: {reason}") as err:
        ServerArgs(device=device, dtype=dtype, attention_backend="flashinfer").resolve()
    assert "\n" not in str(err.value)


def test_cpu_without_sgl_kernel_defaults_to_torch_native(flashinfer_installed):
    flashinfer_installed(False, sgl_kernel=False)
    assert ServerArgs(device="cpu").resolve().attention_backend == "torch_native"


def test_explicit_torch_native_is_kept_on_cuda(flashinfer_installed):
    flashinfer_installed(True)
    assert ServerArgs(device="cuda", attention_backend="torch_native").resolve().attention_backend == "torch_native"
