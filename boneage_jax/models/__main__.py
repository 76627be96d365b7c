r"""Lists every registered model family with its parameter count.

    python -m boneage_jax.models [NAME ...] [--json] [--image_size=224]

Backbones (``models.BACKBONES``) and segmentation networks (``models.SEGMENTATION_NETWORKS``) are
listed under their registered names, each with its older aliases; a NAME may be an alias. Counts
are of the network alone (no sex-fusion head), for 3-channel input; ``--json`` prints an object
name -> count. Families whose layers depend on the input size (CaffeNet's fc6, the attention
head's locally connected layer) are counted at ``--image_size``. Models are built abstractly
(``nnx.eval_shape``): nothing is computed or allocated, though tracing the largest ones takes
seconds each (about 2.5 minutes for all of them on 2 CPU cores).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
from absl import app, flags
from flax import nnx

from boneage_jax import cli, models

FLAGS = flags.FlagValues()  # this command's flags (cli.parse)
_JSON = flags.DEFINE_bool("json", False, "Print a JSON object name -> parameter count.", flag_values=FLAGS)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input size for families whose layers depend on it.",
                                   lower_bound=1, flag_values=FLAGS)


def count_parameters(name: str, image_size: int = 224, in_channels: int = 3) -> int:
    """Parameters of the registered network ``name`` (or an alias), built abstractly."""
    registry = models.registry_of(name)
    network = nnx.eval_shape(
        lambda: registry.create(name, in_channels=in_channels, image_size=image_size, rngs=models.Rngs(0))
    )
    return sum(x.size for x in jax.tree.leaves(nnx.state(network, nnx.Param)))


def main(argv: Sequence[str]) -> int:
    """Positional arguments: families to count (default: all registered, without aliases)."""
    names = cli.parse(FLAGS, argv)
    for name in names:
        try:
            models.registry_of(name)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    counts = {name: count_parameters(name, _IMAGE_SIZE.value) for name in names or models.available()}
    if _JSON.value:
        print(json.dumps(counts, indent=2))
        return 0
    for registry in models.REGISTRIES:
        rows = [(name, count) for name, count in counts.items() if registry.resolve(name) is not None]
        if not rows:
            continue
        print(f"{registry.kind}s:")
        labels = {}
        for name, _ in rows:
            resolved = registry.resolve(name)
            aliases = sorted(alias for alias, target in registry.aliases.items() if target == resolved)
            shown = name if name == resolved else f"{name} -> {resolved}"
            labels[name] = f"{shown} (alias {', '.join(aliases)})" if aliases and name == resolved else shown
        width = max(map(len, labels.values()))
        for name, count in rows:
            print(f"  {labels[name]:<{width}}  {count:>13,}")
    return 0


if __name__ == "__main__":
    cli.run(main)
