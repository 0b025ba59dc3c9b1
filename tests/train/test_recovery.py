"""Resume verifies what it loads: checksums recorded at commit and checked on resume, a fall back
to the newest intact checkpoint (or an explicit --resume-from), a dangling `latest`, a run
directory that stops being writable, and a metrics log that holds each step once."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import LmforgeError
from lmforge.train.recovery import CHECKSUMS, find_checkpoint, verify_checkpoint
from lmforge.train.metrics import read_metrics
from lmforge.train.trainer import train

# A constant schedule (after warmup): a run of 6 steps then 8 follows the lr of a straight 8-step run.
SECTIONS = {"train": {"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3, "log_every": 1,
                      "schedule": "constant"}}


def run(recipe, log=None, **kwargs):
    return train(recipe, progress=False, log=log or (lambda *_: None), **kwargs)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def zero_bytes(path: Path, count: int = 64) -> None:
    """What a bad disk sector does: `count` bytes in the middle of the file become zeros."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(count)
    path.write_bytes(bytes(data))


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10  # inside the last tensor's data, past the safetensors header
    path.write_bytes(bytes(data))


@pytest.fixture
def six_steps(tiny_recipe):
    """A finished 6-step run with checkpoints at steps 2, 4, 6, and the same recipe run straight to 8."""
    done = run(tiny_recipe("split", **SECTIONS))
    reference = run(tiny_recipe("straight", train={**SECTIONS["train"], "max_steps": 8}))
    return done.run_dir, reference


def test_every_checkpoint_records_the_sha256_of_each_of_its_files(six_steps):
    run_dir, _ = six_steps
    for name in ("step-000002", "step-000004", "step-000006"):
        folder = run_dir / "checkpoints" / name
        listed = {line.split("  ", 1)[1] for line in (folder / CHECKSUMS).read_text().splitlines()}
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {CHECKSUMS}
        assert listed == on_disk and {"trainer.pt", "model.safetensors", "lmforge.json"} <= listed
        # the standard tool agrees with it
        check = subprocess.run(["sha256sum", "-c", "--quiet", CHECKSUMS], cwd=folder, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert verify_checkpoint(folder) is None


@pytest.mark.parametrize("damage,file", [(zero_bytes, "trainer.pt"), (flip_bit, "model.safetensors")])
def test_resume_names_a_corrupt_checkpoint_and_falls_back_to_the_newest_intact_one(six_steps, tiny_recipe,
                                                                                 damage, file):
    run_dir, reference = six_steps
    damage(run_dir / "checkpoints" / "step-000006" / file)
    assert verify_checkpoint(run_dir / "checkpoints" / "step-000006") == \
        f"{run_dir / 'checkpoints' / 'step-000006' / file} does not match the sha256 recorded when it was written"
    lines = []
    resumed = run(tiny_recipe("split", train={**SECTIONS["train"], "max_steps": 8}), log=lines.append,
                  resume=True)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert f"step-000006/{file} does not match the sha256" in warnings[0]
    assert "set step-000006 aside as step-000006.corrupt" in warnings[1]
    assert f"resuming {run_dir} from step 4 (step-000004)" in lines
    # steps 5-8 rerun from step 4's state: the run ends exactly where a straight 8-step run does
    assert resumed.steps == 8 and same_weights(resumed.model_dir, reference.model_dir)
    assert (run_dir / "checkpoints" / "step-000006.corrupt").is_dir()
    assert (run_dir / "latest").resolve().name == "step-000008"
    # each step once in the metrics, with the values of the run that counts
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, 9))
    lines_in_file = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                     if "\"loss\"" in line]
    assert lines_in_file == list(range(1, 9))  # the log itself was cut back on resume, not only read so
    straight = [r["loss"] for r in read_metrics(reference.run_dir) if "loss" in r]
    assert [r["loss"] for r in read_metrics(run_dir) if "loss" in r] == pytest.approx(straight, abs=1e-6)


