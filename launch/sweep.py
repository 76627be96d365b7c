r"""Grid sweeps: one training run per combination of config values, and a summary table.

    python -m launch.sweep --config=configs/demo.py --workdir=runs/sweep \
        --sweep 'model.sex_fusion=none,concat,winner16bit' --sweep 'data.image_size=256,384' \
        [--set num_train_steps=500 ...] [--folds 5] [--print] [--summarize_only] [--cpu_devices=N]

runs the cartesian product of the ``--sweep`` values one after another on this machine, each
as ``python -m boneage_jax.main --config=... --workdir=<workdir>/<name> --config.<key>=<value>
...`` with ``--set`` overrides added to every run. Values are split at top-level commas (so
``'model.kwargs.filters=(8,16),(16,32)'`` is two values) and passed to the config flags as
written; the summary reads them as Python literals where they are ones, else as strings. The
run's folder name comes from its values, e.g. ``sex_fusion=none,image_size=256`` (the last
part of each key, the whole key where two keys share it; in values, runs of characters other
than letters, digits and ``.+-`` become ``_``: ``filters=8_16`` for ``(8, 16)``).
Each run's console output is also kept in ``<name>/train.log``.

``--folds K`` adds ``data.num_folds=K`` and ``data.fold=0..K-1`` to the grid: K-fold
cross-validation of every combination of the other values, which the summary also reports as
the mean and (sample) standard deviation over its finished folds: two CSV rows with
``data.fold`` = ``mean`` and ``sd``, one markdown row of ``mean ± sd``; their
``validation_num_examples`` is the folds' total (the whole training pool).

After the runs, ``<workdir>/summary.csv`` and ``<workdir>/summary.md`` list one row per run
with its swept values, its status and the final validation and test metrics of its
``results.json`` (mae, rmse, r2, num_examples, and accuracy for age classes). A failing run is
listed with status ``failed`` and the sweep goes on; the exit status is then 1. Running the
same command again skips runs whose ``results.json`` exists (and resumes the others from
their checkpoints). ``--print`` prints the commands of the runs still to do, one a line, to
start as separate jobs (e.g. each through ``launch/multihost.py`` or a cluster scheduler);
``--summarize_only`` then rebuilds the summary from the run folders (status ``ok`` with a
``results.json``; ``failed`` or ``started`` as this command last left them, recorded in
``<workdir>/sweep_status.json``; ``incomplete`` for a folder without results that another
job may still be writing; ``not started``).

Arguments this command does not define (``--`` may come before them) are passed on to every
run's ``boneage_jax.main``. A malformed ``--sweep``/``--set`` or ``--folds`` stops the command
with one error line naming it. The summary files are written atomically (``boneage_jax.io``).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Sequence

from absl import app, flags

from boneage_jax import cli, io
from launch import local

FLAGS = flags.FlagValues()  # this command's flags (cli.parse_known); the others go to every run's boneage_jax.main
_CONFIG = flags.DEFINE_string("config", None, "Training configuration file (boneage_jax.main's --config).",
                              flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Parent folder of the runs and the summary.", flag_values=FLAGS)
_SWEEP = flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: config values to sweep (repeat for a grid).",
                                   flag_values=FLAGS)
_SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE: a config override for every run (repeatable; KEY= sets "
                                 "an empty string).",
                                 flag_values=FLAGS)
_FOLDS = flags.DEFINE_integer("folds", 0, "K-fold cross-validation of every combination (K >= 2; 0: none).",
                              flag_values=FLAGS)
_PRINT = flags.DEFINE_bool("print", False, "Print the commands of the runs still to do.", flag_values=FLAGS)
_SUMMARIZE_ONLY = flags.DEFINE_bool("summarize_only", False, "Rebuild the summary from the run folders.",
                                    flag_values=FLAGS)
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Split the CPU into N JAX devices.", lower_bound=1,
                                    flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)

METRICS = ("mae", "rmse", "r2", "num_examples", "accuracy")
SPLITS = ("validation", "test")
STATUS_FILE = "sweep_status.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


# ----------------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
    """Splits at commas outside brackets and quotes: ``"a,(1,2),'x,y'"`` -> ``["a", "(1,2)", "'x,y'"]``."""
    values, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    values.append("".join(current).strip())
    if any(v == "" for v in values):
        raise ValueError(f"empty value in {text!r}")
    return values


def parse_value(text: str):
    """A Python literal where the text is one, else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_assignment(text: str, option: str, empty_value: bool = False) -> tuple[str, str]:
    """``key=value`` -> (key, value); ``empty_value``: ``key=`` is allowed (an empty string, e.g.
    ``--set init_from=`` or ``--set data.augment=``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or not (value.strip() or empty_value):
        raise ValueError(f"{option} {text!r}: expected key=value" + ("" if empty_value else " (a non-empty value)"))
    if key.startswith("config."):
        key = key[len("config."):]
    return key, value.strip()


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    values: tuple[tuple[str, str], ...]  # (key, value text) of the swept keys, in sweep order

    def literal(self, key: str):
        return parse_value(dict(self.values)[key])


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's last part, or the whole key where two keys share the last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _safe(value: str) -> str:
    """A value for a folder name: runs of characters other than letters, digits and . + -
    become one ``_`` (``(8, 16)`` -> ``8_16``)."""
    return _UNSAFE.sub("_", value).strip("_") or "_"


def run_name(values: tuple[tuple[str, str], ...], names: dict[str, str]) -> str:
    name = ",".join(f"{_safe(names[k])}={_safe(v)}" for k, v in values).strip(".") or "run"
    if len(name) > 180:
        name = name[:160] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def grid(sweeps: list[tuple[str, list[str]]], folds: int = 0) -> list[Run]:
    """The cartesian product of the swept values (folds innermost)."""
    sweeps = list(sweeps)
    if folds:
        sweeps += [("data.num_folds", [str(folds)]), ("data.fold", [str(i) for i in range(folds)])]
    keys = [k for k, _ in sweeps]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a key is swept twice: {keys}")
    names = short_names(keys)
    runs = []
    for combination in itertools.product(*(values for _, values in sweeps)):
        values = tuple(zip(keys, combination))
        runs.append(Run(run_name(values, names), values))
    seen = {}
    for run in runs:
        if run.name in seen:
            raise ValueError(f"runs {dict(seen[run.name].values)} and {dict(run.values)} get the same folder name "
                             f"{run.name!r}")
        seen[run.name] = run
    return runs


def command(config: str, workdir: str, run: Run, sets: list[tuple[str, str]], extra: list[str]) -> list[str]:
    overrides = [f"--config.{k}={v}" for k, v in [*sets, *run.values]]
    return local.command(config, os.path.join(workdir, run.name), [*overrides, *extra])


# ----------------------------------------------------------------------------- the summary


def results_path(workdir: str, run: Run) -> str:
    return os.path.join(workdir, run.name, "results.json")


def read_results(workdir: str, run: Run) -> dict | None:
    path = results_path(workdir, run)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_statuses(workdir: str) -> dict[str, str]:
    """Statuses of runs this sweep started (``failed``), kept in ``<workdir>/sweep_status.json``."""
    try:
        with open(os.path.join(workdir, STATUS_FILE)) as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return {}


def write_statuses(workdir: str, statuses: dict[str, str]) -> None:
    io.write_text(os.path.join(workdir, STATUS_FILE), json.dumps(statuses, indent=2, sort_keys=True))


def metric_columns(results: list[dict | None]) -> list[str]:
    present = {(s, m) for r in results if r for s in SPLITS for m in METRICS if m in r.get(s, {})}
    return [f"{s}_{m}" for s in SPLITS for m in METRICS if (s, m) in present or m != "accuracy"]


def run_rows(workdir: str, runs: list[Run], statuses: dict[str, str]) -> tuple[list[str], list[dict]]:
    """One row per run: name, status, swept values, metrics."""
    keys = [k for k, _ in runs[0].values] if runs else []
    results = [read_results(workdir, run) for run in runs]
    columns = ["name", "status", *keys, *metric_columns(results)]
    rows = []
    for run, result in zip(runs, results):
        if result is not None:
            status = "ok"
        elif run.name in statuses:
            status = statuses[run.name]
        else:
            status = "incomplete" if os.path.isdir(os.path.join(workdir, run.name)) else "not started"
        row = {"name": run.name, "status": status, **{k: run.literal(k) for k in keys}}
        for split in SPLITS:
            for metric in METRICS:
                value = (result or {}).get(split, {}).get(metric)
                if value is not None:
                    row[f"{split}_{metric}"] = value
        rows.append(row)
    return columns, rows


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, sd


def fold_aggregates(columns: list[str], rows: list[dict], folds: int) -> list[tuple[dict, dict]]:
    """(mean row, sd row) over the folds of each combination of the other swept values; the
    mean row sums ``validation_num_examples`` (the folds' validation sets make up the pool)."""
    keys = [c for c in columns[2:] if c not in _metric_names() and c not in ("data.num_folds", "data.fold")]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(repr(row[k]) for k in keys), []).append(row)
    out = []
    for members in groups.values():
        done = [r for r in members if r["status"] == "ok"]
        label = f"mean over {len(done)} of {folds} folds"
        name = re.sub(r"(^|,)num_folds=[^,]*,fold=[^,]*$", "", members[0]["name"]) or "all"
        mean_row = {"name": name, "status": label,
                    **{k: members[0][k] for k in keys}, "data.num_folds": folds, "data.fold": "mean"}
        sd_row = {**mean_row, "status": "sd", "data.fold": "sd"}
        for column in columns:
            if column not in _metric_names():
                continue
            values = [r[column] for r in done if r.get(column) is not None]
            if not values:
                continue
            if column == "validation_num_examples":  # the folds' validation sets: the whole pool
                mean_row[column] = sum(values)
                continue
            if column.endswith("num_examples"):  # every fold tests on the same images
                mean_row[column] = values[0] if len(set(values)) == 1 else sum(values) / len(values)
                continue
            mean_row[column], sd_row[column] = _mean_sd([float(v) for v in values])
        out.append((mean_row, sd_row))
    return out


