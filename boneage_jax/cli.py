"""How the commands run: absl flags held in each command's own ``FlagValues``, run by ``absl.app``.

A command module (``main``, ``evaluate``, ``report``, ``predict``, ``serve``, ``export``,
``segment``, ``tools.show``, ``weights``, and ``launch.local``, ``launch.multihost``,
``launch.sweep``) defines its flags on its own ``flags.FlagValues``, so commands can be imported side by side (as
libraries and tests do), and a ``main(argv) -> exit status`` that starts with :func:`parse` (or
:func:`parse_known` in a launcher, which passes the arguments it does not know on to the
command it starts). Each parse starts from the flags' defaults, so ``main`` can be called again
in one process. ``python -m`` runs it through :func:`run`: ``--help`` prints the program's
docstring and the command's flags; ``absl.app`` takes its own flags (``--verbosity``,
``--helpfull``, ...) and passes the rest of the command line to ``main``.

``--config.key=value`` overrides are parsed by ``ml_collections.config_flags``: of a config
file (``--config=path.py[:variant]`` of ``main`` and ``tools.show``) by :func:`load_config_file`,
of a run's saved config (``evaluate``, ``report``) once it is read (``inference.load_config``).
:func:`enable_compilation_cache` turns on JAX's persistent compilation cache for ``predict`` and
``serve``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from absl import app, flags, logging

from boneage_jax.io import LockedError, one_line

if TYPE_CHECKING:
    import ml_collections

_CONFIG_ARG = re.compile(r"^--?(no)?config\.")
DEFAULT_CACHE = os.path.join("~", ".cache", "boneage_jax", "jax")


def _reset(flag_values: flags.FlagValues) -> None:
    """Every flag back to its default (``unparse_flags`` would also log and block reads)."""
    for name in list(flag_values):
        flag_values[name].unparse()


def parse(flag_values: flags.FlagValues, argv: Sequence[str], *, config_overrides: bool = False) -> list[str]:
    """Parses ``argv`` (the arguments after the program name) into ``flag_values``; returns the
    positional arguments, and with ``config_overrides`` the ``--config.*`` arguments (with their
    values) too, in their order. Flags absent from ``argv`` take their defaults. Raises
    ``app.UsageError`` naming a flag that is not known."""
    _reset(flag_values)
    try:
        left = flag_values(["command", *argv], known_only=config_overrides)[1:]
    except flags.Error as e:
        raise app.UsageError(str(e)) from e
    for arg in left:
        if arg.startswith("-") and not _CONFIG_ARG.match(arg):
            raise app.UsageError(f"Unknown command line flag {arg.split('=')[0]!r}")
    return left


def parse_known(flag_values: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """Parses the flags of ``flag_values`` in ``argv`` (up to a ``--``) and returns every other
    argument in its order, without the ``--``: for a launcher that passes them on to the
    command it starts. Raises ``app.UsageError`` for a bad value of a known flag."""
    _reset(flag_values)
    try:
        left = flag_values(["command", *argv], known_only=True)[1:]
    except flags.Error as e:
        raise app.UsageError(str(e)) from e
    if "--" in left:
        at = left.index("--")
        left = left[:at] + left[at + 1:]
    return left


def load_config_file(spec: str, overrides: Sequence[str] = (), flag: str = "config") -> ml_collections.ConfigDict:
    """The config of ``--config=spec`` (``path.py`` or ``path.py:variant``, as
    ``config_flags.DEFINE_config_file`` reads it), with ``--config.key=value`` ``overrides``
    applied and locked (no new keys). Raises ``app.UsageError`` naming the file or the key on a
    missing file, an unknown key, a bad value or an argument that is not an override."""
    from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

    argv = ["command", f"--{flag}={spec}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(flag, None, "Configuration file.", flag_values=values, sys_argv=argv,
                                    lock_config=True)
    try:
        left = values(argv)[1:]
        config = values[flag].value
        config.keys()  # a config file that failed to load raises its OSError on first use
    except (AttributeError, KeyError) as e:
        key = str(e.args[0]).strip("'\"") if e.args else str(e)
        raise app.UsageError(f"unknown config key {key!r} in {' '.join(overrides)} "
                             f"(the keys are those of {spec})") from e
    except flags.Error as e:
        raise app.UsageError(str(e)) from e
    except OSError as e:
        raise app.UsageError(f"--{flag}={spec}: cannot load the config file ({str(e).splitlines()[-1].strip()})") from e
    if left:
        raise app.UsageError(f"unexpected arguments: {' '.join(left)} (after --{flag}={spec} only "
                             f"--{flag}.key=value overrides)")
    return config


def enable_compilation_cache(cache_dir: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in ``cache_dir`` (None: the default location,
    ``$BONEAGE_JAX_CACHE`` or ``DEFAULT_CACHE``; empty: off) for every compilation, however
    short, so that a repeated ``predict`` or a restarted ``serve`` does not compile again;
    returns the folder used."""
    import jax  # pylint: disable=import-outside-toplevel

    if cache_dir is None:
        cache_dir = os.environ.get("BONEAGE_JAX_CACHE", DEFAULT_CACHE)
    if not cache_dir:
        return None
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return cache_dir


HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort")


