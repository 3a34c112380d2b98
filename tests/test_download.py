"""`download imagenette` against a local HTTP server on 127.0.0.1 that serves a small archive the test
builds (with Range support, like the real host): a whole download, a resumed one, a truncated one and a
corrupt one. Nothing here touches the internet."""

import http.server
import io
import tarfile
import threading
from pathlib import Path

import pytest

from ipu_effnet.cli import main
from ipu_effnet.data.download import IMAGENETTE, DownloadError, download_imagenette
from ipu_effnet.errors import UsageError

WNIDS = ("n01440764", "n02102040")


def build_archive(top: str = "imagenette2-160", files_per_class: int = 3) -> bytes:
    """A gzipped tar shaped like Imagenette's: top/{train,val}/<wnid>/*.JPEG (tiny JPEGs)."""
    from PIL import Image

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split in ("train", "val"):
            for c, wnid in enumerate(WNIDS):
                for i in range(files_per_class):
                    img = io.BytesIO()
                    Image.new("RGB", (20, 16), (40 * c, 10 * i, 90)).save(img, format="JPEG")
                    info = tarfile.TarInfo(f"{top}/{split}/{wnid}/img_{i}.JPEG")
                    info.size = img.tell()
                    img.seek(0)
                    tar.addfile(info, img)
    return buf.getvalue()


class Server:
    """Serves `body` at /imagenette2-160.tgz; `cut_at`: close the connection after that many bytes while
    announcing the full length (a dropped connection). Records the Range headers it was sent."""

    def __init__(self, body: bytes, cut_at=None, ranges=True):
        self.body, self.cut_at, self.ranges, self.seen = body, cut_at, ranges, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.seen.append(self.headers.get("Range"))
                data, start = outer.body, 0
                rng = self.headers.get("Range")
                if rng and outer.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                chunk = data[start:]
                if outer.cut_at is not None:
                    chunk = chunk[:max(0, outer.cut_at - start)]
                self.wfile.write(chunk)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/imagenette2-160.tgz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def leftovers(to: Path):
    return sorted(p.name for p in to.iterdir()) if to.exists() else []


def test_downloads_checks_and_extracts_to_the_imagefolder_layout(tmp_path):
    body = build_archive()
    with Server(body) as server:
        folder = download_imagenette(tmp_path, size="160", url=server.url, progress=False, log=lambda _m: None)
    assert folder == tmp_path / "imagenette2-160"
    assert sorted(p.name for p in (folder / "train").iterdir()) == list(WNIDS)
    assert len(list((folder / "val" / WNIDS[1]).glob("*.JPEG"))) == 3
    assert leftovers(tmp_path) == ["imagenette2-160"]  # archive removed, no temporary folder
    # the layout is what data.dataset imagenet reads
    from ipu_effnet.data.datasets import ImageFolderDataset

    assert len(ImageFolderDataset(folder, "validation")) == 6
    # a second call finds it complete and fetches nothing
    with Server(body) as server:
        download_imagenette(tmp_path, size="160", url=server.url, progress=False, log=lambda _m: None)
        assert server.seen == []


def test_a_partial_download_is_resumed_with_a_range_request(tmp_path):
    body = build_archive(files_per_class=20)
    half = len(body) // 2
    (tmp_path / "imagenette2-160.tgz.part").write_bytes(body[:half])
    with Server(body) as server:
        download_imagenette(tmp_path, size="160", url=server.url, progress=False, log=lambda _m: None)
    assert server.seen == [f"bytes={half}-"]
    assert (tmp_path / "imagenette2-160" / "train" / WNIDS[0] / "img_2.JPEG").is_file()


def test_a_server_that_ignores_the_range_restarts_the_download(tmp_path):
    body = build_archive()
    (tmp_path / "imagenette2-160.tgz.part").write_bytes(b"stale bytes of something else")
    with Server(body, ranges=False) as server:
        download_imagenette(tmp_path, size="160", url=server.url, progress=False, log=lambda _m: None)
    assert (tmp_path / "imagenette2-160" / "val" / WNIDS[0]).is_dir()


def test_a_truncated_download_is_refused_kept_for_resuming_and_nothing_is_extracted(tmp_path, capsys):
    body = build_archive()
    with Server(body, cut_at=len(body) // 2) as server:
        status = main(["download", "imagenette", "--size", "160", "--to", str(tmp_path), "--url", server.url,
                       "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert status == 1
        assert len(err.splitlines()) == 1 and "truncated" in err and f"{len(body) // 2:,} of {len(body):,}" in err
        assert leftovers(tmp_path) == ["imagenette2-160.tgz.part"]  # no folder, the part kept
        assert (tmp_path / "imagenette2-160.tgz.part").stat().st_size == len(body) // 2
        server.cut_at = None  # the connection holds this time: the next call resumes and finishes
        assert main(["download", "imagenette", "--size", "160", "--to", str(tmp_path), "--url", server.url,
                     "--no-progress"]) == 0
        assert server.seen[-1] == f"bytes={len(body) // 2}-"
    assert leftovers(tmp_path) == ["imagenette2-160"]


def test_a_corrupt_archive_of_the_right_size_is_refused_without_a_half_extracted_folder(tmp_path, capsys):
    body = bytearray(build_archive(files_per_class=40))
    body[len(body) // 2:] = bytes(len(body) - len(body) // 2)  # the second half zeroed: a corrupt stream
    with Server(bytes(body)) as server:
        status = main(["download", "imagenette", "--size", "160", "--to", str(tmp_path), "--url", server.url,
                       "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and len(err.splitlines()) == 1 and "not a readable archive" in err
    assert leftovers(tmp_path) == []  # neither the archive nor a partial folder


def test_an_archive_without_the_layout_is_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("imagenette2-160/readme.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with Server(buf.getvalue()) as server, pytest.raises(DownloadError, match="train/<class>/"):
        download_imagenette(tmp_path, size="160", url=server.url, progress=False, log=lambda _m: None)
    assert leftovers(tmp_path) == []


def test_a_published_archive_is_checked_against_its_md5(tmp_path, monkeypatch):
    import ipu_effnet.data.download as dl

    body = build_archive()
    with Server(body) as server:
        monkeypatch.setitem(dl.IMAGENETTE, "160", dl.Archive(server.url, "imagenette2-160", "0" * 32))
        with pytest.raises(DownloadError, match="MD5"):
            download_imagenette(tmp_path, size="160", progress=False, log=lambda _m: None)
    assert leftovers(tmp_path) == []


def test_only_https_is_fetched_from_anywhere_but_the_loopback(tmp_path, capsys):
    with pytest.raises(UsageError, match="https"):
        download_imagenette(tmp_path, url="http://example.com/imagenette2-160.tgz", progress=False)
    assert main(["download", "imagenette", "--to", str(tmp_path), "--url", "ftp://example.com/x.tgz"]) == 2
    assert all(a.url.startswith("https://") for a in IMAGENETTE.values())
    assert not tmp_path.joinpath("imagenette2-320").exists()
