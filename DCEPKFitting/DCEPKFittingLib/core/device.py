"""Where computation runs (CPU or a CUDA GPU): the project's device rules, side by side.

torch is imported inside each function, so that importing this module (and every module that only
names a device) never loads it. The rules still differ where their callers did: the fitting engine
takes any CUDA GPU for 'auto', the networks ask for 2 GiB of free GPU memory and say why they fall back
to the CPU, training refuses anything but auto / cpu / cuda. One resolver for all is a later change.
"""

from typing import Optional

from .errors import DCEPKInputError

GPU_BYTES_NEEDED = 2 << 30     # networks: ask for 2 GiB free before choosing the GPU


def resolve_fit_device(device):
    """The torch device of the fitting engine: 'auto' (CUDA if available), 'cpu', 'cuda[:n]' or a torch.device."""
    import torch

    if isinstance(device, torch.device):
        return device
    name = str(device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DCEPKInputError("device 'cuda' was asked for but no CUDA GPU is available: use device='cpu' or 'auto'")
    if name != "cpu" and not name.startswith("cuda"):
        raise DCEPKInputError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'")
    return torch.device(name)


def describe_fit_device(device: str = "auto") -> str:
    """Where a fit will run, in words, for the fitting module's status line; refuses 'cuda' without a GPU."""
    try:
        import torch
    except ImportError:
        return "CPU (PyTorch not installed)"
    has_gpu = torch.cuda.is_available()
    if device == "cuda" and not has_gpu:
        raise DCEPKInputError("No CUDA GPU is available: choose device 'auto' or 'cpu'.")
    if device == "cpu":
        return "CPU"
    if has_gpu:
        return f"GPU ({torch.cuda.get_device_name(0)})"
    return "CPU (no GPU found)"


def choose_inference_device(device: str = "auto", notes: Optional[list] = None):
    """cuda when asked (or auto and a GPU has >= 2 GiB free), else CPU; says why it fell back (in ``notes``)."""
    import torch

    notes = notes if notes is not None else []
    if device in (None, "auto"):
        if torch.cuda.is_available():
            try:
                free, _ = torch.cuda.mem_get_info()
            except RuntimeError:
                free = 0
            if free >= GPU_BYTES_NEEDED:
                return torch.device("cuda")
            notes.append(f"GPU has only {free / 2**30:.1f} GiB free: running on the CPU instead")
        return torch.device("cpu")
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise DCEPKInputError("device 'cuda' was asked for but no CUDA GPU is available: use 'cpu' or 'auto'")
        return torch.device(device)
    if device != "cpu":
        raise DCEPKInputError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device("cpu")


def describe_inference_device(device: str = "auto") -> str:
    """Where a network will run, in words, for the inference module's status line (the rule of
    ``choose_inference_device``: 'auto' takes the GPU only with enough free memory, else says why not)."""
    import torch

    notes = []
    chosen = choose_inference_device(device, notes)  # raises DCEPKInputError for 'cuda' without a GPU
    if chosen.type == "cuda":
        free, total = torch.cuda.mem_get_info(chosen)
        return (f"GPU {torch.cuda.get_device_name(chosen)} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
                + (f"; under the {GPU_BYTES_NEEDED / 2**30:.0f} GiB advised" if free < GPU_BYTES_NEEDED else "")
                + ")")
    if notes:
        return "CPU: " + "; ".join(notes)
    return "CPU" if device == "cpu" else "CPU (no CUDA GPU found)"


def resolve_training_device(device: str = "auto"):
    """The torch device for ``dcepk train``: auto, cpu or cuda (refused without a GPU)."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DCEPKInputError("--device cuda was asked for but no CUDA GPU is available: use --device cpu or auto")
    if str(device) not in ("cpu",) and not str(device).startswith("cuda"):
        raise DCEPKInputError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)
