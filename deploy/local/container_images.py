"""Container images built here (no registry is reachable), cached, and imported into containerd.

An image is written as a docker archive (what ``docker save`` makes and ``ctr images import``
reads): one layer, a config and a manifest, every file's time and owner fixed so that the same
input gives the same bytes. Archives are cached in ``~/.cache/pyabouts/images/``, named by a
hash of their input, so an image is rebuilt only when its input changes.

The pause image (``localhost/pause:3.10``, containerd's ``sandbox_image``) is ``pause/pause.c``
compiled with ``gcc -static``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from pathlib import Path

from deploy.local.commands import run_command
from deploy.local.controlplane import cache_dir

PAUSE_IMAGE = "localhost/pause:3.10"
PAUSE_SOURCE = Path(__file__).parent / "pause" / "pause.c"
GCC_FLAGS = ("-static", "-Os", "-s")
#: Part of every cache key: bump it when the archive layout below changes.
ARCHIVE_FORMAT = "docker-archive-1"


def images_dir() -> Path:
    return cache_dir() / "images"


def _tar_bytes(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A tar of ``name -> (content, mode)``, owned by root, dated 0."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), mode, 0
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def docker_archive(tag: str, files: dict[str, tuple[bytes, int]], entrypoint: list[str]) -> bytes:
    """A one-layer image holding ``files``, as a docker archive tagged ``tag``."""
    layer = _tar_bytes(files)
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


def pause_archive() -> Path:
    """The pause image's archive, built with gcc unless one for this source is cached."""
    source = PAUSE_SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(GCC_FLAGS).encode(), ARCHIVE_FORMAT.encode()])
    ).hexdigest()[:16]
    archive = images_dir() / f"pause-3.10-{key}.tar"
    if archive.is_file():
        return archive
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "pause"
        run_command(["gcc", *GCC_FLAGS, "-o", str(binary), str(PAUSE_SOURCE)])
        data = docker_archive(PAUSE_IMAGE, {"pause": (binary.read_bytes(), 0o755)}, ["/pause"])
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".tmp")
    partial.write_bytes(data)
    partial.replace(archive)
    return archive


def import_image(archive: Path, containerd_socket: Path) -> None:
    """Load an archive into containerd's ``k8s.io`` namespace, where the kubelet's images are."""
    ctr = ["ctr", "--address", str(containerd_socket), "-n", "k8s.io"]
    run_command([*ctr, "images", "import", str(archive)], timeout=120)
