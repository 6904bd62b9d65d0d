"""Small helpers shared by the runtime: memory readings, ids."""

from __future__ import annotations

import functools
import uuid


def device_memory(device: str) -> tuple[int, int]:
    """(available, total) bytes of the memory that holds weights and KV on `device`."""
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return free, total
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["MemAvailable"], fields["MemTotal"]


def keep_freed_memory() -> bool:
    """Has glibc's malloc serve large buffers from the heap and never trim it, so freed
    activations are reused instead of being unmapped and faulted in afresh, page by page, in
    every layer (a prefill allocates tens of MB per op). This is what tcmalloc or jemalloc via
    LD_PRELOAD, which vLLM's and SGLang's CPU guides recommend, also achieve; with those preloaded
    mallopt is theirs and this changes nothing. Returns whether glibc took both settings."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def new_request_id() -> str:
    return uuid.uuid4().hex


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def cpu_has_bf16_arithmetic() -> bool:
    """AVX512-BF16 or AMX: bf16 dot products in hardware, and oneDNN's bf16 matmuls at full speed."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def configure_logging(level: str, prefix: str = "") -> None:
    """One log format for every process; `prefix` names the process in each line."""
    import logging

    tag = f" {prefix}" if prefix else ""
    logging.basicConfig(
        level=level.upper(),
        format=f"[%(asctime)s{tag}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


def kill_with_parent() -> None:
    """Asks Linux to kill this process when its parent dies, so no child outlives the server."""
    import ctypes
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the children's parent-pid checks still end them
