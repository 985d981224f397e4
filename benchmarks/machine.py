"""What a speed figure depends on: the CPU's model and kind, the emulation settings, the load.

A *CPU kind* is what decides the training step's speed on a CPU: whether it multiplies bf16
natively (AVX512-BF16 or AMX tiles, so ``train.precision: auto`` picks bf16 autocast) or has
AVX2 only (fp32 everywhere). An AVX2-only CPU can be emulated on a newer one by capping the
instruction sets of the three libraries a training step runs in::

    ONEDNN_MAX_CPU_ISA=AVX2       # oneDNN: convolutions, batch norm
    ATEN_CPU_CAPABILITY=avx2      # torch's own vectorised kernels (elementwise, reductions)
    MKL_ENABLE_INSTRUCTIONS=AVX2  # MKL: matrix multiplies (linear layers, torch.mm)

with ``--set train.precision=fp32`` (the trainer would otherwise still see the CPU's native
bf16). :func:`cpu_kind` names the kind and says when it is emulated.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

EMULATION_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
"""Environment variables that cap the instruction sets torch's CPU libraries use."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The ``model name`` of ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def emulation() -> dict[str, str]:
    """The instruction-set caps set in the environment (``{}`` when none is)."""
    return {k: os.environ[k] for k in EMULATION_ENV if os.environ.get(k)}


def cpu_kind(flags: set[str] | None = None, env: dict[str, str] | None = None) -> str:
    """``AVX512-BF16/AMX``, ``AVX512-BF16``, ``AVX2-only`` or ``other``, plus
    `` (emulated on <native kind>)`` when the environment caps oneDNN or ATen at AVX2."""
    flags = cpu_flags() if flags is None else flags
    env = emulation() if env is None else env
    if "amx_bf16" in flags and "avx512_bf16" in flags:
        native = "AVX512-BF16/AMX"
    elif "avx512_bf16" in flags or "amx_bf16" in flags:
        native = "AVX512-BF16"
    elif "avx2" in flags:
        native = "AVX2-only"
    else:
        native = "other"
    capped = any(
        env.get(k, "").upper().startswith("AVX2")
        for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
    )
    if capped and native != "AVX2-only":
        return f"AVX2-only (emulated on {native})"
    return native


def load_average() -> float:
    """The 1-minute load average (what ``uptime`` shows first)."""
    return os.getloadavg()[0]


def describe() -> dict[str, Any]:
    """CPU model, kind, cores, emulation settings and the load now, for a result's header."""
    return {
        "cpu": cpu_model(),
        "cpu_kind": cpu_kind(),
        "cores": os.cpu_count(),
        "emulation": emulation(),
        "load_average": load_average(),
    }
