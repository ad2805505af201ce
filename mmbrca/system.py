"""What the machine offers: usable CPU cores and the torch device to run on."""

from __future__ import annotations

import os

import torch

from mmbrca.errors import UserError


def available_cores() -> int:
    """CPU cores this process may use (its affinity where the OS tells it, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_device(name: str, *, option: str) -> torch.device:
    """'auto' → CUDA when available, else CPU; any other torch device name as given.

    `option` names the setting in the error message (e.g. --device, train.device).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"{option}: unknown device {name!r}") from None
