"""`export`: the inference copy of a run's network as an ONNX or TorchScript file, for deployment.

    python -m ipu_effnet export --checkpoint RUN_DIR_OR_FILE --format onnx|torchscript [--res R] [--out FILE]
                                [--averaged] [--no-verify]

What is exported is `inference.InferenceModel`: BatchNorm folded into the convolutions, Proxy Norm's
statistics frozen (traced in its standard-operator formulation: norms.proxy_ops.plain_ops_only), the input normalisation inside. Input `images`: uint8 RGB, N x 3 x R x R (values
0..255, prepared as validation images: shorter side to R / 0.875, centre crop); output `logits`:
N x classes. The batch size is dynamic; the resolution is fixed at export (--res, default the run's
evaluation resolution). Class names and the resolution are stored in the file: ONNX metadata
(`classes` as JSON, `resolution`, `input`), TorchScript extra files (`classes.json`, `meta.json`).

Checks, unless --no-verify: ONNX files pass `onnx.checker`; then, on a batch of validation images of the
run's data (random images where that data is not available here), onnxruntime's (ONNX) or the loaded
TorchScript module's outputs are compared with the PyTorch model's, at two batch sizes; a difference
above 1e-4 fails the command (exit 1). ONNX export needs the `onnx` package, and the comparison
`onnxruntime` (requirements-extras.txt); without onnx the command stops with exit 2 naming it, without
onnxruntime it skips the comparison and says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ipu_effnet.errors import RunError, UsageError

TOLERANCE = 1e-4
EXTRAS_HINT = "pip install -r requirements-extras.txt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run directory (its newest)")
    parser.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    parser.add_argument("--res", type=int, help="input resolution (default: the run's evaluation resolution)")
    parser.add_argument("--out", help="output file (default: <run dir>/export/model-<res>.onnx or .pt)")
    parser.add_argument("--averaged", action="store_true", help="export the weight-averaged model")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    parser.add_argument("--no-verify", action="store_true", help="skip the checker and the comparison")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the stored config (e.g. --set data.path=... for the comparison images)")


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{what} needs the {module} package, which is not installed: {EXTRAS_HINT} "
                         f"(or pip install {module})") from None


def sample_images(cfg, resolution: int, count: int = 8):
    """(uint8 images, where from): validation images of the run's data, else random ones."""
    import torch

    from ipu_effnet.data import create_dataset

    try:
        data = create_dataset(cfg.data, "validation", resolution, train=False, seed=cfg.train.seed)
        step = max(1, len(data) // count)
        images = torch.stack([data[i * step][0] for i in range(min(count, len(data)))])
        return images, f"{len(images)} validation images of the {cfg.data.dataset} data"
    except UsageError:  # the run's data is not on this machine
        gen = torch.Generator().manual_seed(0)
        return (torch.randint(0, 256, (count, 3, resolution, resolution), dtype=torch.uint8, generator=gen),
                f"{count} random images (the run's {cfg.data.dataset} data is not available here)")


def export_onnx(model, path: Path, resolution: int, metadata: dict, opset: int = 17) -> None:
    import inspect

    import torch

    dummy = torch.zeros(2, 3, resolution, resolution, dtype=torch.uint8)
    kwargs = dict(input_names=["images"], output_names=["logits"], opset_version=opset,
                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript-based exporter: the same file on torch 2.0 and later
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: the result is checked below
        torch.onnx.export(model, (dummy,), str(path), **kwargs)
    onnx = _require("onnx", "--format onnx")
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def export_torchscript(model, path: Path, resolution: int, metadata: dict) -> None:
    import warnings

    import torch

    dummy = torch.zeros(2, 3, resolution, resolution, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (dummy,), check_trace=False)
    extra = {"classes.json": metadata["classes"],
             "meta.json": json.dumps({k: v for k, v in metadata.items() if k != "classes"})}
    torch.jit.save(traced, str(path), _extra_files=extra)


def verify(path: Path, fmt: str, model, images) -> float:
    """Largest |difference| between the exported file's logits and the model's, over `images` and
    over its first three (two batch sizes)."""
    import numpy as np
    import torch

    batches = [images, images[:3]]
    with torch.no_grad():
        expected = [model(b).numpy() for b in batches]
    if fmt == "onnx":
        onnx = _require("onnx", "--format onnx")
        onnx.checker.check_model(onnx.load(str(path)))
        ort = __import__("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = [session.run(["logits"], {"images": b.numpy()})[0] for b in batches]
    else:
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = [loaded(b).numpy() for b in batches]
    return max(float(np.abs(g - e).max()) for g, e in zip(got, expected))


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.inference import class_names, load_inference_model
    from ipu_effnet.resolutions import eval_resolution

    if args.format == "onnx":
        _require("onnx", "--format onnx")  # before any work
    model, ckpt, cfg, path = load_inference_model(args.checkpoint, args.averaged, args.overrides)
    res = args.res or eval_resolution(cfg)
    if res < 32:
        raise UsageError(f"--res {res}: the resolution must be at least 32")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    suffix = ".onnx" if args.format == "onnx" else ".pt"
    out = Path(args.out) if args.out else run_dir / "export" / f"model-{res}{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    names = class_names(ckpt, model.num_classes)
    metadata = {"classes": json.dumps(names), "resolution": str(res),
                "input": f"images: uint8 RGB N x 3 x {res} x {res}, values 0..255 (resize the shorter side to "
                         f"{round(res / 0.875)}, centre crop); output logits: N x {len(names)}",
                "model": str((ckpt.get("model_args") or {}).get("name")), "checkpoint": str(path)}
    if args.format == "onnx":
        export_onnx(model, out, res, metadata, args.opset)
    else:
        export_torchscript(model, out, res, metadata)
    print(f"exported {path} ({metadata['model']}, {len(names)} classes) at {res} px as {args.format}: {out}")
    if args.no_verify:
        return 0
    if args.format == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            onnx = _require("onnx", "--format onnx")
            onnx.checker.check_model(onnx.load(str(out)))
            print(f"onnx.checker: passed; outputs not compared (onnxruntime is not installed: {EXTRAS_HINT})")
            return 0
    images, where = sample_images(cfg, res)
    diff = verify(out, args.format, model, images)
    runtime = "onnxruntime" if args.format == "onnx" else "torch.jit.load"
    if diff > TOLERANCE:
        raise RunError(f"{out}: {runtime}'s logits differ from PyTorch's by up to {diff:.3g} (> {TOLERANCE:g}) "
                       f"on {where}")
    checked = "onnx.checker passed; " if args.format == "onnx" else ""
    print(f"{checked}{runtime} agrees with PyTorch within {diff:.2g} (<= {TOLERANCE:g}) on {where}, "
          f"batches of {len(images)} and 3")
    return 0
