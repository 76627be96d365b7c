"""Peer-benchmark job for PyTorch: the same training step in eager mode (or ``torch.compile``).

    python benchmarks/peers/job_torch.py --network=resnet50 [--image_size=256] [--batch_size=8] \
        [--warmup_steps=2] [--steps=10] [--device=cpu] [--compile] [--serve]

The backbone without its classifier, randomly initialised, ends in global average pooling:
torchvision ``resnet50`` (v1.5), ``inception_v3(aux_logits=False, init_weights=False)`` (its
dropout removed, as Keras's ``include_top=False`` has none), ``efficientnet_b0`` (its classifier
removed; stochastic depth 0.2 as torchvision builds it), ``vgg19``'s ``features`` followed by
global average pooling (as Keras's ``pooling="avg"``), and timm's ``legacy_xception`` with
``num_classes=0`` (the Keras Xception architecture that Cadene ported; timm's ``xception41/65/71``
are the aligned DeepLab variants). Then ``Linear(features, 1)``, ``mse_loss``,
``torch.optim.AdamW(lr=1e-3, weight_decay=1e-4)`` with PyTorch's default implementation, the
model in training mode (BatchNorm batch statistics), model and input in ``channels_last``.

CPU: ``torch.set_num_threads`` to the CPUs this process may use, eager; float32, or with
``--precision=bfloat16`` ``torch.autocast("cpu", dtype=torch.bfloat16)`` (oneDNN's bfloat16
kernels, AMX where the CPU has it).
GPU (``--device=gpu``): CUDA, ``torch.autocast(dtype=torch.bfloat16)`` (no gradient scaler is
needed for bfloat16; ``--precision=float32`` turns it off), ``cudnn.benchmark`` on; ``--compile`` wraps the model in ``torch.compile``
(default mode), whose first step includes the compilation. The GPU path has not been run yet.
"""

from __future__ import annotations

import contextlib
import sys

import job_common


def add_flags(parser) -> None:
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (default: eager)")


def versions() -> dict:
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(job_common.usable_cpus())
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "python": job_common.python_version(), "threads": torch.get_num_threads(),
            "mkldnn": bool(torch.backends.mkldnn.is_available()),
            "cuda": torch.version.cuda or "", "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def backbone(network: str):
    """(module ending in pooled features, number of features, what it is)."""
    import timm  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel
    from torch import nn  # pylint: disable=import-outside-toplevel

    models = torchvision.models
    if network == "resnet50":
        model = models.resnet50(weights=None)
        model.fc = nn.Identity()
        return model, 2048, "torchvision resnet50, fc removed"
    if network == "inception_v3":
        model = models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        model.dropout = nn.Identity()
        model.fc = nn.Identity()
        return model, 2048, "torchvision inception_v3(aux_logits=False, init_weights=False), dropout and fc removed"
    if network == "efficientnet_b0":
        model = models.efficientnet_b0(weights=None)
        model.classifier = nn.Identity()
        return model, 1280, "torchvision efficientnet_b0, classifier removed"
    if network == "vgg19":
        model = nn.Sequential(models.vgg19(weights=None).features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return model, 512, "torchvision vgg19 features + global average pooling"
    if network == "xception":
        model = timm.create_model("legacy_xception", pretrained=False, num_classes=0)
        return model, model.num_features, "timm legacy_xception(num_classes=0)"
    raise ValueError(f"--network={network}: no PyTorch model for it")


def main() -> int:
    args = job_common.parse_arguments(__doc__.splitlines()[0], add_flags)
    if args.versions:
        job_common.emit({"versions": versions()})
        return 0
    import torch  # pylint: disable=import-outside-toplevel
    from torch import nn  # pylint: disable=import-outside-toplevel

    torch.manual_seed(0)
    gpu = args.device == "gpu"
    if gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("--device=gpu, but torch.cuda.is_available() is False")
        torch.backends.cudnn.benchmark = True
        device = torch.device("cuda")
    else:
        torch.set_num_threads(job_common.usable_cpus())
        device = torch.device("cpu")
    features, num_features, built = backbone(args.network)
    model = nn.Sequential(features, nn.Linear(num_features, 1))
    model = model.to(device, memory_format=torch.channels_last).train()
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=job_common.LEARNING_RATE,
                                  weight_decay=job_common.WEIGHT_DECAY)
    forward = torch.compile(model) if args.compile else model
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    targets = torch.randn(args.batch_size, 1, device=device)
    bfloat16 = args.precision == "bfloat16"
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bfloat16
                else contextlib.nullcontext)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            outputs = forward(images)
        loss = nn.functional.mse_loss(outputs.float(), targets)
        loss.backward()
        optimizer.step()
        return loss.item()

    timing = job_common.run_steps(step, args)
    mode = "torch.compile" if args.compile else "eager"
    precision = "bfloat16 autocast" if bfloat16 else "float32"
    threads = "" if gpu else f", {torch.get_num_threads()} threads"
    job_common.emit(job_common.result(
        args, "torch_compile" if args.compile else "torch", timing, parameters=parameters,
        built=f"{built} + Linear(1), {mode}, channels_last, {precision}{threads}", versions=versions()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
