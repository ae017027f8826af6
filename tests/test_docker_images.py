"""The docker virtualizer's images against the real engine: a reference the engine lacks is loaded once from the
image dir (rootfs tarball → import, image archive → load), however many STARTs ask at once, with image_progress
events; a reference with no file is an image_failure that says where it looked."""

# ruff: noqa: F811 (fixtures imported from docker_support are test arguments)

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from docker_support import (  # noqa: F401 (fixtures)
    Recorder,
    busybox_rootfs,
    docker,
    docker_backend,
    docker_engine,
    image_ref,
    put_archive,
    put_rootfs,
    spec_for,
)

from launcher.plugin.errors import IMAGE_FAILURE, VirtualizerError
from virtualizers.docker.images import ImageLoadError, candidates, parse_reference


def test_the_image_dir_rule_cuts_a_reference_into_dirs_and_a_file_name(tmp_path: Path) -> None:
    assert [p.relative_to(tmp_path).as_posix() for p, _ in candidates(tmp_path, parse_reference("busybox"))] == [
        "busybox/latest.image.tar", "busybox/latest.rootfs.tar", "busybox/latest.rootfs.tar.gz",
        "busybox/latest.rootfs.tar.xz"]
    path, how = candidates(tmp_path, parse_reference("example.org:5000/a/b:1.2"))[0]
    assert (path.relative_to(tmp_path).as_posix(), how) == ("example.org:5000/a/b/1.2.image.tar", "load")
    assert candidates(tmp_path, parse_reference("a@sha256:" + "0" * 64)) == []
    with pytest.raises(ImageLoadError):
        parse_reference("a/../b:1")


async def test_concurrent_starts_import_a_rootfs_tarball_once(tmp_path: Path, docker_engine: str,
                                                              busybox_rootfs: Path, image_ref: str) -> None:
    image_dir = tmp_path / "images"
    put_rootfs(image_dir, image_ref, busybox_rootfs)
    recorder = Recorder()
    async with docker_backend(tmp_path / "data", {"image_dir": str(image_dir)}, recorder) as backend:
        results: list[str] = []

        async def ensure() -> None:
            results.append(await backend.loader.ensure(image_ref))

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(ensure)
    assert sum(r.startswith("imported from") for r in results) == 1, results
    assert all(r.startswith(("imported from", "present")) for r in results)
    finished = [e for e in recorder.of("image_progress") if e["finished"]]
    assert len(finished) == 1
    assert finished[0]["image_uuid"] == image_ref
    assert finished[0]["done_bytes"] == finished[0]["total_bytes"] == busybox_rootfs.stat().st_size
    assert docker("image", "inspect", image_ref).returncode == 0


async def test_an_image_archive_is_loaded_and_tagged_with_the_reference(tmp_path: Path, docker_engine: str,
                                                                        busybox_rootfs: Path, image_ref: str) -> None:
    image_dir = tmp_path / "images"
    other = image_ref.replace(":1", ":saved-as-other")
    put_archive(image_dir, image_ref, busybox_rootfs, saved_as=other)
    recorder = Recorder()
    try:
        async with docker_backend(tmp_path / "data", {"image_dir": str(image_dir)}, recorder) as backend:
            assert (await backend.loader.ensure(image_ref)).startswith("loaded from")
            assert await backend.loader.ensure(image_ref) == "present"
    finally:
        docker("rmi", "-f", other, check=False)
    assert docker("image", "inspect", image_ref).returncode == 0


async def test_an_image_nowhere_fails_the_start_naming_where_it_looked(tmp_path: Path, docker_engine: str,
                                                                       image_ref: str) -> None:
    recorder = Recorder()
    async with docker_backend(tmp_path / "data", {}, recorder) as backend:
        vm = backend.new_virtualizer()
        vm.init(spec_for(image_ref), tmp_path / "instance", lambda: ())
        with pytest.raises(VirtualizerError) as caught:
            await vm.ensure_backing_image()
    assert caught.value.code == IMAGE_FAILURE
    assert "docker-images/launcher-test" in caught.value.reason and "docker.pull is false" in caught.value.reason


async def test_a_broken_tarball_is_an_image_failure(tmp_path: Path, docker_engine: str, image_ref: str) -> None:
    image_dir = tmp_path / "images"
    repository, _, tag = image_ref.rpartition(":")
    bad = image_dir.joinpath(*repository.split("/"), f"{tag}.image.tar")
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a tar archive" * 100)
    async with docker_backend(tmp_path / "data", {"image_dir": str(image_dir)}, Recorder()) as backend:
        with pytest.raises(ImageLoadError, match=image_ref):
            await backend.loader.ensure(image_ref)
