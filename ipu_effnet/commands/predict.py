"""`predict`: the top-k classes of a few images, with probabilities, from a run's network.

    python -m ipu_effnet predict --checkpoint RUN_DIR_OR_FILE IMAGE_OR_DIR... [--topk 5] [--res R]
                                 [--averaged] [--json]

Images are prepared as validation images (shorter side to R / 0.875, centre crop R x R; R defaults to
the run's evaluation resolution) and run through the inference copy of the network
(`inference.InferenceModel`) in batches of --batch. Classes are named by the training data's class
folder names, which checkpoints store (`class <i>` for data without names). Folders are searched
recursively for image files. --json prints one list: per image its path and its top-k
[{"class", "index", "probability"}].
"""

from __future__ import annotations

import argparse
import json

from ipu_effnet.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file, or a run directory (its newest)")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of them")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--res", type=int, help="resolution (default: the run's evaluation resolution)")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass")
    parser.add_argument("--averaged", action="store_true", help="use the weight-averaged model")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def predict(model, images, names, topk: int, batch: int = 32):
    """Per image: [(class name, index, probability)] for its top-k classes."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            probs = model(images[start:start + batch]).float().softmax(1)
            top = probs.topk(min(topk, probs.shape[1]), dim=1)
            for values, indices in zip(top.values.tolist(), top.indices.tolist()):
                out.append([(names[i], i, p) for p, i in zip(values, indices)])
    return out


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.inference import class_names, find_images, load_images, load_inference_model
    from ipu_effnet.resolutions import eval_resolution

    if args.topk < 1 or args.batch < 1:
        raise UsageError("--topk and --batch must be at least 1")
    find_images(args.images)  # a wrong path fails before the checkpoint loads
    model, ckpt, cfg, path = load_inference_model(args.checkpoint, args.averaged)
    res = args.res or eval_resolution(cfg)
    if res < 32:
        raise UsageError(f"--res {res}: the resolution must be at least 32")
    images, files = load_images(args.images, res)
    names = class_names(ckpt, model.num_classes)
    results = predict(model, images, names, args.topk, args.batch)
    if args.json:
        print(json.dumps([{"image": str(f), "top": [{"class": c, "index": i, "probability": p} for c, i, p in r]}
                          for f, r in zip(files, results)], indent=2))
        return 0
    print(f"{path} at {res} px, {len(files)} image(s):")
    for f, r in zip(files, results):
        print(f"{f}: " + ", ".join(f"{c} {p:.1%}" for c, _, p in r))
    return 0