def _metric_names() -> set[str]:
    return {f"{s}_{m}" for s in SPLITS for m in METRICS}


def _cell(value, metric: bool = True) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and metric:
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_summary(workdir: str, runs: list[Run], statuses: dict[str, str], folds: int = 0) -> list[dict]:
    """Writes summary.csv and summary.md; returns the per-run rows."""
    columns, rows = run_rows(workdir, runs, statuses)
    aggregates = fold_aggregates(columns, rows, folds) if folds else []
    csv_rows = [[_csv(row.get(c)) for c in columns] for row in rows]
    for mean_row, sd_row in aggregates:
        csv_rows += [[_csv(mean_row.get(c)) for c in columns], [_csv(sd_row.get(c)) for c in columns]]
    io.write_csv(os.path.join(workdir, "summary.csv"), columns, csv_rows)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), c in _metric_names()) for c in columns) + " |" for row in rows]
    for mean_row, sd_row in aggregates:
        cells = []
        for c in columns:
            if c in _metric_names() and c in sd_row and not c.endswith("num_examples"):
                cells.append(f"{_cell(mean_row[c])} ± {_cell(sd_row[c])}")
            else:
                cells.append(_cell(mean_row.get(c), c in _metric_names()) if c != "data.fold" else "mean ± sd")
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    text = f"# Sweep {os.path.abspath(workdir)}\n\n" + "\n".join(lines) + "\n"
    if failed:
        text += "\nFailed: " + ", ".join(failed) + " (see <name>/train.log)\n"
    io.write_text(os.path.join(workdir, "summary.md"), text)
    return rows


