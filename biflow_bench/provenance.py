"""What made a record: the code's git commit, the library versions and the machine. Every record's `env` section
comes from here (a run's from `environment`, a speed record's from `machine_environment`)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """HEAD's commit of the checkout this package lives in ("unknown" outside a git checkout or without git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def environment(device: torch.device | None = None) -> dict[str, str]:
    """A record's `env`: commit, torch and python versions, device type and intra-op threads."""
    return {"git_commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
            "device": device.type if device is not None else "cpu", "threads": str(torch.get_num_threads())}


def machine_environment(device: torch.device) -> dict[str, str]:
    """`environment` plus the machine a timing was taken on: platform, CPU model, and GPU and CUDA on CUDA."""
    env = {**environment(device), "platform": platform.platform(), "cpu": cpu_name()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
    return env
