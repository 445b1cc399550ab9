"""What a figure records about the machine it ran on: `cpu()` (model, cores, vector
extensions: ratios and step times depend on them) and `machine()` (the host as a sweep
row or a step benchmark records it). The one definition, for benchmarks/ and the sweep.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any


def cpu() -> dict:
    """The CPU's model, core count and vector extensions (ratios depend on them)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = sorted(set(re.findall(r"\b(avx2|avx512[a-z0-9_]*|amx[a-z0-9_]*)\b", info)))
    return {"model": model.group(1) if model else platform.processor(),
            "cores": os.cpu_count(), "flags": flags}


def machine() -> dict[str, Any]:
    """The host a row ran on, its vector extensions included (step times depend on them:
    AVX2 against AVX-512)."""
    host = cpu()
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python":
            platform.python_version(), "cpu": host["model"], "cpu_flags": " ".join(host["flags"])}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info
