"""`bench`: images per second of a training step, inference or the data loader, and peak memory,
optionally against a second configuration or a peer implementation.

    python -m ipu_effnet bench --model efficientnet_b0_g16 --norm layer --res 160 --batch 16 \\
        --vs "norm=layer+proxy" --repeats 5 --threads 2 --channels-last
    python -m ipu_effnet bench --model efficientnet_b0 --norm batch --batch 32 --threads 2 \\
        --channels-last --peer geffnet
    python -m ipu_effnet bench --mode data --res 160 --batch 32 --workers 1 --vs "draft=false"

With `--vs "KEY=VALUE ..."` the second configuration (B) is the first (A) with those options changed;
`--peer geffnet` is `--vs "impl=geffnet"` (geffnet's model of the same name). A and B run alternately
in one process and the command prints the median images/s of each, their spread and the ratio B/A.
Compare configurations as ratios from one run: absolute figures drift with the machine. The output
format is described in docs/PERFORMANCE.md; the measuring lives in the package `ipu_effnet.analysis.bench`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ipu_effnet.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="efficientnet_b0_g16", help="model name (default: efficientnet_b0_g16)")
    parser.add_argument("--norm", default="batch",
                        help="batch | group | layer | none, KIND+proxy for Proxy Norm (default: batch)")
    parser.add_argument("--group-size", type=int, default=None, help="channels per group of the spatial convolutions")
    parser.add_argument("--expand-ratio", type=float, default=None, help="expansion of the inverted-residual stages")
    parser.add_argument("--res", type=int, default=None,
                        help="input resolution (default: the model's native one; 224 in the data mode)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (default: 16)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each round (default: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; with --vs, A and B alternate (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format for model and input")
    parser.add_argument("--mode", choices=("train", "infer", "data"), default="train",
                        help="train: the training step (TrainingModel through TorchRunner.step, SGD); "
                             "infer: forward in eval mode; data: batches from the training data loader")
    parser.add_argument("--device", choices=("cpu", "cuda", "ipu"), default="cpu",
                        help="where the model runs (ipu: through poptorch, needs the Poplar SDK; default: cpu)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="fp32, or autocast to bf16 / fp16 (fp16 on CUDA only; default: fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                        help="inference: run the plain eval model (default: BatchNorm folded into the convolution "
                             "and Proxy Norm's statistics frozen, models/fold.py)")
    parser.add_argument("--proxy-impl", choices=("gn_silu", "inplace", "reference"), default=None,
                        help="how Proxy Norm's per-element step runs (norms/proxy_ops.py; default: the fastest valid)")
    parser.add_argument("--data-path", default=None,
                        help="data mode: an ImageNet-style folder (train/<class>/<image>); default: generated JPEGs")
    parser.add_argument("--data-images", type=int, default=64, help="data mode: how many JPEGs to generate (default: 64)")
    parser.add_argument("--jpeg-size", default="500x375", help="data mode: generated JPEG size (default: 500x375)")
    parser.add_argument("--workers", type=int, default=0,
                        help="data mode: loader worker processes (0: in the main process; default: 0)")
    parser.add_argument("--no-draft", dest="draft", action="store_false",
                        help="data mode: decode JPEGs at full size (default: reduced-scale decoding where it fits)")
    parser.add_argument("--preprocess", choices=("train", "eval"), default="train",
                        help="data mode: training (random-resized crop, flip) or evaluation (resize, centre crop) preprocessing")
    parser.add_argument("--decoder", choices=("auto", "pillow", "simplejpeg"), default="auto",
                        help="data mode: JPEG decoder (data.jpeg_decoder; auto: simplejpeg when installed)")
    parser.add_argument("--resampler", choices=("auto", "pillow", "torch"), default="auto",
                        help="data mode: resize of the crop (data.resampler; auto: torch's uint8 kernel in workers)")
    parser.add_argument("--vs", metavar='"KEY=VALUE ..."', default=None,
                        help='also measure a configuration differing in these options, e.g. --vs "norm=layer+proxy"')
    parser.add_argument("--peer", choices=("geffnet",), default=None,
                        help='also measure the peer implementation of the same model (= --vs "impl=geffnet")')
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory measurement (on the CPU a fresh process per configuration)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--quiet", action="store_true", help="no per-round progress on stderr")


def config_from_args(args: argparse.Namespace):
    from ipu_effnet.analysis.bench import BenchConfig

    return BenchConfig(model=args.model, norm=args.norm, group_size=args.group_size,
                       expand_ratio=args.expand_ratio, res=args.res, batch=args.batch, steps=args.steps,
                       warmup=args.warmup, threads=args.threads, channels_last=args.channels_last,
                       mode=args.mode, proxy_impl=args.proxy_impl, device=args.device, precision=args.precision,
                       fold_bn=args.fold_bn, compile=args.compile, data_path=args.data_path,
                       workers=args.workers, preprocess=args.preprocess, draft=args.draft, decoder=args.decoder, resampler=args.resampler,
                       data_images=args.data_images,
                       jpeg_size=args.jpeg_size).validate()


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.analysis.bench import format_report, run_bench

    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    if args.device == "ipu" and args.precision != "fp32":  # the IPU workload takes no autocast: it would run fp32
        raise UsageError(f"bench --device ipu --precision {args.precision}: the IPU workload runs fp32 only; "
                         "measure IPU half precision with `train --set backend=ipu --set train.precision=16.16`")
    if args.vs is not None and args.peer is not None:
        raise UsageError("--vs and --peer both name configuration B; give one (--peer geffnet = --vs impl=geffnet)")
    configs = [config_from_args(args)]
    if args.vs is not None:
        configs.append(configs[0].with_overrides(args.vs))
    elif args.peer is not None:
        configs.append(configs[0].with_overrides(f"impl={args.peer}"))
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    report = run_bench(configs, repeats=args.repeats, progress=progress, memory=args.memory)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0
