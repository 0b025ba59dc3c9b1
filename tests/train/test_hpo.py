"""Hyperparameter search (`lmforge hpo`): search-space validation, storage errors, a small
study that finds a sensible learning rate with pruning, workers sharing one SQLite storage,
a killed study that resumes, and best.yaml that trains."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lmforge.config import load_recipe
from lmforge.errors import LmforgeError
from lmforge.train.hpo import HpoSettings, open_storage, open_study, run_hpo
from lmforge.train.hpo_space import SearchSpace
from lmforge.train.trainer import train

LR_SPACE = {"train.lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True}}
# A few seconds per trial: one layer of width 32, 30 steps, validation every 10.
SMALL = dict(model={"n_layer": 1, "d_model": 32, "n_head": 4, "n_kv_head": 2, "context": 32},
             train={"batch_size": 4, "max_steps": 30, "warmup": 3, "checkpoint_every": 1000, "log_every": 10},
             eval={"every": 10, "batches": 2})


@pytest.fixture
def base(tiny_recipe):
    return tiny_recipe("search", **SMALL)


def quiet(*_):
    pass


# --- the search space ----------------------------------------------------------------------


@pytest.mark.parametrize("space, message", [
    ({"train.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, "low (0.01) must be below high"),
    ({"train.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}, "log scale needs low > 0"),
    ({"train.lr": {"type": "float", "low": -1.0, "high": 1e-2}}, "train.lr = -1.0 is not a valid value"),
    ({"train.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}, "train has no key 'lrr'"),
    ({"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, "the recipe has no key 'optim'"),
    ({"data.tokenizer": {"type": "int", "low": 1, "high": 2}}, "is a section"),
    ({"train.lr": {"type": "normal", "low": 1e-4, "high": 1e-2}}, "unknown type 'normal'"),
    ({"train.lr": {"low": 1e-4, "high": 1e-2}}, "needs a mapping with a type"),
    ({"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "lgo": True}}, "has no lgo"),
    ({"model.n_layer": {"type": "int", "low": 1.5, "high": 4}}, "low must be an integer"),
    ({"model.n_layer": {"type": "int", "low": 1, "high": 4, "step": 8}}, "larger than the range"),
    ({"model.n_layer": {"type": "int", "low": 0, "high": 4}}, "model.n_layer = 0 is not a valid value"),
    ({"train.schedule": {"type": "categorical", "choices": ["cosine", "linear"]}}, "'linear' is not a valid value"),
    ({"train.schedule": {"type": "categorical", "choices": []}}, "non-empty list"),
    ({"run.name": {"type": "categorical", "choices": ["a", "b"]}}, "run.name cannot be searched"),
    ({"eval.batches": {"type": "int", "low": 1, "high": 4}}, "eval.batches cannot be searched"),
    ({}, "non-empty YAML mapping"),
])
def test_invalid_space_is_a_clear_error(base, space, message):
    with pytest.raises(LmforgeError, match="search space") as err:
        SearchSpace(space, base)
    assert message in str(err.value)


def test_space_reads_yaml_and_accepts_exponents_without_a_dot(base, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("train.lr: {type: float, low: 1e-4, high: 1e-2, log: true}\n"
                    "model.n_layer: {type: int, low: 1, high: 4}\n"
                    "train.schedule: {type: categorical, choices: [cosine, wsd]}\n")
    space = SearchSpace.load(path, base)
    lr = space.distributions["train.lr"]
    assert (lr.low, lr.high, lr.log) == (1e-4, 1e-2, True)
    values = space.suggest(optuna.create_study().ask())
    assert set(values) == {"train.lr", "model.n_layer", "train.schedule"}
    assert 1 <= values["model.n_layer"] <= 4 and values["train.schedule"] in ("cosine", "wsd")


@pytest.mark.parametrize("text, message", [
    (None, "search space space.yaml does not exist: give a YAML file of recipe keys and their distributions"),
    ("train.lr: {type: float, low: 1e-4\n", "space.yaml is not valid YAML at line 2, column 1"),
    ("- train.lr\n- train.warmup\n", "space.yaml must be a YAML mapping"),
    ("", "search space space.yaml must be a non-empty YAML mapping of recipe keys to distributions"),
    ("train.lr: {type: float, low: 1.0e-2, high: 1.0e-4}\n", "search space space.yaml: train.lr: low (0.01) must be below high"),
])
def test_space_file_problems_are_one_clear_line(base, tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    if text is not None:
        (tmp_path / "space.yaml").write_text(text)
    with pytest.raises(LmforgeError) as err:
        SearchSpace.load("space.yaml", base)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_combined_values_are_checked_per_trial_not_up_front(base):
    # d_model 48 with n_head 4 is fine, 32 with 6 is not: such combinations are judged per trial.
    SearchSpace({"model.d_model": {"type": "categorical", "choices": [32, 48]},
                 "model.n_head": {"type": "categorical", "choices": [4, 6]}}, base)


def test_invalid_space_through_the_cli(cli, tmp_path):
    (tmp_path / "space.yaml").write_text("train.lr: {type: float, low: 1.0, high: 0.1}\n")
    proc = cli("hpo", "tiny", "--space", "space.yaml", "--trials", "2")
    assert proc.returncode == 2
    assert "low (1.0) must be below high (0.1)" in proc.stderr and "Traceback" not in proc.stderr


# --- the storage ---------------------------------------------------------------------------


def test_unreachable_storage_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(LmforgeError, match="cannot reach storage"):
        open_storage(f"sqlite:///{blocker}/hpo.db")
    with pytest.raises(LmforgeError, match=r"storage postgresql://lm:\*\*\*@127.0.0.1:9/db") as err:
        open_storage("postgresql://lm:secret@127.0.0.1:9/db")
    assert "secret" not in str(err.value)
    with pytest.raises(LmforgeError, match="not a usable database URL"):
        open_storage("nosuchdb://somewhere/db")


def test_continuing_a_study_with_another_space_is_refused(base, tmp_path):
    settings = HpoSettings(recipe=base.model_dump(mode="json"), space=LR_SPACE, trials=2,
                           storage=f"sqlite:///{tmp_path / 'hpo.db'}", study="s")
    open_study(settings, create=True)
    open_study(settings, create=True)  # the same space and recipe: continues
    settings.space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True}}
    with pytest.raises(LmforgeError, match="was started with another search space"):
        open_study(settings, create=True)


# --- studies -------------------------------------------------------------------------------


def trial_states(db) -> list[str]:
    """Trial states straight from optuna's SQLite tables ([] before the study exists)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            states = [row[0] for row in conn.execute("SELECT state FROM trials")]
            # A running trial counts once its worker has written a heartbeat: killed before that,
            # optuna can never tell it died, and a resumed study waits for it.
            beating = {row[0] for row in conn.execute("SELECT trial_id FROM trial_heartbeats")}
            running = [row[0] for row in conn.execute("SELECT trial_id FROM trials WHERE state = 'RUNNING'")]
            return [st for st in states if st != "RUNNING"] + ["RUNNING" for t in running if t in beating]
    except sqlite3.Error:  # no file or no table yet
        return []


