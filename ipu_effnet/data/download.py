"""Fetch a public data set archive over HTTPS and extract it to the ImageFolder layout.

    folder = download_imagenette("data", size="160")     # data/imagenette2-160/{train,val}/<wnid>/*.JPEG

Imagenette 2 (fastai) is published as three gzipped tar archives whose single top folder holds
`train/<wnid>/` and `val/<wnid>/`, the layout `data.dataset: imagenet` reads. The steps, and what each
guarantees:

- Download into `<to>/<archive>.part` with a progress bar. An existing `.part` is resumed with an HTTP
  Range request; a server that ignores the range (status 200) restarts it from the first byte.
- Size check: the bytes received must equal the size the server announced (Content-Length, or the total
  of Content-Range). A connection that ends early leaves the `.part` in place for the next call to resume
  and stops with one line saying so. Once complete, the published archives' MD5 is checked too: a file of
  the right size with other content is a corrupt archive, removed, and the call stops with one line.
- Extraction first decompresses the whole gzip stream (its CRC-32 and length trailer), then unpacks into
  a hidden temporary folder next to the target, member by member, refusing absolute paths and `..`, and
  skipping links and device files; a read error (a truncated or corrupt gzip/tar stream) removes the
  temporary folder and the archive and stops with one line. The extracted tree must have train/ and val/
  with class folders; only then is it renamed into place, so the target folder is either complete or
  absent. The archive is deleted afterwards unless `keep_archive`.
- An existing complete target (train/ and val/ with class folders) is left alone.

Only HTTPS URLs are fetched, apart from http://127.0.0.1 and http://localhost (the tests' local server).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ipu_effnet.errors import RunError, UsageError

CHUNK = 1 << 16
TIMEOUT_S = 60


@dataclass(frozen=True)
class Archive:
    url: str
    folder: str                 # the archive's top folder, and the target's name under --to
    md5: Optional[str] = None   # of the published archive; None: the size check only


IMAGENETTE = {
    "160": Archive("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz", "imagenette2-160",
                   "e793b78cc4c9e9a4ccc0c1155377a412"),
    "320": Archive("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz", "imagenette2-320",
                   "3df6f0d01a2c9592104656642f5e78a3"),
    "full": Archive("https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz", "imagenette2",
                    "fe2fc210e6bb7c5664d602c3cd71e612"),
}


class DownloadError(RunError):
    """A download or archive that cannot be used: one line, and what was kept for the next call."""


def check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    loopback = parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost")
    if parts.scheme != "https" and not loopback:
        raise UsageError(f"--url {url}: only https:// URLs are fetched (http only from 127.0.0.1)")


def is_complete(folder: Path) -> bool:
    """train/ and val/ (or validation/) with at least one class folder each."""
    def classes(d: Path) -> bool:
        return d.is_dir() and any(p.is_dir() for p in d.iterdir())

    return classes(folder / "train") and (classes(folder / "val") or classes(folder / "validation"))


def fetch(url: str, part: Path, progress: bool = True, log: Callable[[str], None] = print) -> int:
    """Download `url` into `part`, resuming what is there; returns the archive's size in bytes.
    Raises DownloadError when the connection ends before the announced size (the part is kept)."""
    from ipu_effnet.console import progress_bar

    check_url(url)
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "ipu_effnet"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the range starts at the end: the part may already be whole
            total = _range_total(exc.headers.get("Content-Range"))
            if total == have:
                return have
            part.unlink()
            raise DownloadError(f"{url}: the server refused to resume the {have:,}-byte partial download "
                                "(removed it); run the command again") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"{url}: cannot connect ({reason}); "
                            + ("the partial download is kept, " if have else "") + "run the command again") from None
    with response:
        if response.status == 206:
            total = _range_total(response.headers.get("Content-Range"))
            mode = "ab"
        else:  # a full response: start again
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None and length.isdigit() else None
        if have:
            log(f"resuming {part.name} at {have:,} bytes")
        bar = progress_bar(total=total, initial=have, unit="B", desc=part.name, disable=not progress, interval=10.0,
                           unit_scale=True, unit_divisor=1024, dynamic_ncols=True)  # plain lines in a log
        got = have
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, ValueError):  # e.g. http.client.IncompleteRead, a reset connection
                        break
                    if not chunk:
                        break
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        finally:
            bar.close()
    if total is not None and got < total:
        raise DownloadError(f"{url}: the download stopped at {got:,} of {total:,} bytes (truncated); "
                            f"{part} is kept: run the command again to resume")
    if total is not None and got > total:
        part.unlink()
        raise DownloadError(f"{url}: received {got:,} bytes, more than the announced {total:,}; the download "
                            "was removed: run the command again")
    return got


def _range_total(header: Optional[str]) -> Optional[int]:
    """The total of `Content-Range: bytes a-b/total` (None when absent or '*')."""
    if not header or "/" not in header:
        return None
    total = header.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe_members(tar: tarfile.TarFile, archive: Path):
    for member in tar:
        name = member.name
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise DownloadError(f"{archive}: refusing member {name!r} (a path outside the target)")
        if not (member.isdir() or member.isfile()):
            continue  # links, devices, fifos: not part of an image folder
        yield member


def check_gzip(archive: Path) -> None:
    """Decompress a gzip file to its end, which checks its CRC-32 and length trailer: tarfile alone may
    stop quietly at damaged data that happens to look like the end of the archive."""
    with open(archive, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return  # not gzip: tarfile checks the other formats
    with gzip.open(archive, "rb") as f:
        while f.read(1 << 20):
            pass


def extract(archive: Path, to: Path, folder: str) -> Path:
    """Extract `archive` (its top folder `folder`) into `to/folder`, all or nothing."""
    target = to / folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.extracting-", dir=to))
    try:
        try:
            check_gzip(archive)
            with tarfile.open(archive, "r:*") as tar:
                for member in _safe_members(tar, archive):
                    tar.extract(member, tmp, set_attrs=False)
        except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
            raise DownloadError(f"{archive}: not a readable archive ({_first_line(exc)}); removed it: run the "
                                "command again to download it afresh") from None
        top = tmp / folder
        if not top.is_dir():
            inside = sorted(p.name for p in tmp.iterdir())
            if len(inside) == 1 and (tmp / inside[0]).is_dir():
                top = tmp / inside[0]
            elif is_complete(tmp):
                top = tmp
        if not is_complete(top):
            raise DownloadError(f"{archive}: the archive holds no train/<class>/ and val/<class>/ folders; "
                                "removed it")
        if target.exists():
            shutil.rmtree(target)
        top.rename(target)
    except DownloadError:
        archive.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def download_archive(archive: Archive, to: os.PathLike, progress: bool = True, keep_archive: bool = False,
                     log: Callable[[str], None] = print) -> Path:
    """Fetch (resuming), check and extract `archive` under `to`; returns the extracted folder."""
    to = Path(to)
    target = to / archive.folder
    if is_complete(target):
        log(f"{target}: already there (train/ and val/), nothing to do")
        return target
    to.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.urlsplit(archive.url).path).name or f"{archive.folder}.tgz"
    final = to / name
    part = to / f"{name}.part"
    if not final.is_file():
        fetch(archive.url, part, progress=progress, log=log)
        if archive.md5 is not None:
            log(f"checking {name} (MD5)")
            got = md5sum(part)
            if got != archive.md5:
                part.unlink()
                raise DownloadError(f"{name}: MD5 {got} is not the published {archive.md5} (a corrupt download); "
                                    "removed it: run the command again")
        part.rename(final)
    log(f"extracting {name} into {target}")
    out = extract(final, to, archive.folder)
    if not keep_archive:
        final.unlink()
    return out


def download_imagenette(to: os.PathLike, size: str = "320", url: Optional[str] = None, progress: bool = True,
                        keep_archive: bool = False, log: Callable[[str], None] = print) -> Path:
    """Imagenette 2 at `size` ("160", "320" or "full"); `url` replaces the published address (a mirror:
    then only the size is checked, not the MD5)."""
    if size not in IMAGENETTE:
        raise UsageError(f"--size {size}: expected one of {', '.join(IMAGENETTE)}")
    archive = IMAGENETTE[size]
    if url is not None:
        check_url(url)
        archive = Archive(url, archive.folder, None)
    return download_archive(archive, to, progress=progress, keep_archive=keep_archive, log=log)
