r"""The quality check over image files, without a trained run: which would ``predict`` refuse, and why.

    python -m boneage_jax.tools.check_quality images/ [more.png scans/ ...] [--image_size 256] \
        [--max_side 0] [--out verdicts.csv] [--all]

Each PNG, JPEG or DICOM file (folders expand to their image files, as ``predict`` reads them)
is read as ``predict`` reads it (colour kept) and, with ``--max_side``, shrunk to the longest
side a run's dataset stores (512 or 1024; 0: as it is), then checked by
:func:`boneage_jax.quality.rejection` for a network of input ``--image_size``. Prints one line
per rejected file (``--all``: per file), then the rejected count and fraction, the count per
reason and the time per image of the checks (reading not counted). ``--out`` writes a CSV
``file,rejection,reason`` (empty where accepted). Exit status 0 when every file is accepted, 1
otherwise (an unreadable file counts as rejected, ``unreadable`` its reason).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from absl import app, flags

from boneage_jax import cli, io, quality

FLAGS = flags.FlagValues()  # this command's flags (cli.parse); the files and folders follow them
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "The network's input size (the smallest side an image "
                                   "needs is half of it, at most 64 px).", lower_bound=1, flag_values=FLAGS)
_MAX_SIDE = flags.DEFINE_integer("max_side", 0, "Shrink to this longest side first, as a run's dataset stores "
                                 "images (0: keep the size).", lower_bound=0, flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "CSV file for the verdicts.", flag_values=FLAGS)
_ALL = flags.DEFINE_bool("all", False, "Print accepted files too.", flag_values=FLAGS)


def check_files(files: Sequence[str], image_size: int, max_side: int = 0
                ) -> tuple[list[tuple[str, str | None, str]], float]:
    """(file, rejection or None, reason or '') per file, and the seconds the checks took."""
    from tfds_rsna import rsna_bone_age  # pylint: disable=import-outside-toplevel

    verdicts, seconds = [], 0.0
    for path in files:
        try:
            image = rsna_bone_age.resize_longest_side(io.read_image(path, colour=True), max_side or None)
        except io.ImageReadError as e:
            verdicts.append((path, f"unreadable: {e}", "unreadable"))
            continue
        start = time.perf_counter()
        found = quality.rejection(image, image_size)
        seconds += time.perf_counter() - start
        verdicts.append((path, None if found is None else str(found), "" if found is None else found.reason))
    return verdicts, seconds


def main(argv: Sequence[str]) -> int:
    """``python -m boneage_jax.tools.check_quality`` with ``argv``; returns the exit status."""
    inputs = cli.parse(FLAGS, argv)
    if not inputs:
        raise app.UsageError("give image files (PNG, JPEG, DICOM) or folders of them")
    files = io.expand_inputs(inputs)
    if not files:
        print("error: no image files found in " + ", ".join(inputs), file=sys.stderr)
        return 1
    verdicts, seconds = check_files(files, _IMAGE_SIZE.value, _MAX_SIDE.value)
    counts: dict[str, int] = {}
    for path, found, reason in verdicts:
        if found is not None:
            counts[reason] = counts.get(reason, 0) + 1
        if found is not None or _ALL.value:
            print(f"{path}  {'rejected: ' + found if found else 'accepted'}")
    rejected = sum(counts.values())
    checked = sum(1 for _, _, reason in verdicts if reason != "unreadable")
    why = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items(), key=lambda kv: -kv[1]))
    print(f"{rejected} of {len(files)} image(s) rejected ({rejected / len(files):.1%})" + (f": {why}" if why else "")
          + f"; the checks took {1e3 * seconds / max(checked, 1):.1f} ms per image")
    if _OUT.value:
        io.write_csv(_OUT.value, ["file", "rejection", "reason"], [[p, f or "", r] for p, f, r in verdicts])
        print(f"verdicts written to {_OUT.value}")
    return 1 if rejected else 0


if __name__ == "__main__":
    cli.run(main)
