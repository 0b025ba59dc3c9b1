"""Hyperparameter search with Optuna: `lmforge hpo RECIPE --space space.yaml --trials N`.

    runs/<study>/trial-0000/        an ordinary run directory per trial (recipe.yaml, metrics.jsonl, model/)
    runs/<study>/best.yaml          the best trial's full recipe: `lmforge train runs/<study>/best.yaml`
    runs/<study>/plots/history.png  validation loss per trial (pruned ones marked), best so far
    runs/<study>/plots/importance.png

The study lives in an RDB storage (a SQLite file by default, PostgreSQL across machines),
so every worker - the `--workers` processes started here, or `lmforge hpo` on other
machines with the same --storage and --study - shares it. Each trial samples the search
space with TPE, trains the recipe with those values, and reports its validation loss at
every `eval.every` steps; the pruner (median, or Hyperband's successive halving) stops
trials that fall behind. `--trials N` counts finished trials (complete or pruned) over the
whole life of the study, so running the same command again continues an interrupted
study. While a trial runs its worker writes a heartbeat; a trial whose worker died
(no heartbeat for twice --heartbeat seconds) is marked failed and another trial takes
its place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from lmforge.config import Recipe, Section, deep_merge, validated
from lmforge.data.prepare import data_dir_for, prepare
from lmforge.errors import LmforgeError, LossDiverged
from lmforge.train.hpo_space import SearchSpace, nested

Pruner = Literal["median", "hyperband", "none"]
PRUNERS = get_args(Pruner)
MAX_FAILURES_IN_A_ROW = 5
POLL_SECONDS = 1.0


class HpoSettings(Section):
    """Everything a worker needs; plain data, so it can be handed to a worker process as JSON."""

    recipe: dict[str, Any]  # the base recipe, resolved (data.dir pinned unless data.* is searched)
    space: dict[str, Any]  # the search space as written
    trials: int
    storage: str
    study: str
    pruner: Pruner = "median"
    seed: int | None = 0
    workers: int = 1
    heartbeat: int = 10
    minutes: float | None = None  # stop starting trials after this long (running ones finish)
    cpu_minutes: float | None = None  # ... or after each worker used this much CPU time

    @property
    def study_dir(self) -> Path:
        return Path(self.recipe["run"]["out"]) / self.study


@dataclass
class HpoResult:
    study: str
    storage: str
    study_dir: Path
    trials: list[dict[str, Any]]  # one row per trial: number, state, value, step, params, seconds, error
    best: dict[str, Any] | None
    best_recipe: Path | None
    plots: list[Path] = field(default_factory=list)

    def count(self, state: str) -> int:
        return sum(1 for t in self.trials if t["state"] == state)


# ---------------------------------------------------------------------------------------------
# storage, sampler, pruner


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # we print one line per trial ourselves
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def open_storage(url: str, heartbeat: int = 10):
    """An Optuna RDBStorage, or a LmforgeError saying why the URL cannot be used."""
    import optuna
    import sqlalchemy.exc

    _quiet_optuna()
    shown = _hide_password(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Workers write to one file; wait for each other's locks instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
        path = url.partition(":///")[2]
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LmforgeError(f"cannot reach storage {shown}: cannot create {Path(path).parent} "
                                   f"({e.strerror or e})") from None
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    try:
        with _creation_lock(url):
            for attempt in range(5):
                try:
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, grace_period=2 * heartbeat,
                                                      heartbeat_interval=heartbeat)
                except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                        sqlalchemy.exc.OperationalError) as e:
                    # Workers that open a new database at once race to create its tables; the loser retries.
                    if attempt == 4 or not isinstance(e, sqlalchemy.exc.IntegrityError) and "already exists" not in str(e):
                        raise
                    time.sleep(0.2 * (attempt + 1))
    except ImportError as e:
        raise LmforgeError(f"storage {shown} needs a database driver that is not installed ({e.name or e}); "
                           "for PostgreSQL: pip install psycopg2-binary") from None
    except sqlalchemy.exc.ArgumentError as e:
        raise LmforgeError(f"storage {shown} is not a usable database URL ({str(e).splitlines()[0]}); "
                           "use sqlite:///path/hpo.db or postgresql://user:password@host/db") from None
    except sqlalchemy.exc.DBAPIError as e:
        reason = str(getattr(e, "orig", e) or e).strip().splitlines()[0]
        raise LmforgeError(f"cannot reach storage {shown}: {reason}") from None
    except (sqlalchemy.exc.SQLAlchemyError, ValueError) as e:
        raise LmforgeError(f"cannot use storage {shown}: {str(e).splitlines()[0]}") from None
    except OSError as e:  # the SQLite lock file cannot be created
        raise LmforgeError(f"cannot reach storage {shown}: {e.strerror or e}") from None


@contextlib.contextmanager
def _creation_lock(url: str):
    """For a SQLite file, one process at a time opens (and so maybe creates) it."""
    path = url.partition(":///")[2] if url.startswith("sqlite") else ""
    if not path or path == ":memory:":
        yield
        return
    import fcntl

    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def make_pruner(name: str, recipe: dict[str, Any], trials: int):
    """median: stop a trial whose loss at a step is worse than the median of earlier trials
    there; hyperband: successive halving over brackets from eval.every to max_steps steps."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, trials // 4)), n_warmup_steps=0)
    if name == "hyperband":
        every, steps = recipe["eval"]["every"], recipe["train"]["max_steps"]
        return optuna.pruners.HyperbandPruner(min_resource=min(every, steps), max_resource=steps,
                                              reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise LmforgeError(f"unknown pruner {name!r}: use {', '.join(PRUNERS)}")


def make_sampler(seed: int | None, trials: int):
    """TPE whose randomness is seeded by (seed, trial number): a one-worker study is
    reproducible, and workers started together with one seed still draw different trials."""
    import optuna

    class TrialSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self):
            self._tpe = self._make(seed)

        @staticmethod
        def _make(s):
            # TPE models the results after a third of the budget (at most 10 random trials first);
            # constant_liar keeps parallel workers away from points already being tried.
            return optuna.samplers.TPESampler(seed=s, n_startup_trials=max(2, min(10, trials // 3)),
                                              constant_liar=True)

        def before_trial(self, study, trial):
            if seed is not None:
                self._tpe = self._make((seed * 1_000_003 + trial.number) % 2**32)
            self._tpe.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._tpe.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._tpe.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._tpe.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self._tpe.after_trial(study, trial, state, values)

    return TrialSeededTPE()


def open_study(settings: HpoSettings, create: bool = False):
    import optuna

    storage = open_storage(settings.storage, settings.heartbeat)
    sampler = make_sampler(settings.seed, settings.trials)
    pruner = make_pruner(settings.pruner, settings.recipe, settings.trials)
    if not create:
        return optuna.load_study(study_name=settings.study, storage=storage, sampler=sampler, pruner=pruner)
    study = optuna.create_study(study_name=settings.study, storage=storage, sampler=sampler, pruner=pruner,
                                direction="minimize", load_if_exists=True)
    attrs = study.user_attrs
    if "lmforge_space" not in attrs:
        study.set_user_attr("lmforge_space", settings.space)
        study.set_user_attr("lmforge_recipe", settings.recipe)
    else:
        for what, key, value in (("search space", "lmforge_space", settings.space),
                                 ("recipe", "lmforge_recipe", settings.recipe)):
            if attrs[key] != value:
                raise LmforgeError(f"study {settings.study} in {_hide_password(settings.storage)} was started with "
                                   f"another {what}; continue it with the same one, or choose a new --study")
    return study


# ---------------------------------------------------------------------------------------------
# the worker loop


class _TrialFailed(Exception):
    """A trial that could not run or broke (its reason is in the trial's `error` attribute)."""


def _counts(study) -> tuple[int, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    done = sum(1 for t in trials if t.state != TrialState.RUNNING)
    return done, len(trials) - done


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trial_recipe(settings: HpoSettings, values: dict[str, Any], number: int, device: str | None = None) -> Recipe:
    """The base recipe with a trial's values, writing to runs/<study>/trial-NNNN."""
    raw = deep_merge(settings.recipe, nested(values))
    raw = deep_merge(raw, {"run": {"out": str(settings.study_dir), "name": f"trial-{number:04d}"}})
    if device:
        raw = deep_merge(raw, {"train": {"device": device}})
    return validated(Recipe, raw, f"trial {number} recipe")


def run_worker(settings: HpoSettings, index: int = 0, log=print) -> None:
    """Run trials until the study has `settings.trials` finished ones (complete or pruned),
    or until `settings.minutes` have passed or it used `settings.cpu_minutes` of CPU time."""
    import optuna
    import torch
    from optuna.trial import TrialState

    from lmforge.train.trainer import train

    _quiet_optuna()
    study = open_study(settings)
    space = SearchSpace(settings.space, Recipe.model_validate(settings.recipe))
    searches_data = any(k.startswith("data.") for k in space.distributions)
    device = None
    if settings.workers > 1:
        if settings.recipe["train"]["device"] == "auto" and torch.cuda.device_count() > 1:
            device = f"cuda:{index % torch.cuda.device_count()}"  # spread workers over the GPUs
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    deadline = math.inf if settings.minutes is None else time.monotonic() + settings.minutes * 60
    cpu_deadline = math.inf if settings.cpu_minutes is None else time.process_time() + settings.cpu_minutes * 60
    failures_in_a_row, last_error = 0, ""

    def objective(trial: optuna.Trial) -> float:
        nonlocal failures_in_a_row, last_error
        ahead = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        if sum(1 for t in ahead if t.number < trial.number) >= settings.trials:
            # Another worker started the last trial a moment before this one: don't run a surplus trial.
            trial.set_user_attr("error", "not run: the study already had --trials trials")
            trial.set_user_attr("surplus", True)
            raise _TrialFailed("surplus")
        values = space.suggest(trial)
        trial.set_user_attr("worker", worker_id)
        shown = " ".join(f"{_short(k)}={_fmt(v)}" for k, v in values.items())
        started = time.perf_counter()
        try:
            recipe = trial_recipe(settings, values, trial.number, device)
            trial.set_user_attr("run_dir", str(recipe.run.dir))
            if searches_data:
                prepare_locked(recipe)

            def on_validation(step, result):
                trial.report(result.loss, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"validation loss {result.loss:.4f} at step {step}")

            result = train(recipe, progress=False, log=lambda *a: None, on_validation=on_validation)
        except optuna.TrialPruned as e:
            failures_in_a_row = 0
            log(f"trial {trial.number}: {shown} -> pruned, {e} ({time.perf_counter() - started:.0f} s)")
            raise
        except LossDiverged as e:  # a bad trial, not a broken one
            failures_in_a_row = 0
            trial.set_user_attr("diverged", True)
            log(f"trial {trial.number}: {shown} -> pruned, diverged ({e})")
            raise optuna.TrialPruned(str(e)) from None
        except LmforgeError as e:
            failures_in_a_row += 1
            last_error = str(e)
            trial.set_user_attr("error", last_error)
            log(f"trial {trial.number}: {shown} -> failed: {e}")
            raise _TrialFailed(str(e)) from None
        failures_in_a_row = 0
        trial.set_user_attr("tokens_per_s", result.tokens / max(result.seconds, 1e-9))
        trial.set_user_attr("steps", result.steps)
        log(f"trial {trial.number}: {shown} -> validation loss {result.val.loss:.4f} "
            f"({time.perf_counter() - started:.0f} s)")
        return result.val.loss

    while True:
        optuna.storages.fail_stale_trials(study)  # trials whose worker died
        done, running = _counts(study)
        if done >= settings.trials or time.monotonic() >= deadline or time.process_time() >= cpu_deadline:
            return
        if done + running >= settings.trials:
            time.sleep(POLL_SECONDS)  # the last trials are running elsewhere; take over if one fails
            continue
        if failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise LmforgeError(f"{failures_in_a_row} trials in a row failed; the last: {last_error}")
        study.optimize(objective, n_trials=1, catch=(_TrialFailed,), gc_after_trial=False)


def prepare_locked(recipe: Recipe, log=None) -> Path:
    """Prepare a recipe's data with one process at a time (workers and commands started
    together would otherwise tokenize into the same directory at once)."""
    import fcntl

    folder = data_dir_for(recipe)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return prepare(recipe.data, folder, progress=log and (lambda s: log(f"data: {s}")))


def _worker_main(settings_json: str, index: str) -> None:
    """Entry point of a worker process started by `run_hpo` (python -m lmforge.train.hpo)."""
    settings = HpoSettings.model_validate_json(settings_json)
    try:
        run_worker(settings, int(index), log=lambda s: print(f"[worker {index}] {s}", flush=True))
    except LmforgeError as e:
        print(f"[worker {index}] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# the study: start, run, report


def run_hpo(base: Recipe, space: SearchSpace | dict, trials: int, storage: str | None = None,
            study: str | None = None, workers: int = 1, pruner: str = "median", seed: int | None = 0,
            heartbeat: int = 10, minutes: float | None = None, cpu_minutes: float | None = None,
            log=print) -> HpoResult:
    """Run (or continue) a study until it has `trials` finished trials; export and plot it."""
    if trials < 1:
        raise LmforgeError("--trials must be at least 1")
    if workers < 1:
        raise LmforgeError("--workers must be at least 1")
    if heartbeat < 1:
        raise LmforgeError("--heartbeat must be at least 1 second")
    for name, value in (("--minutes", minutes), ("--cpu-minutes", cpu_minutes)):
        if value is not None and value <= 0:
            raise LmforgeError(f"{name} must be positive")
    if pruner not in PRUNERS:
        raise LmforgeError(f"unknown pruner {pruner!r}: use {', '.join(PRUNERS)}")
    if isinstance(space, dict):
        space = SearchSpace(space, base)
    base = base.model_copy(deep=True)
    if any(k.startswith("data.") for k in space.distributions):
        if base.data.dir:
            raise LmforgeError("the search space changes data settings but the recipe fixes data.dir; "
                               "leave data.dir unset so each data setting gets its own directory")
    else:  # prepare the data once, before any worker starts
        base.data.dir = str(prepare_locked(base, log))
    settings = HpoSettings(recipe=base.model_dump(mode="json"), space=json.loads(json.dumps(space.raw)),
                           trials=trials, storage=storage or f"sqlite:///{Path(base.run.out) / 'hpo.db'}",
                           study=study or f"{base.run.name}-hpo", pruner=pruner, seed=seed, workers=workers,
                           heartbeat=heartbeat, minutes=minutes, cpu_minutes=cpu_minutes)
    optuna_study = open_study(settings, create=True)
    if not optuna_study.trials and any(settings.study_dir.glob("trial-*")):
        raise LmforgeError(f"{settings.study_dir} holds trials of an earlier study named {settings.study} "
                           "that this storage does not know; delete that directory or choose another --study")
    done, _ = _counts(optuna_study)
    log(f"study {settings.study} in {_hide_password(settings.storage)}: {done} of {trials} trials done; "
        f"{workers} worker{'s' if workers > 1 else ''}, pruner {pruner}")
    children = [subprocess.Popen([sys.executable, "-m", "lmforge.train.hpo", settings.model_dump_json(), str(i)])
                for i in range(1, workers)]
    try:
        run_worker(settings, 0, log=(lambda s: log(f"[worker 0] {s}")) if workers > 1 else log)
        codes = [c.wait() for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.terminate()
                c.wait()
    if any(codes):
        log(f"{sum(1 for c in codes if c)} worker process(es) stopped with an error (see above)")
    return report(settings)


def report(settings: HpoSettings) -> HpoResult:
    """Summarize a study from its storage; write best.yaml and the plots."""
    study = open_study(settings)
    rows = [_row(t) for t in sorted(study.trials, key=lambda t: t.number)]
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = min(complete, key=lambda r: r["value"]) if complete else None
    best_path = export_best(settings, best) if best else None
    plots = plot_study(study, rows, settings.study_dir / "plots")
    return HpoResult(settings.study, settings.storage, settings.study_dir, rows, best, best_path, plots)


def _row(t) -> dict[str, Any]:
    steps = sorted(t.intermediate_values)
    value = t.value if t.state.name == "COMPLETE" else (t.intermediate_values[steps[-1]] if steps else None)
    seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    return {"number": t.number, "state": t.state.name, "value": value,
            "step": t.user_attrs.get("steps", steps[-1] if steps else None), "params": dict(t.params),
            "seconds": seconds, "error": t.user_attrs.get("error"), "run_dir": t.user_attrs.get("run_dir"),
            "diverged": bool(t.user_attrs.get("diverged"))}


def export_best(settings: HpoSettings, best: dict[str, Any]) -> Path:
    """runs/<study>/best.yaml: the base recipe with the best trial's values, runnable as is."""
    recipe = trial_recipe(settings, best["params"], best["number"])
    recipe.run.out, recipe.run.name = settings.recipe["run"]["out"], f"{settings.study}-best"
    path = settings.study_dir / "best.yaml"
    values = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
    header = (f"# Best trial ({best['number']}) of study {settings.study}: validation loss {best['value']:.4f}\n"
              f"# with {values}\n# Train it: lmforge train {path}\n")
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + recipe.to_yaml())
    os.replace(tmp, path)
    return path


def plot_study(study, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """history.png (loss per trial, pruned ones at the step they stopped; best so far) and
    importance.png (Optuna's parameter importances, when at least two trials completed)."""
    from lmforge.plotting import pyplot

    plt = pyplot()  # headless, with a CJK fallback font

    finished = [r for r in rows if r["value"] is not None and math.isfinite(r["value"])]
    if not finished:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for state, style in (("COMPLETE", dict(marker="o", color="tab:blue", label="complete")),
                         ("PRUNED", dict(marker="x", color="tab:gray", label="pruned (last reported)"))):
        pts = [(r["number"], r["value"]) for r in finished if r["state"] == state]
        if pts:
            ax.scatter(*zip(*pts), **style)
    complete = [(r["number"], r["value"]) for r in finished if r["state"] == "COMPLETE"]
    if complete:
        best, line = math.inf, []
        for n, v in complete:
            best = min(best, v)
            line.append((n, best))
        ax.step(*zip(*line), where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{study.study_name}: optimization history")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "history.png", dpi=110)
    plt.close(fig)
    written.append(out / "history.png")

    if len(complete) >= 2:
        import optuna

        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError):  # e.g. every completed trial drew the same values
            importances = {}
        if importances:
            names = list(importances)[::-1]
            fig, ax = plt.subplots(figsize=(7, 1.2 + 0.4 * len(names)))
            ax.barh(names, [importances[n] for n in names], color="tab:blue")
            ax.set_xlabel("importance (share of the validation loss variation)")
            ax.set_title(f"{study.study_name}: parameter importances")
            fig.tight_layout()
            fig.savefig(out / "importance.png", dpi=110)
            plt.close(fig)
            written.append(out / "importance.png")
    return written


def summary_table(result: HpoResult):
    from rich.table import Table

    keys = list(dict.fromkeys(k for r in result.trials for k in r["params"]))
    table = Table(title=f"study {result.study}", title_justify="left")
    for name in ("trial", "state", "val loss", "step", *(_short(k) for k in keys), "seconds"):
        table.add_column(name, justify="left" if name == "state" else "right")
    best_number = result.best["number"] if result.best else None
    for r in result.trials:
        state = r["state"].lower() + (" (diverged)" if r["diverged"] else "")
        if r["state"] == "FAIL" and r["error"]:
            state = f"failed: {r['error'][:60]}"
        elif r["state"] == "FAIL":
            state = "failed (worker stopped)"
        cells = [str(r["number"]), state, "" if r["value"] is None else f"{r['value']:.4f}",
                 "" if r["step"] is None else str(r["step"]), *(_fmt(r["params"].get(k, "")) for k in keys),
                 "" if r["seconds"] is None else f"{r['seconds']:.0f}"]
        table.add_row(*cells, style="bold green" if r["number"] == best_number else None)
    return table


if __name__ == "__main__":
    _worker_main(*sys.argv[1:])
