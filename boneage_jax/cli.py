"""How the commands run: absl flags held in each command's own ``FlagValues``, run by ``absl.app``.

A command module (``evaluate``, ``report``, ``predict``, ``export``) defines its flags on its own
``flags.FlagValues``, so commands can be imported side by side (as libraries and tests do), and
a ``main(argv) -> exit status`` that starts with :func:`parse`. ``python -m`` runs it through
:func:`run`: ``absl.app`` takes its own flags (``--help``, ``--verbosity``, ...) and passes the
rest of the command line to ``main``. ``--config.key=value`` overrides of a run's saved config
(``evaluate``, ``report``) are parsed by ``ml_collections.config_flags`` once the run's config
is read (``inference.load_config``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

_CONFIG_ARG = re.compile(r"^--?(no)?config\.")


def parse(flag_values: flags.FlagValues, argv: Sequence[str], *, config_overrides: bool = False) -> list[str]:
    """Parses ``argv`` (the arguments after the program name) into ``flag_values``; returns the
    positional arguments, and with ``config_overrides`` the ``--config.*`` arguments (with their
    values) too, in their order. Raises ``app.UsageError`` naming a flag that is not known."""
    try:
        left = flag_values(["command", *argv], known_only=config_overrides)[1:]
    except flags.Error as e:
        raise app.UsageError(str(e)) from e
    for arg in left:
        if arg.startswith("-") and not _CONFIG_ARG.match(arg):
            raise app.UsageError(f"Unknown command line flag {arg.split('=')[0]!r}")
    return left


def run(main: Callable[[Sequence[str]], int]) -> None:
    """Runs ``main(arguments)`` as the program; its return value is the exit status. A usage
    error prints the message and exits with status 1."""

    def parse_absl_flags(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv, known_only=True)
        except flags.Error as e:
            print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
            sys.exit(1)

    def call(argv: list[str]) -> None:
        try:
            status = main(argv[1:])
        except app.UsageError as e:
            print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
            print("Pass --helpfull to see help on flags.", file=sys.stderr)
            sys.exit(1)
        sys.exit(status)

    app.run(call, flags_parser=parse_absl_flags)