def test_resume_from_chooses_a_checkpoint_and_refuses_a_corrupt_choice(six_steps, tiny_recipe):
    run_dir, reference = six_steps
    lines = []
    resumed = run(tiny_recipe("split", train={**SECTIONS["train"], "max_steps": 8}), log=lines.append,
                  resume_from="step-2")
    assert f"resuming {run_dir} from step 2 (step-000002)" in lines
    assert same_weights(resumed.model_dir, reference.model_dir)
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == list(range(1, 9))

    zero_bytes(run_dir / "checkpoints" / "step-000004" / "trainer.pt")
    with pytest.raises(LmforgeError, match=r"step-000004 is corrupt: .*step-000004/trainer.pt does not match"):
        find_checkpoint(run_dir, "step-000004")
    with pytest.raises(LmforgeError, match=r"--resume-from step-3: no such checkpoint .*checkpoints: step-000004, "
                                           r"step-000006, step-000008"):
        find_checkpoint(run_dir, "step-3")
    assert find_checkpoint(run_dir, str(run_dir / "checkpoints" / "step-000006")).name == "step-000006"


def test_checkpoints_written_before_checksums_still_resume_and_are_checked_by_their_weights(six_steps,
                                                                                          tiny_recipe):
    run_dir, reference = six_steps
    for manifest in (run_dir / "checkpoints").glob(f"*/{CHECKSUMS}"):
        manifest.unlink()  # as a checkpoint written before checksums were recorded
    assert verify_checkpoint(run_dir / "checkpoints" / "step-000006") is None
    flip_bit(run_dir / "checkpoints" / "step-000006" / "model.safetensors")  # lmforge.json has its sha256
    assert "model.safetensors does not match" in verify_checkpoint(run_dir / "checkpoints" / "step-000006")
    lines = []
    resumed = run(tiny_recipe("split", train={**SECTIONS["train"], "max_steps": 8}), log=lines.append, resume=True)
    assert f"resuming {run_dir} from step 4 (step-000004)" in lines
    assert same_weights(resumed.model_dir, reference.model_dir)


def test_a_dangling_latest_resumes_from_the_newest_intact_checkpoint(six_steps, tiny_recipe, cli, tmp_path):
    run_dir, reference = six_steps
    shutil.rmtree(run_dir / "checkpoints" / "step-000006")  # `latest` now points at nothing
    assert (run_dir / "latest").is_symlink() and not (run_dir / "latest").exists()
    # a reading command takes the newest intact one too, and says so
    exported = cli("export-checkpoint", run_dir, "--out", tmp_path / "exported")
    assert exported.returncode == 0, exported.stderr
    assert "latest points at checkpoints/step-000006, which does not exist" in " ".join(exported.stdout.split())
    assert same_weights(tmp_path / "exported", run_dir / "checkpoints" / "step-000004")
    lines = []
    resumed = run(tiny_recipe("split", train={**SECTIONS["train"], "max_steps": 8}), log=lines.append, resume=True)
    assert any("latest points at checkpoints/step-000006, which does not exist" in line for line in lines)
    assert f"resuming {run_dir} from step 4 (step-000004)" in lines
    assert same_weights(resumed.model_dir, reference.model_dir)


def test_no_intact_checkpoint_is_a_clear_error(six_steps, tiny_recipe):
    run_dir, _ = six_steps
    for folder in (run_dir / "checkpoints").iterdir():
        zero_bytes(folder / "trainer.pt")
    with pytest.raises(LmforgeError, match=r"no intact checkpoint in .* \(3 corrupt\)"):
        run(tiny_recipe("split", train={**SECTIONS["train"], "max_steps": 8}), resume=True)
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(LmforgeError, match="nothing to resume"):
        run(tiny_recipe("split", **SECTIONS), resume=True)


