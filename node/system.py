"""What a device can tell about itself: memory, RSS, battery, temperature.

Read from /proc and /sys (Linux and Android); anything unavailable is None or 0, never
an error: a phone's kernel often hides battery and thermal files from apps.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

_BATTERY = (Path("/sys/class/power_supply/battery/capacity"), Path("/sys/class/power_supply/BAT0/capacity"))
_THERMAL = Path("/sys/class/thermal/thermal_zone0/temp")


@dataclasses.dataclass(frozen=True)
class Sample:
    free_mem_mb: float
    rss_mb: float
    battery_pct: float | None
    thermal_c: float | None


def platform_name() -> str:
    system = "android" if "ANDROID_ROOT" in os.environ else platform.system().lower()
    return f"{system}-{platform.machine().lower()}"[:64]


def sample() -> Sample:
    return Sample(free_mem_mb=_meminfo_mb("MemAvailable"), rss_mb=rss_mb(),
                  battery_pct=_read_number(_BATTERY), thermal_c=_scaled(_read_number((_THERMAL,)), 1000.0))


def rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _meminfo_mb(key: str) -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _read_number(paths: tuple[Path, ...]) -> float | None:
    for path in paths:
        try:
            return float(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def _scaled(value: float | None, divisor: float) -> float | None:
    if value is None:
        return None
    scaled = value / divisor
    return scaled if -100 <= scaled <= 200 else None
