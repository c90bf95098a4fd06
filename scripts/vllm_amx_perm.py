"""Ask Linux for AMX tile state at interpreter start, in every process of the vLLM CPU venv.

Test bed only (not part of meshd): `scripts/vllm_cpu_env.sh` copies this file into `.venv-vllm`'s
site-packages as `_meshd_amx_perm.py` with a `_meshd_amx_perm.pth` that imports it, so it runs in
each Python started from that venv, vLLM's spawned engine and worker processes included.

Why: Linux (>= 5.16) gives AMX TILEDATA (XSTATE component 18) to a process only after it asks,
`arch_prctl(ARCH_REQ_XCOMP_PERM, 18)`; the first tile instruction without that permission gets
SIGILL. The permission is per process, inherited on fork and cleared on exec
(Documentation/arch/x86/xstate.rst). vLLM's CPU backend picks its AMX attention kernels from CPUID
alone (`torch.cpu._is_amx_tile_supported()`) and never asks; it works only once something else in
the process has asked, as oneDNN does when it builds an AMX GEMM. With the test bed's tiny model
a decode worker whose first forward after a KV pull computes one token runs only small GEMMs (no
AMX, no request), then the AMX attention kernel: SIGILL. vLLM's CPU platform spawns its
processes (exec), so the request must be made in each one, which is what a `.pth` hook does.

Harmless elsewhere: it does nothing off Linux x86-64, when the kernel does not offer TILEDATA
(`ARCH_GET_XCOMP_SUPP`; an old kernel answers EINVAL) or the request fails, and it never raises.
Re-requesting a held permission is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import sys

SYS_ARCH_PRCTL = 158  # x86-64 syscall number
ARCH_GET_XCOMP_SUPP = 0x1021
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILECFG = 17
XFEATURE_XTILEDATA = 18
TILE_MASK = (1 << XFEATURE_XTILECFG) | (1 << XFEATURE_XTILEDATA)


def _features(libc: ctypes.CDLL, code: int) -> int | None:
    value = ctypes.c_uint64(0)
    if libc.syscall(SYS_ARCH_PRCTL, code, ctypes.byref(value)) != 0:
        return None
    return value.value


def request_amx_tiles() -> bool:
    """True when this process may now use AMX tiles (asked here or already held)."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        supported = _features(libc, ARCH_GET_XCOMP_SUPP)
        if supported is None or supported & TILE_MASK != TILE_MASK:
            return False
        if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
            return False
        permitted = _features(libc, ARCH_GET_XCOMP_PERM)
        return permitted is not None and permitted & TILE_MASK == TILE_MASK
    except Exception:  # a startup hook must never break the interpreter
        return False


GRANTED = request_amx_tiles()


def describe() -> str:
    """One line for scripts/vllm_cpu_env.sh: what the hook did in this process."""
    if GRANTED:
        return "AMX tile permission requested at start (vllm_amx_perm hook)"
    return "AMX tiles not offered by this CPU/kernel (vllm_amx_perm hook does nothing)"


if __name__ == "__main__":
    print(describe())