def test_a_failed_write_to_the_run_directory_is_one_line_and_keeps_the_last_checkpoint(tiny_recipe, monkeypatch):
    """In-process: the checkpoint after step 2 cannot be staged (EACCES, as a read-only run directory
    gives a non-root user); the real chmod is the next test."""
    import lmforge.atomic

    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(prefix="", dir=None):
        if prefix.startswith(".step-000004"):
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "x"))
        return real_mkdtemp(prefix=prefix, dir=dir)

    monkeypatch.setattr(lmforge.atomic.tempfile, "mkdtemp", mkdtemp)
    recipe = tiny_recipe("ro", **SECTIONS)
    with pytest.raises(LmforgeError) as info:
        run(recipe)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write to run directory {recipe.run.dir} (Permission denied: ")
    assert f"the last good checkpoint is {recipe.run.dir / 'checkpoints' / 'step-000002'}" in message
    assert verify_checkpoint(recipe.run.dir / "checkpoints" / "step-000002") is None
    assert not list((recipe.run.dir / "checkpoints").glob(".*"))  # no half-written staging folder
    monkeypatch.undo()
    assert run(recipe, resume=True).steps == 6


def _without_root_file_powers():
    """Drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from the bounding set before exec:
    the program then runs as root but meets file permissions as their owner does."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _make_writable(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o755 if path.is_dir() else 0o644) if writable else (0o555 if path.is_dir() else 0o444))


@pytest.mark.slow
def test_a_run_directory_made_read_only_mid_run_exits_2_with_one_line(tiny_data, tmp_path):
    """The real thing: `chmod -R a-w` on the run directory of a running `lmforge train`. Root writes
    through any permission, so under root the training process runs without the capabilities that
    let it (as a container's root without CAP_DAC_OVERRIDE does)."""
    args = ["train", "tiny", "--no-progress", "--run.out", tmp_path / "runs", "--run.name", "ro",
            "--data.dir", tiny_data, "--model.n_layer", "1", "--model.d_model", "32", "--model.context", "32",
            "--train.batch_size", "4", "--train.dtype", "float32", "--train.max_steps", "100000",
            "--train.checkpoint_every", "20", "--train.log_every", "1", "--eval.every", "100000"]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("lmforge")), *map(str, args)], cwd=tmp_path,
                            env={**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=_without_root_file_powers if os.geteuid() == 0 else None)
    run_dir = tmp_path / "runs" / "ro"
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "latest").is_symlink():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.02)
        _make_writable(run_dir, False)  # right after the first checkpoint: the next one is 20 steps away
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        _make_writable(run_dir, True)
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    line = " ".join(stderr.split())
    assert f"error: cannot write to run directory {run_dir} (Permission denied:" in line
    last = (run_dir / "latest").resolve()
    assert last.name == "step-000020" and verify_checkpoint(last) is None
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'step-000020'};" in line
    assert torch.load(last / "trainer.pt", weights_only=True)["step"] == 20


def test_metrics_readers_see_each_step_once_in_a_log_written_before_resumes_cut_it(tmp_path):
    """A log written before resumes cut it back repeats the steps that ran twice: readers keep the
    last record of each step and kind, in step order; a line cut short by a crash is skipped."""
    def train_record(step, loss):
        return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0}

    rows = [train_record(1, 5.0), train_record(2, 4.0), {"step": 2, "val_loss": 4.5}, train_record(3, 3.9),
            train_record(3, 3.5), train_record(2, 4.1), {"step": 2, "val_loss": 4.4}, train_record(3, 3.4),
            train_record(4, 3.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    seen = [(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(tmp_path)]
    assert seen == [(1, 5.0, None), (2, 4.1, None), (2, None, 4.4), (3, 3.4, None), (4, 3.0, None)]
    from lmforge.explain.dashboard import plot_runs

    plot_runs([tmp_path], tmp_path / "plots")  # the plot command reads through read_metrics
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 0
