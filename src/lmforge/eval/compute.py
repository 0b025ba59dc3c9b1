"""Compute and energy accounting for a training run: FLOPs, MFU, wall time, energy, CO2.

- FLOPs: the model's `flops_per_token(seq_len, training=True)` (2 per weight per token plus
  attention's QK^T and AV, times 3 for forward + backward) times the tokens trained on.
- MFU: achieved FLOP/s over the device's peak. GPUs: the dense bf16 tensor-core peak from
  the table below (the trainer autocasts to bf16 on GPU). CPUs: cores x clock x FLOPs per
  cycle per core (32 fp32 with AVX2 FMA, 64 with AVX-512), an estimate.
- Energy: measured where the platform exposes a counter (NVML's total-energy counter on
  NVIDIA GPUs when `pynvml` is installed; Linux RAPL under /sys/class/powercap when
  readable), otherwise the device's default power (table below; CPUs: 10 W per thread
  used) times the wall time. The summary says which (`energy_source`), and the energy per
  token trained on (`joules_per_token`). `LMFORGE_POWERCAP` points the RAPL reader at another
  powercap tree (a container's bind mount, or a test's fake one).
- CO2: energy x grid carbon intensity, by default 475 gCO2e/kWh (the IEA world average);
  set `LMFORGE_GRID_INTENSITY` (gCO2e/kWh) for your grid.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

DEFAULT_GRID_G_PER_KWH = 475.0
CPU_WATTS_PER_THREAD = 10.0

# name fragment (matched against torch.cuda.get_device_name, longest first) -> (peak bf16 FLOP/s dense, board power W)
GPU_TABLE: dict[str, tuple[float, float]] = {
    "H200": (989e12, 700), "H100 PCIe": (756e12, 350), "H100": (989e12, 700), "GH200": (989e12, 900),
    "B200": (2250e12, 1000), "A100": (312e12, 400), "A800": (312e12, 400), "A10G": (70e12, 300), "A10": (125e12, 150),
    "L40S": (362e12, 350), "L40": (181e12, 300), "L4": (121e12, 72), "RTX 4090": (165e12, 450),
    "RTX 3090": (71e12, 350), "V100": (125e12, 300), "T4": (65e12, 70),
}


def grid_intensity() -> float:
    value = os.environ.get("LMFORGE_GRID_INTENSITY")
    return float(value) if value else DEFAULT_GRID_G_PER_KWH


def _cpu_flops_per_cycle() -> int:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 32
    return 64 if re.search(r"\bavx512f\b", flags) else 32


def _cpu_ghz() -> float:
    try:
        mhz = [float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())]
    except OSError:
        mhz = []
    return max(mhz) / 1000 if mhz else 2.5


def device_profile(device: torch.device | str) -> dict[str, Any]:
    """{name, peak_flops_per_s, default_power_w} for the device a run trained on."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key in sorted(GPU_TABLE, key=len, reverse=True):
            if key in name:
                peak, watts = GPU_TABLE[key]
                return {"name": name, "peak_flops_per_s": peak, "default_power_w": watts}
        return {"name": name, "peak_flops_per_s": None, "default_power_w": 300.0}
    threads = torch.get_num_threads()
    return {"name": f"CPU ({threads} threads)", "peak_flops_per_s": threads * _cpu_ghz() * 1e9 * _cpu_flops_per_cycle(),
            "default_power_w": CPU_WATTS_PER_THREAD * threads}


POWERCAP = "/sys/class/powercap"


def _rapl_packages(root: str | Path | None = None) -> list[Path]:
    """Readable package-level RAPL domains (intel-rapl:N, not their intel-rapl:N:M subdomains)."""
    root = Path(root or os.environ.get("LMFORGE_POWERCAP") or POWERCAP)
    found = []
    for p in sorted(root.glob("intel-rapl:*")):
        if p.name.count(":") == 1 and os.access(p / "energy_uj", os.R_OK):
            found.append(p)
    return found


def _read_uj(path: Path) -> int:
    return int(path.read_text())


