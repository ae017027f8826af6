"""The backing-image store: real files, the real qemu-img and real HTTP servers (no mocks).

qemu-img must be installed: without it these tests fail (they do not skip).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from virtualizers.qemu.image_errors import ImageError, ImageInUse, ImageNotFound
from virtualizers.qemu.image_import import ImportProgress
from virtualizers.qemu.images import ImageStore
from virtualizers.qemu.import_policy import SourceRefused

MiB = 1 << 20


# Helpers.

def qemu_img(*args: str | Path) -> None:
    assert shutil.which("qemu-img"), "qemu-img is not installed: these tests need it (apt-get install qemu-utils)"
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True, timeout=30)


def make_qcow2(path: Path, size: str = "16M") -> Path:
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    return path


def make_raw(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(root: Path) -> set[str]:
    """Every file under `root`, relative to it (hidden ones included)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


def committed(*ids: str) -> set[str]:
    return {f"{image_id}{suffix}" for image_id in ids for suffix in (".img", ".json")}


async def open_store(root: Path, **kw: Any) -> ImageStore:
    """A store under `root` that may import from anywhere under `root`'s parent (the test's tmp dir), unless the
    test says otherwise."""
    kw.setdefault("import_sources", [str(root.parent)])
    store = ImageStore(root, limiter=trio.CapacityLimiter(4), **kw)
    await store.open()
    return store


class Recorder:
    """An on_progress callback that keeps every report."""

    def __init__(self) -> None:
        self.reports: list[ImportProgress] = []

    def __call__(self, progress: ImportProgress) -> None:
        self.reports.append(progress)

    @property
    def finished(self) -> list[ImportProgress]:
        return [r for r in self.reports if r.finished]