def command_flags(main: Callable[[Sequence[str]], int]) -> flags.FlagValues | None:
    """The flags of a command's ``main``: its object's ``flags`` (``EvaluateCommand``) or its
    module's ``FLAGS``."""
    owner = getattr(main, "__self__", None)
    if isinstance(getattr(owner, "flags", None), flags.FlagValues):
        return owner.flags
    found = getattr(sys.modules.get(main.__module__), "FLAGS", None)
    return found if isinstance(found, flags.FlagValues) else None


def print_help(main: Callable[[Sequence[str]], int]) -> None:
    """Prints the running program's docstring and the flags of its ``main``."""
    doc = getattr(sys.modules.get("__main__"), "__doc__", None) or ""
    print(doc.strip("\n"))
    flag_values = command_flags(main)
    if flag_values is not None:
        print("\nflags:\n" + flag_values.get_help(prefix="  ", include_special_flags=False))
    print("\n(absl's own flags: --helpfull)")


# What a user can get wrong (a flag, a config key, a file, a workdir): one ``error:`` line and
# exit status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, LockedError)
USAGE_STATUS = 2


def run(main: Callable[[Sequence[str]], int]) -> None:
    """Runs ``main(arguments)`` as the program; its return value is the exit status.

    A usage error, or a user error (``USER_ERRORS``: a bad value, a missing or unreadable file,
    a busy workdir) that ``main`` lets through, prints one ``error: ...`` line and exits with
    status 2; ``--verbose`` shows its traceback instead. ``--help`` (or ``-h``) before any
    ``--`` prints the program's docstring and the command's flags (:func:`command_flags`) and
    exits 0."""
    verbose = False

    def parse_absl_flags(argv: list[str]) -> list[str]:
        nonlocal verbose
        own = argv[1:argv.index("--")] if "--" in argv else argv[1:]
        if any(arg in HELP_ARGS for arg in own):
            print_help(main)
            sys.exit(0)
        if "--verbose" in own:
            verbose = True
            argv = [arg for i, arg in enumerate(argv) if not (arg == "--verbose" and 0 < i <= len(own))]
        try:
            left = flags.FLAGS(argv, known_only=True)
        except flags.Error as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(USAGE_STATUS)
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # progress goes to stdout; -v 0 shows library logs
        return left

    def call(argv: list[str]) -> None:
        try:
            status = main(argv[1:])
        except app.UsageError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            print("Pass --help to see the command's flags.", file=sys.stderr)
            sys.exit(USAGE_STATUS)
        except USER_ERRORS as e:
            if verbose:
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(USAGE_STATUS)
        sys.exit(status)

    app.run(call, flags_parser=parse_absl_flags)


class EvaluateCommand:
    """``python -m boneage_jax.evaluate`` and ``python -m boneage_jax.report`` (the same options;
    ``report`` always writes the report): flags and ``main``, over ``evaluation.evaluate``."""

    def __init__(self, report: bool):
        self.report = report
        self.flags = values = flags.FlagValues()
        self._workdir = flags.DEFINE_string("workdir", None, "Workdir of a run written by boneage_jax.main.",
                                            flag_values=values)
        self._split = flags.DEFINE_enum("split", None, ["test", "validation", "train", "all"],
                                        "Split to score (default: test if present, else validation).",
                                        flag_values=values)
        self._which = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to load.",
                                        flag_values=values)
        self._tta = flags.DEFINE_bool("tta", False, "Test-time augmentation: mean over flip and small rotations.",
                                      flag_values=values)
        self._tta_flip = flags.DEFINE_bool("tta_flip", True, "With --tta: include the horizontal flip.",
                                           flag_values=values)
        self._tta_angles = flags.DEFINE_list("tta_angles", ["-5", "5"], "With --tta: rotations in degrees.",
                                             flag_values=values)
        self._ensemble = flags.DEFINE_list("ensemble", [], "More workdirs whose predictions are averaged with "
                                           "--workdir's.", flag_values=values)
        self._bias = flags.DEFINE_bool("bias_correction", False,
                                       "Linear bias correction fitted on validation predictions.", flag_values=values)
        self._report = flags.DEFINE_bool("report", report, "Also draw the figures and report/report.md.",
                                         flag_values=values)
        self._quality = flags.DEFINE_bool("quality", False, "Also run the quality check (boneage_jax.quality) over "
                                          "the split's images: how many it would reject, why, and the error with "
                                          "and without them.", flag_values=values)
        self._report_images = flags.DEFINE_integer("report_images", 8,
                                                   "Validation images in the Grad-CAM / attention figures.",
                                                   flag_values=values)

    def main(self, argv: Sequence[str]) -> int:
        """Parses ``argv`` (flags, then the run's ``--config.*`` overrides) and evaluates; returns
        the exit status (2 with a one-line error for a missing workdir, checkpoint or bad override)."""
        from boneage_jax import evaluation  # pylint: disable=import-outside-toplevel

        overrides = parse(self.flags, argv, config_overrides=True)
        if self._workdir.value is None:
            raise app.UsageError("--workdir is required")
        try:
            angles = [float(a) for a in self._tta_angles.value]
        except ValueError as e:
            raise app.UsageError(f"--tta_angles must be numbers: {e}") from e
        try:
            evaluation.evaluate(self._workdir.value, split=self._split.value, which=self._which.value,
                                tta=self._tta.value, tta_flip=self._tta_flip.value, tta_angles=angles,
                                ensemble=self._ensemble.value, bias_correction=self._bias.value, overrides=overrides,
                                report=self.report or self._report.value, report_images=self._report_images.value,
                                quality_check=self._quality.value)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return USAGE_STATUS
        return 0
