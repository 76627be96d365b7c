"""A user's mistakes, command by command, as a user makes them: each must end in one ``error:`` line
that names the flag, key, file or row and what was expected, with exit status 2, and nothing else on
stderr but the usage hint (``Pass --help ...``) after a usage error: no traceback, no library
warnings, no second line.

Each probe starts the real command in a fresh Python (about 3 s each), so the module sits behind
the ``reliability`` marker (``make test-reliability``) beside the kill loop; the library-level
tests of each check run in ``make test``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.reliability

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
USAGE_HINT = "Pass --help to see the command's flags."

# (probe id, command arguments after ``python -m``, words its error line must contain). ``{run}``:
# a trained tiny run; ``{phantoms}``/``{data}``: the phantom fixture and its prepared store;
# ``{tmp}``: the test's folder; ``{bad_labels}``: a copy of the phantoms with one bad label row.
MAIN = ["boneage_jax.main", "--config=configs/demo.py:tiny", "--workdir={tmp}/w",
        "--config.data.manual_dir={phantoms}", "--config.data.data_dir={data}"]
PROBES = [
    ("main: image size", [*MAIN, "--config.data.image_size=0"], "data.image_size"),
    ("main: batch size", [*MAIN, "--config.batch_size=-4"], "batch_size"),
    ("main: head", [*MAIN, "--config.model.head=nope"], "model.head"),
    ("main: sex fusion", [*MAIN, "--config.model.sex_fusion=nope"], "model.sex_fusion"),
    ("main: sex", [*MAIN, "--config.data.sex=x"], "data.sex"),
    ("main: op spec", [*MAIN, "--config.data.preprocess=no_such_op"], "no_such_op"),
    ("main: builder config", [*MAIN, "--config.data.builder_config=max77"], "builder_config"),
    ("main: fraction", [*MAIN, "--config.data.validation_fraction=1.5"], "validation_fraction"),
    ("main: unknown key", [*MAIN, "--config.no_such_key=1"], "no_such_key"),
    ("main: model name", [*MAIN, "--config.model.name=nope"], "nope"),
    ("main: missing data", [*MAIN, "--config.data.manual_dir={tmp}/absent"], "absent"),
    ("main: config file", ["boneage_jax.main", "--config=configs/nope.py", "--workdir={tmp}/w"], "configs/nope.py"),
    ("main: pretrained dir", [*MAIN, "--config.init_from={tmp}/absent_weights"], "absent_weights"),
    ("main: bad label row", ["boneage_jax.main", "--config=configs/demo.py:tiny", "--workdir={tmp}/w",
                             "--config.data.manual_dir={bad_labels}", "--config.data.data_dir={tmp}/data"],
     "boneage-training-dataset.csv"),
    ("main: workdir is a file", ["boneage_jax.main", "--config=configs/demo.py:tiny", "--workdir={tmp}/a_file",
                                 "--config.data.manual_dir={phantoms}", "--config.data.data_dir={data}"], "a_file"),
    ("evaluate: no workdir", ["boneage_jax.evaluate", "--workdir={tmp}/absent"], "absent"),
    ("evaluate: not a run", ["boneage_jax.evaluate", "--workdir={tmp}"], "config.json"),
    ("evaluate: split", ["boneage_jax.evaluate", "--workdir={run}", "--split=nope"], "split"),
    # predict goes on past a file it cannot read (exit 1 and a summary line; the test of the whole
    # corpus is tests/test_bad_inputs.py)
    ("predict: no such file", ["boneage_jax.predict", "--workdir={run}", "--sex=F", "{tmp}/absent.png"],
     "absent.png"),
    ("predict: sex", ["boneage_jax.predict", "--workdir={run}", "--sex=X", "{tmp}/a_file"], "sex"),
    ("predict: not a run", ["boneage_jax.predict", "--workdir={tmp}", "--sex=F", "{tmp}/a_file"], "config.json"),
    ("export: not a run", ["boneage_jax.export", "--workdir={tmp}", "--out={tmp}/exported"], "config.json"),
    ("weights: no such file", ["boneage_jax.weights", "--from=keras", "--model=vgg16", "--in={tmp}/absent.h5",
                               "--out={tmp}/o"], "absent.h5"),
    ("weights: model for a run", ["boneage_jax.weights", "--from=run", "--in={run}", "--model=vgg16",
                                  "--out={tmp}/o"], "--model"),
    ("weights: not a run", ["boneage_jax.weights", "--from=run", "--in={tmp}", "--out={tmp}/o"], "config.json"),
    ("segment: not a run", ["boneage_jax.segment", "--workdir={tmp}", "--manual_dir={phantoms}", "--out={tmp}/m"],
     "config.json"),
    ("sweep: malformed", ["launch.sweep", "--config=configs/demo.py:tiny", "--workdir={tmp}/s", "--sweep", "seed"],
     "--sweep"),
    ("sweep: folds", ["launch.sweep", "--config=configs/demo.py:tiny", "--workdir={tmp}/s", "--folds=1"], "--folds"),
]


@pytest.fixture(scope="module")
def places(tiny_run, phantom_dir, data_root, tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("probes")
    (tmp / "a_file").write_text("not a folder, not an image\n")
    bad = tmp / "bad_labels"
    shutil.copytree(phantom_dir, bad)
    labels = bad / "boneage-training-dataset.csv"
    lines = labels.read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + ",many,True"
    labels.write_text("\n".join(lines) + "\n")
    return {"run": tiny_run, "phantoms": phantom_dir, "data": data_root, "tmp": str(tmp), "bad_labels": str(bad)}


@pytest.mark.parametrize("probe, args, words", PROBES, ids=[p[0] for p in PROBES])
def test_a_mistake_ends_in_one_named_line(probe, args, words, places):
    args = [a.format(**places) for a in args]
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    report = f"{probe}: exit {done.returncode}\n{done.stderr}"
    assert lines and lines[0].startswith("error: ") and words in lines[0], report
    if args[0] == "boneage_jax.predict" and done.returncode == 1:  # a file it could not read
        assert lines[1:] == [f"1 of 1 image(s) failed or were rejected: {args[-1]}"], report
    else:
        assert done.returncode == 2, report
        assert lines[1:] in ([], [USAGE_HINT]), report