class EnergyMeter:
    """Energy used since construction, from a hardware counter; `joules()` is None where none is readable."""

    def __init__(self, device: torch.device | str, powercap: str | Path | None = None):
        device = torch.device(device)
        self.source: str | None = None
        self._read = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
                self._read = lambda: [pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0]  # mJ -> J
                self.source, self._wrap = "measured (NVML)", [float("inf")]
            except Exception:  # no pynvml, or a GPU without the counter
                pass
        elif packages := _rapl_packages(powercap):
            try:
                self._wrap = [_read_uj(p / "max_energy_range_uj") / 1e6 for p in packages]
                self._read = lambda: [_read_uj(p / "energy_uj") / 1e6 for p in packages]
                self.source = "measured (RAPL)"
            except (OSError, ValueError):
                self._read = None
        self._start = self._read() if self._read else None

    def joules(self) -> float | None:
        if self._read is None:
            return None
        # RAPL counters wrap around at max_energy_range_uj.
        return sum((now - start) % wrap for now, start, wrap in zip(self._read(), self._start, self._wrap))


def energy_used(seconds: float, device: torch.device | str, measured_j: float | None = None,
                measured_s: float | None = None, source: str | None = None, devices: int = 1) -> tuple[float, str]:
    """(joules, where they come from) for `seconds` on `devices` devices like `device`: the
    counter's `measured_j` over `measured_s` of them (scaled by `devices`), the rest estimated
    at the default power; with no counter, all of it estimated and the label says so."""
    profile = device_profile(device)
    watts = profile["default_power_w"] * devices
    if measured_j is not None:
        joules = measured_j * devices + watts * max(0.0, seconds - (measured_s or seconds))
        return joules, source or "measured"
    return watts * seconds, f"estimate ({watts:.0f} W default for {profile['name']})"


def run_summary(flops_per_token: float, tokens: int, steps: int, wall_s: float, device: torch.device | str,
                measured_j: float | None = None, measured_s: float | None = None, source: str | None = None,
                devices: int = 1) -> dict[str, Any]:
    """The accounting record for `tokens` trained on `devices` devices like `device`.
    `measured_j` is one device's counter over `measured_s` seconds of the run (a resumed run
    measures its last session only), scaled by `devices`; the rest is estimated at the
    default power."""
    profile = device_profile(device)
    total = flops_per_token * tokens
    achieved = total / wall_s if wall_s > 0 else 0.0
    peak = profile["peak_flops_per_s"] * devices if profile["peak_flops_per_s"] else None
    joules, energy_source = energy_used(wall_s, device, measured_j, measured_s, source, devices)
    kwh = joules / 3.6e6
    g = grid_intensity()
    return {"steps": steps, "tokens": tokens, "wall_s": round(wall_s, 3), "flops_per_token": flops_per_token,
            "total_flops": total, "achieved_flops_per_s": achieved, "device": profile["name"], "devices": devices,
            "peak_flops_per_s": peak, "mfu": achieved / peak if peak else None, "energy_kwh": kwh,
            "joules_per_token": joules / tokens if tokens else None, "energy_source": energy_source,
            "grid_g_per_kwh": g, "co2_kg": kwh * g / 1000}


def write_run_summary(run_dir: Path, flops_per_token: float, tokens: int, steps: int, wall_s: float,
                      device: torch.device | str, meter: EnergyMeter | None = None,
                      metered_s: float | None = None, devices: int = 1, extra: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/summary.json` (atomically) and return its path; `extra` adds the
    trainer's own keys (why the run stopped, its best validation)."""
    measured = meter.joules() if meter is not None else None
    summary = run_summary(flops_per_token, tokens, steps, wall_s, device, measured, metered_s,
                          meter.source if meter is not None else None, devices)
    summary.update(extra or {})
    path = Path(run_dir) / "summary.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    return path


def describe(summary: dict[str, Any]) -> str:
    """One line for a console."""
    mfu = f"MFU {summary['mfu'] * 100:.2f}% of {summary['peak_flops_per_s']:.3g} FLOP/s" if summary.get("mfu") else "MFU n/a"
    where = summary["device"] if summary.get("devices", 1) == 1 else f"{summary['devices']} x {summary['device']}"
    per_token = f" ({summary['joules_per_token']:.3g} J/token)" if summary.get("joules_per_token") else ""
    return (f"{summary['total_flops']:.3g} FLOPs in {summary['wall_s']:.0f} s on {where} ({mfu}); "
            f"{summary['energy_kwh'] * 1000:.2f} Wh {summary['energy_source']}{per_token}, "
            f"{summary['co2_kg'] * 1000:.2f} g CO2e at {summary['grid_g_per_kwh']:.0f} g/kWh")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def describe_run(run_dir: Path) -> str:
    summary = read_summary(run_dir)
    return describe(summary) if summary else "no summary.json (the run did not finish)"
