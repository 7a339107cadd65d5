"""What a benchmark result depends on: package versions, device, threads, git commit (recorded
in every run's ``results.json``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def environment(device: str | None = None) -> dict[str, Any]:
    """Package versions, device, git commit: what a result depends on."""
    import importlib.metadata as md

    import torch

    vers = {}
    for pkg in ("torch", "transformer-lens", "transformers", "numpy", "scipy", "matplotlib", "eap-bench"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None

    def git(*args: str) -> str | None:
        """git's answer, or None (with a note on stderr) where git is missing or hangs."""
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"[bench] git {' '.join(args)} failed ({type(exc).__name__}: {exc}): no git facts in the results",
                  file=sys.stderr)
            return None

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "device": device or ("cuda" if cuda else "cpu"),
        "packages": vers,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
