"""`download`: a public data set in one command.

    python -m ipu_effnet download imagenette [--size 160|320|full] --to DIR [--keep-archive]

Fetches the published Imagenette 2 archive over HTTPS (resuming a partial download), checks its size and
MD5, and extracts it to DIR/imagenette2-<size>/{train,val}/<wnid>/, the layout `data.dataset: imagenet`
reads: e.g. `study --data DIR/imagenette2-320`. A truncated or corrupt archive is refused with one line
and leaves no half-extracted folder behind. Details: ipu_effnet/data/download.py, docs/study.md.
"""

from __future__ import annotations

import argparse

DATASETS = ("imagenette",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=DATASETS, help="the data set (imagenette: Imagenette 2, 10 classes)")
    parser.add_argument("--size", default="320", choices=("160", "320", "full"),
                        help="shorter image side of the archive: 160 px, 320 px or full size (default 320)")
    parser.add_argument("--to", required=True, help="directory the archive's folder is extracted into")
    parser.add_argument("--url", default=None, help="another address of the same archive (a mirror; MD5 not checked)")
    parser.add_argument("--keep-archive", action="store_true", help="keep the .tgz after extracting it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ipu_effnet.data.download import download_imagenette

    folder = download_imagenette(args.to, size=args.size, url=args.url, progress=not args.no_progress,
                                 keep_archive=args.keep_archive)
    print(f"imagenette: {folder} (train/, val/); use it with --data {folder} or --set data.path={folder}")
    return 0