@pytest.fixture
def www(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A real `python -m http.server` on 127.0.0.1 serving a fresh dir: (dir, base URL)."""
    served = tmp_path / "www"
    served.mkdir()
    with subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(served), "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 10)
            assert ready, "http.server did not start within 10 s"
            port = re.search(r"port (\d+)", proc.stdout.readline())
            assert port, "http.server did not say its port"
            yield served, f"http://127.0.0.1:{port.group(1)}"
        finally:
            proc.kill()


def http_response(status: str, body: bytes = b"", *, length: int | None = None, headers: str = "") -> bytes:
    length = len(body) if length is None else length
    head = f"HTTP/1.1 {status}\r\nContent-Length: {length}\r\nConnection: close\r\n{headers}\r\n"
    return head.encode() + body


async def tiny_server(nursery: trio.Nursery, routes: dict[str, bytes], stall: Collection[str] = (),
                      asked: list[str] | None = None) -> str:
    """An HTTP server that answers GET <path> with the raw bytes routes[path] (404 for other paths) and then,
    for a path in `stall`, sends nothing more while keeping the connection open. Each path asked for is
    appended to `asked`, if given. Returns its base URL."""

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in request:
                data = await stream.receive_some(4096)
                if not data:
                    return
                request += data
        path = request.split(b" ", 2)[1].decode()
        if asked is not None:
            asked.append(path)
        try:
            await stream.send_all(routes.get(path, http_response("404 Not Found")))
            if path in stall:
                await trio.sleep_forever()
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


# ensure(): where images come from.

async def test_ensure_imports_from_a_search_dir_then_serves_from_the_store(tmp_path: Path) -> None:
    empty, images = tmp_path / "empty", tmp_path / "images"
    empty.mkdir()
    images.mkdir()
    source = make_qcow2(images / "focal.qcow2")
    progress = Recorder()
    root = tmp_path / "store"
    store = await open_store(root, search_dirs=[empty, images], on_progress=progress)

    info = await store.ensure("focal")
    assert (info.id, info.format, info.virtual_size) == ("focal", "qcow2", 16 * MiB)
    assert info.path == root / "focal.img" and info.path.read_bytes() == source.read_bytes()
    assert (info.size, info.sha256) == (source.stat().st_size, sha256_of(source))
    assert info.source == str(source) and info.sha256_verified is False
    record = json.loads((root / "focal.json").read_text())
    assert record == {"id": "focal", "format": "qcow2", "virtual_size": 16 * MiB, "size": info.size,
                      "sha256": info.sha256, "source": str(source), "imported_at": info.imported_at,
                      "sha256_verified": False}
    assert record["imported_at"].endswith("+00:00")
    assert files_in(root) == committed("focal") and len(progress.finished) == 1

    # From the store: no import, only last_used moves.
    old = time.time() - 3600
    os.utime(root / "focal.json", (old, old))
    again = await store.ensure("focal")
    assert again.last_used > old + 3000 and again.last_used == (root / "focal.json").stat().st_mtime
    assert again.sha256 == info.sha256 and len(progress.finished) == 1
    assert store.get("focal") == again and store.list() == [again]

    # Committed means durable: a new store over the same root has it.
    reopened = await open_store(root)
    assert reopened.list() == [again]


async def test_ensure_takes_the_first_search_dir_holding_the_image(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    make_qcow2(second / "img")
    raw = make_raw(first / "img.raw", MiB)
    store = await open_store(tmp_path / "store", search_dirs=[first, second])
    info = await store.ensure("img")
    assert (info.source, info.format, info.virtual_size) == (str(raw), "raw", MiB)


async def test_ensure_from_a_file_url_template(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror dir"
    mirror.mkdir()
    source = make_qcow2(mirror / "jammy.qcow2")
    template = f"file://{mirror.as_posix().replace(' ', '%20')}/{{id}}.qcow2"
    store = await open_store(tmp_path / "store", url_template=template)
    info = await store.ensure("jammy")
    assert info.sha256 == sha256_of(source) and info.format == "qcow2"
    assert info.source.startswith("file://")


async def test_ensure_from_an_http_template_with_and_without_a_published_digest(tmp_path: Path,
                                                                                www: tuple[Path, str]) -> None:
    served, base = www
    signed = make_raw(served / "signed.img", 3 * MiB)
    (served / "signed.img.sha256").write_text(f"{sha256_of(signed)}  signed.img\n")
    make_qcow2(served / "plain.img")
    progress = Recorder()
    root = tmp_path / "store"
    store = await open_store(root, url_template=f"{base}/{{id}}.img", on_progress=progress)

    info = await store.ensure("signed")
    assert info.sha256_verified is True and (info.format, info.size) == ("raw", 3 * MiB)
    assert info.source == f"{base}/signed.img"
    assert progress.finished[-1].total_bytes == 3 * MiB == progress.finished[-1].done_bytes

    plain = await store.ensure("plain")  # no plain.img.sha256: the server's 404 means "not published"
    assert plain.sha256_verified is False and plain.format == "qcow2"
    assert files_in(root) == committed("signed", "plain")


async def test_http_404_is_image_not_found_naming_every_place(tmp_path: Path, www: tuple[Path, str]) -> None:
    _, base = www
    search = tmp_path / "search"
    search.mkdir()
    root = tmp_path / "store"
    store = await open_store(root, search_dirs=[search], url_template=f"{base}/{{id}}.img")
    with pytest.raises(ImageNotFound) as caught:
        await store.ensure("missing")
    reason = str(caught.value)
    assert f"{base}/missing.img" in reason and "404" in reason
    assert str(root) in reason and str(search) in reason and "missing.qcow2" in reason
    assert caught.value.reason == reason and caught.value.code == "image_failure"
    assert files_in(root) == set()


async def test_ensure_without_any_source_is_image_not_found(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "store")
    with pytest.raises(ImageNotFound, match="image 'nowhere' not found: not in the store"):
        await store.ensure("nowhere")
    with pytest.raises(ValueError, match="must use {id} only"):
        ImageStore(tmp_path, url_template="http://x/{name}.img", limiter=trio.CapacityLimiter(1))


async def test_five_concurrent_ensures_import_once(tmp_path: Path, www: tuple[Path, str]) -> None:
    served, base = www
    make_raw(served / "shared.img", 8 * MiB)
    progress = Recorder()
    store = await open_store(tmp_path / "store", url_template=f"{base}/{{id}}.img", on_progress=progress)
    results: list[Any] = []

    async def ensure() -> None:
        results.append(await store.ensure("shared"))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ensure)
    assert len(progress.finished) == 1
    assert len(results) == 5 and {(r.id, r.sha256, r.path) for r in results} == {(results[0].id, results[0].sha256,
                                                                                   results[0].path)}
    assert store._locks._entries == {}  # per-id locks do not outlive their users


# Digests.

async def test_published_digest_is_verified_and_a_mismatch_leaves_nothing(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good = make_qcow2(images / "good.qcow2")
    (images / "good.qcow2.sha256").write_text(sha256_of(good) + "\n")  # bare hex form
    bad = make_qcow2(images / "bad.qcow2")
    wrong = "0" * 64
    (images / "bad.qcow2.sha256").write_text(f"{wrong}  bad.qcow2\n")
    root = tmp_path / "store"
    store = await open_store(root, search_dirs=[images])

    assert (await store.ensure("good")).sha256_verified is True
    with pytest.raises(ImageError) as caught:
        await store.ensure("bad")
    assert wrong in str(caught.value) and sha256_of(bad) in str(caught.value)
    assert files_in(root) == committed("good") and store.get("bad") is None

    # The caller's digest takes precedence over the published one.
    info = await store.import_(str(bad), "bad", expected_sha256=sha256_of(bad).upper())
    assert info.sha256_verified is True
    with pytest.raises(ImageError, match=f"expected {wrong}, got {sha256_of(good)}"):
        await store.import_(str(good), "other", expected_sha256=wrong)
    with pytest.raises(ImageError, match="expected_sha256 does not hold a sha256 digest"):
        await store.import_(str(good), "other", expected_sha256="abc")
    (images / "junk.qcow2.sha256").write_text("not a digest\n")
    with pytest.raises(ImageError, match="junk.qcow2.sha256 does not hold a sha256 digest"):
        await store.import_(str(make_qcow2(images / "junk.qcow2")), "junk")
    assert files_in(root) == committed("good", "bad")


# What is refused.

def make_backed(path: Path) -> None:
    base = make_qcow2(path.with_name("base.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path)


def make_with_data_file(path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={path.with_name('data.raw')}", path, "16M")


REFUSED: dict[str, tuple[Callable[[Path], object], str]] = {
    "backing file": (make_backed, "has a backing file of its own"),
    "external data file": (make_with_data_file, "has an external data file"),
    "vdi": (lambda p: qemu_img("create", "-q", "-f", "vdi", p, "16M"), "format 'vdi' is not supported"),
    "text": (lambda p: p.write_text("<html>please log in</html>\n"), "not a disk image"),
    "empty": (lambda p: p.write_bytes(b""), "virtual size is 0"),
}


@pytest.mark.parametrize("case", REFUSED)
async def test_refused_images_leave_nothing(tmp_path: Path, case: str) -> None:
    make, reason = REFUSED[case]
    source = tmp_path / "candidate"
    make(source)
    root = tmp_path / "store"
    store = await open_store(root)
    with pytest.raises(ImageError, match=reason) as caught:
        await store.import_(str(source), "candidate")
    assert str(source) in str(caught.value)
    assert files_in(root) == set() and store.list() == []


async def test_bad_sources_and_ids(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = await open_store(root)
    with pytest.raises(ImageNotFound, match="does not exist"):
        await store.import_(str(tmp_path / "nope.qcow2"), "nope")
    with pytest.raises(SourceRefused):  # not a scheme the allow-list can hold
        await store.import_("ftp://example.com/x.img", "x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ImageError, match="is not a regular file"):
        await store.import_(str(tmp_path / "dir"), "dir")
    with pytest.raises(ImageError, match="invalid image id '../x'"):
        await store.import_(str(tmp_path), "../x")
    await store.import_(str(make_qcow2(tmp_path / "one.qcow2")), "one")
    with pytest.raises(ImageError, match="image 'one' already exists"):
        await store.import_(str(tmp_path / "one.qcow2"), "one")
    assert files_in(root) == committed("one")


# HTTP failures.

async def test_http_errors_and_redirects(tmp_path: Path, nursery: trio.Nursery) -> None:
    base = await tiny_server(nursery, {
        "/moved.img": http_response("302 Found", headers="Location: /real.img\r\n"),
        "/real.img": http_response("200 OK", b"\0" * MiB),
        "/broken.img": http_response("500 Internal Server Error", b"oops"),
        "/locked.img.sha256": http_response("403 Forbidden"),
    })
    root = tmp_path / "store"
    store = await open_store(root, import_sources=[base, "http://127.0.0.1:1/"])
    info = await store.import_(f"{base}/moved.img", "moved")
    assert (info.format, info.size, info.source) == ("raw", MiB, f"{base}/moved.img")
    with pytest.raises(ImageError) as caught:
        await store.import_(f"{base}/broken.img", "broken")
    assert not isinstance(caught.value, ImageNotFound)
    assert str(caught.value) == f"GET {base}/broken.img answered HTTP 500 Internal Server Error"
    with pytest.raises(ImageError, match=f"GET {base}/locked.img.sha256 answered HTTP 403"):
        await store.import_(f"{base}/locked.img", "locked")
    with pytest.raises(ImageError, match="cannot download http://127.0.0.1:1/x.img: ConnectError"):
        await store.import_("http://127.0.0.1:1/x.img", "x")
    assert files_in(root) == committed("moved")


async def test_a_stalled_download_times_out_and_leaves_nothing(tmp_path: Path, nursery: trio.Nursery) -> None:
    stalled = http_response("200 OK", b"\0" * MiB, length=8 * MiB)
    base = await tiny_server(nursery, {"/stalled.img": stalled}, stall={"/stalled.img"})
    root = tmp_path / "store"
    store = await open_store(root, http_timeout_s=0.5, import_sources=[base])
    with trio.fail_after(10):
        with pytest.raises(ImageError, match=f"cannot download {base}/stalled.img: ReadTimeout"):
            await store.import_(f"{base}/stalled.img", "stalled")
    assert files_in(root) == set()


async def test_cancellation_mid_download_leaves_nothing(tmp_path: Path, nursery: trio.Nursery) -> None:
    stalled = http_response("200 OK", b"\0" * 3 * MiB, length=64 * MiB)
    base = await tiny_server(nursery, {"/stalled.img": stalled}, stall={"/stalled.img"})
    root = tmp_path / "store"
    store = await open_store(root, url_template=f"{base}/{{id}}.img", import_sources=[str(tmp_path)])
    copying = trio.Event()
    reports = Recorder()

    def on_progress(progress: ImportProgress) -> None:
        reports(progress)
        copying.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(functools.partial(store.import_, f"{base}/stalled.img", "stalled",
                                               on_progress=on_progress))
            await copying.wait()
            assert len(files_in(root / ".tmp")) == 1  # the import is under way
            inner.cancel_scope.cancel()
    assert reports.reports[-1].done_bytes >= MiB and reports.reports[-1].total_bytes == 64 * MiB
    assert reports.finished == []
    assert files_in(root) == set() and store.get("stalled") is None and store._locks._entries == {}

    # The id is not wedged: it can be imported afterwards.
    info = await store.import_(str(make_qcow2(tmp_path / "real.qcow2")), "stalled")
    assert files_in(root) == committed("stalled") and info.format == "qcow2"


# Progress.

async def test_progress_reports_grow_and_finish_once(tmp_path: Path) -> None:
    source = make_raw(tmp_path / "disk.raw", 4 * MiB + 512)
    store_reports = Recorder()
    store = await open_store(tmp_path / "store", on_progress=store_reports, progress_interval_s=0)
    reports = Recorder()
    await store.import_(str(source), "disk", on_progress=reports)
    assert store_reports.reports == []  # the per-call callback replaces the store's
    copying = [r for r in reports.reports if not r.finished]
    assert [r.done_bytes for r in copying] == [MiB, 2 * MiB, 3 * MiB, 4 * MiB, 4 * MiB + 512]
    assert {(r.image_id, r.source, r.total_bytes) for r in reports.reports} == {("disk", str(source), 4 * MiB + 512)}
    assert len(reports.finished) == 1 and reports.reports[-1].finished
    assert reports.reports[-1].done_bytes == 4 * MiB + 512

    throttled = await open_store(tmp_path / "store2", on_progress=store_reports, progress_interval_s=3600)
    await throttled.import_(str(source), "disk")
    assert [r.finished for r in store_reports.reports] == [False, True]  # the first chunk, then the end


# Removal, gc and crash leftovers.

async def test_remove(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = await open_store(root)
    await store.import_(str(make_qcow2(tmp_path / "a.qcow2")), "a")
    with pytest.raises(ImageInUse, match="image 'a' is in use"):
        await store.remove("a", in_use={"a"})
    assert files_in(root) == committed("a")
    with pytest.raises(ImageNotFound, match="image 'b' is not in the store"):
        await store.remove("b", in_use=())
    await store.remove("a", in_use={"b"})
    assert files_in(root) == set() and store.get("a") is None and store.list() == []


async def test_gc_removes_only_old_unused_images(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = await open_store(root)
    for image_id in ("old", "old-in-use", "fresh"):
        await store.import_(str(make_qcow2(tmp_path / f"{image_id}.qcow2")), image_id)
    old = time.time() - 7200
    for image_id in ("old", "old-in-use"):
        os.utime(root / f"{image_id}.json", (old, old))
    assert await store.gc(in_use={"old-in-use"}, older_than_s=3600) == ["old"]
    assert files_in(root) == committed("old-in-use", "fresh")
    assert [i.id for i in store.list()] == ["fresh", "old-in-use"]
    assert await store.gc(in_use=(), older_than_s=3600) == ["old-in-use"]
    assert await store.gc(in_use=(), older_than_s=3600) == []


async def test_open_removes_crash_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = await open_store(root)
    kept = await store.import_(str(make_qcow2(tmp_path / "kept.qcow2")), "kept")
    (root / ".tmp" / "kept.1234abcd").write_bytes(b"half an import")
    (root / ".tmp" / "stray").mkdir()
    (root / ".tmp" / "stray" / "x").write_bytes(b"x")
    (root / "uncommitted.img").write_bytes(b"\0" * 512)  # renamed into place, crashed before its json
    (root / ".kept.json.tmp").write_bytes(b"{")  # files.atomic_write's temp file
    (root / "ghost.json").write_text(json.dumps({**json.loads((root / "kept.json").read_text()), "id": "ghost"}))
    (root / "broken.img").write_bytes(b"\0" * 512)
    (root / "broken.json").write_text("{not json")
    (root / "README").write_text("not ours to remove")

    reopened = await open_store(root)
    assert reopened.list() == [kept]
    assert files_in(root) == committed("kept") | {"README"}
    assert (root / ".tmp").is_dir()
