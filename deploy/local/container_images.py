"""Container images built here (no registry is reachable), cached, and imported into containerd.

An image is written as a docker archive (what ``docker save`` makes and ``ctr images import``
reads): one layer, a config and a manifest, every file's time and owner fixed so that the same
input gives the same bytes. Archives are cached in ``~/.cache/pyabouts/images/``, named by a
hash of their input, so an image is rebuilt only when its input changes.

The pause image (``localhost/pause:3.10``, containerd's ``sandbox_image``) is ``pause/pause.c``
compiled with ``gcc -static``. The test image (``localhost/pyabouts-test:1``, for the pods of
the seed scenarios: ``sh``, ``ping``, ``nc``, ``ip``) is Debian's ``busybox-static`` with its
applets as links (its ``wget`` segfaults here: use ``nc``). The project's image, built with
podman, is ``project_image.py``'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from deploy.local.commands import LocalToolError, run_command
from deploy.local.controlplane import cache_dir

PAUSE_IMAGE = "localhost/pause:3.10"
PAUSE_SOURCE = Path(__file__).parent / "pause" / "pause.c"
GCC_FLAGS = ("-static", "-Os", "-s")
TEST_IMAGE = "localhost/pyabouts-test:1"
BUSYBOX = Path("/bin/busybox")
#: Part of every cache key: bump it when the archive layout below changes.
ARCHIVE_FORMAT = "docker-archive-1"


def images_dir() -> Path:
    return cache_dir() / "images"


def _tar_bytes(
    files: dict[str, tuple[bytes, int]],
    links: dict[str, str] | None = None,
    dirs: dict[str, int] | None = None,
) -> bytes:
    """A tar of ``name -> (content, mode)`` files, ``name -> target`` symbolic links and
    ``name -> mode`` directories, owned by root, dated 0."""
    entries: list[tarfile.TarInfo] = []
    for name, mode in (dirs or {}).items():
        info = tarfile.TarInfo(name)
        info.type, info.mode = tarfile.DIRTYPE, mode
        entries.append(info)
    for name, target in (links or {}).items():
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        entries.append(info)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info in sorted(entries, key=lambda entry: entry.name):
            info.mtime = 0
            tar.addfile(info)
        for name, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), mode, 0
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def docker_archive(
    tag: str,
    files: dict[str, tuple[bytes, int]],
    entrypoint: list[str],
    links: dict[str, str] | None = None,
    dirs: dict[str, int] | None = None,
) -> bytes:
    """A one-layer image holding ``files`` (and ``links``, ``dirs``), as a docker archive
    tagged ``tag``."""
    layer = _tar_bytes(files, links, dirs)
    layer_id = hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_id}"]},
        },
        sort_keys=True,
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": [f"{layer_id}/layer.tar"]}]
    return _tar_bytes(
        {
            f"{layer_id}/layer.tar": (layer, 0o644),
            config_name: (config, 0o644),
            "manifest.json": (json.dumps(manifest).encode(), 0o644),
        }
    )


def cached_archive(name: str, inputs: Sequence[bytes], make: Callable[[], bytes]) -> Path:
    """``images_dir()/<name>-<hash of inputs>.tar``, written by ``make`` unless it is there."""
    key = hashlib.sha256(b"\0".join([*inputs, ARCHIVE_FORMAT.encode()])).hexdigest()[:16]
    archive = images_dir() / f"{name}-{key}.tar"
    if archive.is_file():
        return archive
    data = make()
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(f"{archive.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    partial.replace(archive)
    for earlier in archive.parent.glob(f"{name}-*.tar"):  # of no use any more
        if earlier != archive:
            earlier.unlink(missing_ok=True)
    return archive


def pause_archive() -> Path:
    """The pause image's archive, built with gcc unless one for this source is cached."""

    def make() -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            binary = Path(tmp) / "pause"
            run_command(["gcc", *GCC_FLAGS, "-o", str(binary), str(PAUSE_SOURCE)])
            return docker_archive(PAUSE_IMAGE, {"pause": (binary.read_bytes(), 0o755)}, ["/pause"])

    return cached_archive(
        "pause-3.10", [PAUSE_SOURCE.read_bytes(), " ".join(GCC_FLAGS).encode()], make
    )


def busybox_archive() -> Path:
    """The test image's archive: the host's busybox-static and a link for each applet."""
    busybox = BUSYBOX.read_bytes()

    def make() -> bytes:
        applets = run_command([str(BUSYBOX), "--list-full"]).split()
        links = {applet: "/bin/busybox" for applet in applets if applet != "bin/busybox"}
        dirs = {d: 0o755 for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc")}
        return docker_archive(
            TEST_IMAGE,
            {"bin/busybox": (busybox, 0o755)},
            # `kubectl run --image ... -- sleep 3600` runs `busybox sleep 3600`.
            ["/bin/busybox"],
            links=links,
            dirs={**dirs, "tmp": 0o1777},
        )

    return cached_archive("pyabouts-test-1", [busybox], make)


def _archive_image(archive: Path) -> tuple[str, str]:
    """(first tag, config digest) of a docker archive, from its manifest.json."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("manifest.json")
        if member is None:
            raise LocalToolError(f"{archive} has no manifest.json")
        manifest = json.load(member)[0]
    return manifest["RepoTags"][0], "sha256:" + manifest["Config"].removesuffix(".json")


def _containerd_config(ctr: list[str], tag: str) -> str | None:
    """The config digest of the image containerd holds under ``tag``, or None."""
    listed = run_command([*ctr, "images", "ls", f"name=={tag}"]).splitlines()[1:]
    if not listed:
        return None
    manifest = json.loads(run_command([*ctr, "content", "get", listed[0].split()[2]]))
    return str(manifest["config"]["digest"])


def import_image(archive: Path, containerd_socket: Path) -> None:
    """Load an archive into containerd's ``k8s.io`` namespace, where the kubelet's images are,
    unless the image is there already (the same config under the same tag)."""
    ctr = ["ctr", "--address", str(containerd_socket), "-n", "k8s.io"]
    tag, config = _archive_image(archive)
    if _containerd_config(ctr, tag) != config:
        # Not unpacked: the kubelet's runtime unpacks an image when a container first uses it,
        # so a cluster whose pods never use the project's image (250 MB) does not pay for
        # unpacking it (10 s) at every start, nor for removing it at every down.
        run_command([*ctr, "images", "import", "--no-unpack", str(archive)], timeout=300)