def _csv(value):
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, (tuple, list, dict)):
        return repr(value)
    return value


# ----------------------------------------------------------------------------- main


def plan(sweep_texts: Sequence[str], set_texts: Sequence[str], folds: int) -> tuple[list[Run], list[tuple[str, str]]]:
    """The runs of ``--sweep`` (with ``--folds``) and the ``--set`` overrides of every run;
    ValueError naming the option on a malformed or clashing value."""
    sweeps = []
    for text in sweep_texts:
        key, values = parse_assignment(text, "--sweep")
        sweeps.append((key, split_values(values)))
    sets = [parse_assignment(text, "--set", empty_value=True) for text in set_texts]
    if folds == 1 or folds < 0:
        raise ValueError(f"--folds {folds}: use K >= 2 (or 0 for no cross-validation)")
    swept = {k for k, _ in sweeps} | ({"data.num_folds", "data.fold"} if folds else set())
    clash = swept & {k for k, _ in sets}
    if clash:
        raise ValueError(f"{sorted(clash)} both swept and set")
    return grid(sweeps, folds), sets


def main(argv: Sequence[str]) -> int:
    """Parses ``argv``, runs (or prints) the runs still to do and writes the summary; returns 1
    when a run has no results."""
    extra = cli.parse_known(FLAGS, argv)
    config, workdir, folds = _CONFIG.value, _WORKDIR.value, _FOLDS.value
    try:
        runs, sets = plan(_SWEEP.value, _SET.value, folds)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    os.makedirs(workdir, exist_ok=True)
    statuses = read_statuses(workdir)
    if _PRINT.value:
        for run in runs:
            if read_results(workdir, run) is not None:
                print(f"# done: {run.name}")
            else:
                print(shlex.join(command(config, workdir, run, sets, extra)))
        return 0
    if not _SUMMARIZE_ONLY.value:
        env = local.environment(_CPU_DEVICES.value)
        for i, run in enumerate(runs):
            if read_results(workdir, run) is not None:
                print(f"[{i + 1}/{len(runs)}] {run.name}: done, skipped", flush=True)
                continue
            cmd = command(config, workdir, run, sets, extra)
            print(f"[{i + 1}/{len(runs)}] {run.name}\n+ {shlex.join(cmd)}", flush=True)
            statuses[run.name] = "started"  # stays so if the sweep is killed
            write_statuses(workdir, statuses)
            code = local.run_logged(cmd, env, os.path.join(workdir, run.name, "train.log"))
            if code == 0 and read_results(workdir, run) is not None:
                statuses.pop(run.name)
            else:
                statuses[run.name] = "failed"
                print(f"[{i + 1}/{len(runs)}] {run.name}: failed (exit status {code}); see "
                      f"{os.path.join(workdir, run.name, 'train.log')}", file=sys.stderr, flush=True)
            write_statuses(workdir, statuses)
    rows = write_summary(workdir, runs, statuses, folds)
    with open(os.path.join(workdir, "summary.md")) as f:
        print(f.read())
    bad = [r["name"] for r in rows if r["status"] != "ok"]
    if bad:
        print(f"{len(bad)} of {len(rows)} run(s) without results: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