def load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def finished(study: optuna.Study) -> list:
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


@pytest.mark.slow
def test_pruned_study_finds_a_sensible_learning_rate(base, tmp_path):
    """Tiny learning rates barely move in 30 steps and huge ones thrash: the best lies between,
    and the median pruner stops the worst trials at their first validations."""
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    result = run_hpo(base, LR_SPACE, trials=10, storage=storage, study="lr", pruner="median", seed=0, log=quiet)
    assert result.count("COMPLETE") + result.count("PRUNED") == 10
    assert result.count("PRUNED") >= 2
    best_lr = result.best["params"]["train.lr"]
    assert 1e-3 <= best_lr <= 0.3, result.trials
    for row in result.trials:  # tiny learning rates never beat the best
        if row["params"]["train.lr"] < 1e-4 and row["value"] is not None:
            assert row["value"] > result.best["value"] + 0.5
    study_dir = tmp_path / "runs" / "lr"
    assert sorted(p.name for p in study_dir.glob("trial-*")) == [f"trial-{n:04d}" for n in range(10)]
    assert (study_dir / "plots" / "history.png").stat().st_size > 0
    assert (study_dir / "plots" / "importance.png").stat().st_size > 0

    best = load_recipe(result.best_recipe)  # a full recipe that trains as it is
    assert best.train.lr == pytest.approx(best_lr) and best.run.name == "lr-best"
    assert best.model.n_layer == 1 and best.train.max_steps == 30
    trained = train(best, progress=False, log=quiet)
    assert trained.val.loss == pytest.approx(result.best["value"], abs=1e-3)  # the same run, reproduced

    # Asking for more trials continues the study; the ones done count.
    more = run_hpo(base, LR_SPACE, trials=11, storage=storage, study="lr", pruner="median", seed=0, log=quiet)
    assert len(more.trials) == 11 and [r["number"] for r in more.trials] == list(range(11))


