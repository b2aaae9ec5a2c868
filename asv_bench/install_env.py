"""Install a gpulora wheel into the current (asv) environment with only the extras this machine can use.

Usage: ``python install_env.py WHEEL [--gpu {auto,none,cuda12,cuda13}] [--no-torch] [--dry-run]``

- GPU extras: ``auto`` (default) asks ``nvidia-smi`` for a device and the driver's CUDA version and picks
  ``cuda13`` (CUDA >= 13) or ``cuda12`` (CUDA 12.x); no ``nvidia-smi`` or no device means no GPU extra
  (no CuPy, no numba-cuda: the CuPy benchmarks then skip).
- PyTorch (the baseline): the CUDA build from PyPI where a GPU extra was chosen, else the CPU build from
  its own index, ``https://download.pytorch.org/whl/cpu`` (PyPI's default torch wheel for Linux bundles CUDA
  libraries, several GB, useless without a GPU). ``--no-torch`` skips it (the PyTorch benchmarks skip).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def cuda_major(smi_output: str) -> int | None:
    """The driver's CUDA major version from ``nvidia-smi``'s banner ("CUDA Version: 13.0"), or None."""
    m = re.search(r"CUDA Version:\s*(\d+)\.", smi_output)
    return int(m.group(1)) if m else None


def detect_gpu_extra() -> str | None:
    """``"cuda13"``, ``"cuda12"`` or None (no usable NVIDIA GPU) for this machine."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    major = cuda_major(out.stdout)
    if major is None or major < 12:
        return None
    return "cuda13" if major >= 13 else "cuda12"


def commands(wheel: str, gpu: str | None, torch: bool) -> list[list[str]]:
    """The pip commands that install ``wheel`` with extra ``gpu`` (or none) and, if ``torch``, PyTorch."""
    pip = [sys.executable, "-m", "pip", "install"]
    cmds = [pip + [f"{wheel}[{gpu}]" if gpu else wheel]]
    if torch:
        cmds.append(pip + ["torch"] if gpu else pip + ["torch", "--index-url", TORCH_CPU_INDEX])
    return cmds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel")
    ap.add_argument("--gpu", choices=["auto", "none", "cuda12", "cuda13"], default="auto")
    ap.add_argument("--no-torch", action="store_true", help="do not install PyTorch (its benchmarks skip)")
    ap.add_argument("--dry-run", action="store_true", help="print the pip commands instead of running them")
    args = ap.parse_args(argv)
    gpu = detect_gpu_extra() if args.gpu == "auto" else (None if args.gpu == "none" else args.gpu)
    for cmd in commands(args.wheel, gpu, not args.no_torch):
        print("install_env:", " ".join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
