"""Where computation runs (CPU or a CUDA GPU): one rule for the fitting engine, the networks, training,
the module panels and the command line.

- ``'auto'``: a CUDA GPU when one is found with at least ``GPU_BYTES_NEEDED`` free, else the CPU (the
  reason goes to ``notes``);
- ``'cpu'``: the CPU; ``'cuda'`` / ``'cuda:N'``: that GPU, refused when there is none;
- anything else is refused, naming the choices.

torch is imported only when a GPU may be there: on a machine without an NVIDIA driver (or without torch)
``'auto'`` means the CPU at once, so a CPU fit, which runs on numpy, never loads torch (1.4 s).
"""

import os
import sys
from typing import List, Optional

from .errors import DCEPKInputError, setting

GPU_BYTES_NEEDED = 2 << 30     # ask for 2 GiB free before choosing the GPU


def _nvidia_driver_present() -> bool:
    """Whether an NVIDIA driver is installed (cheap, without torch): CUDA cannot exist without one."""
    if sys.platform.startswith("linux"):
        return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")
    if sys.platform == "win32":
        import ctypes.util
        return ctypes.util.find_library("nvcuda") is not None
    return False   # macOS: no CUDA


def _torch_if_gpu_possible():
    """The torch module when it is loaded already or a GPU may exist; None when the answer is surely 'CPU'."""
    if "torch" not in sys.modules and not _nvidia_driver_present():
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def check_device_name(device) -> str:
    """The device's name in lower case, refused unless it is auto, cpu, cuda or cuda:N (or a torch.device)."""
    name = str(device if device is not None else "auto").strip().lower()
    if name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise DCEPKInputError(f"unknown device {device!r}: use {setting('--device', 'device')} auto, cpu, cuda "
                          "or cuda:N")


def resolve_device(device="auto", notes: Optional[List[str]] = None) -> str:
    """'cpu' or 'cuda[:N]' by the rule of this module; ``device`` is a name above or a torch.device.
    When 'auto' falls back to the CPU although torch can see a GPU, ``notes`` gets the reason."""
    name = check_device_name(device)
    if name == "cpu":
        return "cpu"
    torch = _torch_if_gpu_possible()
    has_gpu = torch is not None and torch.cuda.is_available()
    if name != "auto":
        if not has_gpu:
            raise DCEPKInputError(f"device '{name}' was asked for but no CUDA GPU is available: use "
                                  f"{setting('--device', 'device')} cpu or auto")
        return name
    if not has_gpu:
        return "cpu"
    try:
        free, _ = torch.cuda.mem_get_info()
    except RuntimeError:
        free = 0
    if free >= GPU_BYTES_NEEDED:
        return "cuda"
    if notes is not None:
        notes.append(f"GPU has only {free / 2**30:.1f} GiB free: running on the CPU instead")
    return "cpu"


def describe_device(device: str = "auto") -> str:
    """Where work will run, in words, for a status line: the GPU with its free memory, or the CPU and why
    ('auto' without a usable GPU); refuses 'cuda' without a GPU as ``resolve_device`` does."""
    notes: List[str] = []
    chosen = resolve_device(device, notes)
    if chosen.startswith("cuda"):
        import torch
        free, total = torch.cuda.mem_get_info(chosen)
        return (f"GPU {torch.cuda.get_device_name(chosen)} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
                + (f"; under the {GPU_BYTES_NEEDED / 2**30:.0f} GiB advised" if free < GPU_BYTES_NEEDED else "")
                + ")")
    if notes:
        return "CPU: " + "; ".join(notes)
    return "CPU" if check_device_name(device) == "cpu" else "CPU (no CUDA GPU found)"