def hpo_cli(tmp_path: Path, recipe: Path, storage: str, trials: int, *extra: str) -> list[str]:
    return [str(Path(sys.executable).with_name("lmforge")), "hpo", str(recipe), "--space", str(tmp_path / "space.yaml"),
            "--trials", str(trials), "--storage", storage, "--study", "shared", *extra]


def write_inputs(base, tmp_path: Path) -> Path:
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(LR_SPACE))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(base.to_yaml())
    return recipe


@pytest.mark.slow
def test_workers_share_one_sqlite_storage_without_duplicates(base, tmp_path):
    """Two commands at once on one storage, one of them with two worker processes."""
    recipe = write_inputs(base, tmp_path)
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    short = ["--pruner", "none", "--train.max_steps", "10"]
    procs = [subprocess.Popen(hpo_cli(tmp_path, recipe, storage, 6, "--workers", str(k), *short),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (2, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
    study = load(storage, "shared")
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6  # exactly the requested number ran
    assert all(t.user_attrs.get("surplus") for t in study.trials if t.state == TrialState.FAIL)
    assert len({t.params["train.lr"] for t in complete}) == 6  # no two workers drew the same trial
    assert len({t.user_attrs["worker"] for t in complete}) >= 2
    for t in complete:
        assert (tmp_path / "runs" / "shared" / f"trial-{t.number:04d}" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_killed_study_resumes_and_its_lost_trial_is_failed(base, tmp_path):
    recipe = write_inputs(base, tmp_path)
    storage = f"sqlite:///{tmp_path / 'hpo.db'}"
    # Trials long enough to be caught mid-way by the 0.1 s polling below (a second or more even on a
    # fast, idle machine; the kill follows the poll that saw the trial running within milliseconds);
    # each of the four and a half trials costs its steps again, so no longer than that.
    cmd = hpo_cli(tmp_path, recipe, storage, 4, "--heartbeat", "1", "--pruner", "none",
                  "--train.max_steps", "100")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill it in the middle of its third trial
            time.sleep(0.1)
            assert proc.poll() is None, f"the study ended before it could be killed: {proc.stderr.read()[-2000:]}"
            states = trial_states(tmp_path / "hpo.db")  # plain SQL: optuna's load_study is too slow to poll
            if states.count("COMPLETE") >= 2 and "RUNNING" in states:
                break
        else:
            pytest.fail("the study did not reach its third trial")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = [t.number for t in load(storage, "shared").trials if t.state == TrialState.RUNNING]
    assert killed

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    study = load(storage, "shared")
    assert len(finished(study)) == 4
    assert {t.number for t in study.trials if t.state == TrialState.FAIL} == set(killed)
    assert "1 failed" in again.stdout and "best" in again.stdout
    assert (tmp_path / "runs" / "shared" / "best.yaml").is_file()


@pytest.mark.slow
def test_hyperband_study_runs_to_its_trial_count(base, tmp_path):
    result = run_hpo(base, LR_SPACE, trials=4, storage=f"sqlite:///{tmp_path / 'hpo.db'}", study="hb",
                     pruner="hyperband", seed=1, log=quiet)
    assert result.count("COMPLETE") + result.count("PRUNED") == 4 and result.count("FAIL") == 0
    assert result.best is not None and (tmp_path / "runs" / "hb" / "best.yaml").is_file()


def test_a_diverging_trial_is_pruned_not_failed(base, tmp_path):
    """A learning rate that drives the loss to NaN/inf raises LossDiverged (a bad setting, not
    a broken run); the search recognises it by type and prunes that trial, marked diverged."""
    from lmforge.errors import LossDiverged

    huge = base.model_copy(deep=True)
    huge.train.lr, huge.train.warmup, huge.train.schedule = 1.0e6, 0, "constant"
    with pytest.raises(LossDiverged) as info:
        train(huge, progress=False, log=quiet)
    assert str(info.value).startswith("loss became") and info.value.step >= 1 and not math.isfinite(info.value.loss)

    space = {"train.lr": {"type": "categorical", "choices": [1.0e6]}}
    base.train.warmup, base.train.schedule = 0, "constant"
    result = run_hpo(base, space, trials=2, storage=f"sqlite:///{tmp_path / 'hpo.db'}", study="huge",
                     pruner="none", log=quiet)
    assert [(r["state"], r["diverged"]) for r in result.trials] == [("PRUNED", True), ("PRUNED", True)]
    assert result.best is None and result.count("FAIL") == 0
