"""Energy measured, not assumed: the RAPL reader on a fake powercap tree (package domains only,
wrap-around at max_energy_range_uj), joules per token in training summaries, and `lmforge
compare`'s joules per generated token, measured over the decode loops or labelled an estimate."""

from __future__ import annotations

import os
import time

import pytest
import torch

from lmforge.compress.compare import DecodeEnergy, compare
from lmforge.eval.compute import EnergyMeter, describe, device_profile, run_summary


def powercap(root, packages: dict[str, tuple[int, int]]):
    """A powercap tree: {domain: (energy_uj, max_energy_range_uj)}."""
    for name, (energy, top) in packages.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{top}\n")
        (d / "name").write_text("package-0\n" if name.count(":") == 1 else "core\n")
    return root


def set_energy(root, name: str, energy: int) -> None:
    tmp = root / name / ".energy_uj.tmp"
    tmp.write_text(f"{energy}\n")
    os.replace(tmp, root / name / "energy_uj")  # a reader sees the old value or the new, never half


def test_rapl_meter_sums_packages_and_wraps(tmp_path):
    top = 262_143_328_850  # a real package's max_energy_range_uj
    root = powercap(tmp_path / "powercap", {"intel-rapl:0": (top - 2_000_000, top),
                                            "intel-rapl:1": (5_000_000, top),
                                            "intel-rapl:0:0": (1_000, top)})  # a subdomain: inside package 0
    meter = EnergyMeter("cpu", root)
    assert meter.source == "measured (RAPL)"
    assert meter.joules() == 0.0
    set_energy(root, "intel-rapl:0", 3_500_000)  # wrapped: 2 J to the top, then 3.5 J
    set_energy(root, "intel-rapl:1", 6_250_000)
    set_energy(root, "intel-rapl:0:0", 900_000_000)  # not counted twice
    assert meter.joules() == pytest.approx(2.0 + 3.5 + 1.25)


def test_meter_reads_the_tree_named_by_the_environment(tmp_path, monkeypatch):
    root = powercap(tmp_path / "pc", {"intel-rapl:0": (10, 1_000_000)})
    monkeypatch.setenv("LMFORGE_POWERCAP", str(root))
    meter = EnergyMeter("cpu")
    set_energy(root, "intel-rapl:0", 500_010)
    assert meter.source == "measured (RAPL)" and meter.joules() == pytest.approx(0.5)
    monkeypatch.setenv("LMFORGE_POWERCAP", str(tmp_path / "empty"))
    none = EnergyMeter("cpu")
    assert none.source is None and none.joules() is None


def test_summary_has_joules_per_token_measured_or_labelled_estimate():
    measured = run_summary(1000.0, tokens=4000, steps=10, wall_s=20.0, device="cpu", measured_j=100.0,
                           measured_s=20.0, source="measured (RAPL)")
    assert measured["joules_per_token"] == pytest.approx(100.0 / 4000)
    assert measured["energy_source"] == "measured (RAPL)"
    assert "0.025 J/token" in describe(measured) and "measured (RAPL)" in describe(measured)
    estimate = run_summary(1000.0, tokens=4000, steps=10, wall_s=20.0, device="cpu")
    watts = device_profile("cpu")["default_power_w"]
    assert estimate["joules_per_token"] == pytest.approx(watts * 20.0 / 4000)
    assert estimate["energy_source"].startswith("estimate (") and f"{watts:.0f} W default" in estimate["energy_source"]
    assert run_summary(1.0, tokens=0, steps=0, wall_s=1.0, device="cpu")["joules_per_token"] is None


def test_compare_measures_joules_per_generated_token(tiny_model_dir, tmp_path, monkeypatch):
    """A package drawing 40 W: its counter advances with the clock (read through the tree's
    energy_uj) and wraps at max_energy_range_uj during the measurement."""
    from lmforge.eval import compute

    top, watts = 2_000_000, 40.0  # 2 J: one wrap every 50 ms
    root = powercap(tmp_path / "powercap", {"intel-rapl:0": (0, top)})
    real = compute._read_uj
    reads: list[int] = []
    t0: list[float] = []

    def clocked(path):
        if path != root / "intel-rapl:0" / "energy_uj":
            return real(path)
        t0 or t0.append(time.perf_counter())
        reads.append((top - 1000 + int((time.perf_counter() - t0[0]) * watts * 1e6)) % top)  # 1 mJ to the top
        return reads[-1]

    monkeypatch.setattr(compute, "_read_uj", clocked)
    (row,) = compare([tiny_model_dir], None, new_tokens=16, chart=tmp_path / "c.png", rounds=3, powercap=root)
    assert row.energy_source == "measured (RAPL)" and len(reads) == 2 * 3  # before and after each timed loop
    assert reads[1] < reads[0]  # the first loop crossed the wrap
    # 40 W over the decode loops' seconds, 16 tokens in each of 3 rounds
    assert row.joules_per_token == pytest.approx(watts * row.decode_s / 48, rel=0.2)
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_decode_energy_per_token_by_hand(tmp_path):
    root = powercap(tmp_path / "pc", {"intel-rapl:0": (0, 10_000_000)})
    energy = DecodeEnergy()
    for joules_uj, seconds in [(3_000_000, 0.1), (9_500_000, 0.2)]:  # each meter starts where the last ended
        meter = EnergyMeter("cpu", root)
        set_energy(root, "intel-rapl:0", joules_uj)
        energy.add(meter, seconds, 16)
    # 3 J, then 6.5 J: 9.5 J over 32 tokens
    assert energy.per_token("cpu") == (pytest.approx(9.5 / 32), "measured (RAPL)")
    none = DecodeEnergy()
    none.add(EnergyMeter("cpu", tmp_path / "absent"), 0.5, 20)
    watts = device_profile("cpu")["default_power_w"]
    joules, source = none.per_token("cpu")
    assert joules == pytest.approx(watts * 0.5 / 20) and source.startswith("estimate (")


def test_compare_without_a_counter_labels_the_estimate(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_POWERCAP", str(tmp_path / "no-powercap"))
    (row,) = compare([tiny_model_dir], None, new_tokens=16, chart=None, rounds=3)
    watts = device_profile(torch.device("cpu"))["default_power_w"]
    assert row.energy_source == f"estimate ({watts:.0f} W default for CPU ({torch.get_num_threads()} threads))"
    assert row.joules_per_token == pytest.approx(watts * row.decode_s / 48)
    from rich.console import Console

    from lmforge.compress.command import print_table

    out = Console(record=True, width=200)
    print_table([row], out)
    text = out.export_text()
    assert "J/token" in text and "energy: estimate (" in text
