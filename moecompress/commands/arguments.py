"""argparse types and checks that several subcommands share (threads, batch sizes, devices)."""

from __future__ import annotations

import argparse

import torch

from moecompress.errors import UsageError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--threads``, ``--batch-size``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def device_name(text: str) -> str:
    """argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        return check_device(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def check_device(text: str) -> str:
    """``text`` when it names a device torch can use here, else :class:`UsageError` saying what this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"{text!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"--device {text}: {build}; use --device cpu (or install a CUDA build of torch)")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {text}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {text}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {text}: moecompress runs on cpu, cuda or mps")
    return text
