"""Images built with podman: the Debian base and the project's image, each rebuilt only when
its inputs change.

``localhost/debian:bookworm`` is ``debootstrap --variant=minbase`` from the host's Debian
mirror, without apt's caches and lists, made an image with ``podman import``.
``localhost/pyabouts:<version>`` is the repo's ``Containerfile`` (multi-stage, on that base).
Each image carries a label holding a hash of its inputs; an image whose label matches is not
built again. The project image is also tagged ``<version>-<hash>`` so that a changed build
gets a new name (containerd and kubelet tell images apart by name).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from deploy.local.commands import LocalToolError, run_command
from deploy.local.container_images import images_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/debian:bookworm"
PROJECT_REPOSITORY = "localhost/pyabouts"
DEPS_IMAGE = "localhost/pyabouts-build:deps"
INPUTS_LABEL = "io.pyabouts.inputs"
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: What the project build reads from the repo: the Containerfile, its ignore file, and what it
#: COPYs (the .containerignore keeps everything else out of the context).
BUILD_INPUTS = (
    "Containerfile",
    ".containerignore",
    "pyproject.toml",
    "constraints.txt",
    "README.md",
    "ipam",
    "plugin",
    "controller",
    "serving",
)
#: pip in the build trusts what the host trusts (the package mirror's CA).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
#: What dpkg leaves out of the base, then and in every later install (what Debian's own
#: "slim" images leave out): documentation but copyrights, manuals, translations.
DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""
#: Part of the base's key: bump it when the way the base is made changes.
BASE_RECIPE = f"debootstrap minbase, apt caches and lists removed, v2\n{DPKG_EXCLUDES}"
BUILD_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class BuiltImage:
    """An image in podman's store: its name, its ID, and whether it was there already."""

    name: str
    image_id: str
    cached: bool


def debian_mirror(sources: Path = DEBIAN_SOURCES) -> str:
    """The first ``URIs`` of the host's bookworm stanza (deb822), or deb.debian.org."""
    if not sources.is_file():
        return DEFAULT_MIRROR
    for stanza in sources.read_text().split("\n\n"):
        fields = dict(
            line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[0] != "#"
        )
        if "bookworm" in fields.get("Suites", "").split() and fields.get("URIs", "").split():
            return fields["URIs"].split()[0]
    return DEFAULT_MIRROR


def project_version() -> str:
    with (REPO_ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def _inspect(name: str) -> tuple[str, str] | None:
    """(ID, inputs label) of an image in podman's store, or None if there is none."""
    proc = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}} {{json .Labels}}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    image_id, labels = proc.stdout.strip().split(" ", 1)
    return image_id, str((json.loads(labels) or {}).get(INPUTS_LABEL, ""))


def _unmount_below(root: Path) -> None:
    """debootstrap mounts /proc and /sys in the target; a failed run may leave them there, and
    removing the tree must not walk into them."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted(mounts, reverse=True):
        if mount.startswith(f"{root}/"):
            subprocess.run(["umount", "-l", mount], check=False)


def _slim(rootfs: Path) -> None:
    """Remove apt's caches and lists and what DPKG_EXCLUDES names, and keep dpkg from
    installing the latter again."""
    (rootfs / "etc/dpkg/dpkg.cfg.d/pyabouts-slim").write_text(DPKG_EXCLUDES)
    doomed = [
        *(rootfs / "var/cache/apt").rglob("*.bin"),
        *(rootfs / "var/cache/apt").rglob("*.deb"),
    ]
    doomed += (rootfs / "var/lib/apt/lists").glob("*")
    for top in ("doc", "man", "info", "locale", "lintian"):
        doomed += (rootfs / "usr/share" / top).rglob("*")
    for path in doomed:
        if (path.is_file() or path.is_symlink()) and not (
            path.name == "copyright" and path.parent.parent.name == "doc"
        ):
            path.unlink()


def debian_base() -> BuiltImage:
    """``localhost/debian:bookworm``, from debootstrap unless one of the same recipe exists."""
    mirror = debian_mirror()
    key = hashlib.sha256(f"{BASE_RECIPE}\0{mirror}".encode()).hexdigest()[:16]
    found = _inspect(BASE_IMAGE)
    if found is not None and found[1] == key:
        return BuiltImage(BASE_IMAGE, found[0], cached=True)
    images_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=images_dir(), prefix="debian-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        try:
            run_command(
                ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror],
                timeout=BUILD_TIMEOUT_S,
            )
        finally:
            _unmount_below(rootfs)
        _slim(rootfs)
        archive = Path(tmp) / "rootfs.tar"
        run_command(["tar", "-C", str(rootfs), "-cf", str(archive), "."], timeout=300)
        shutil.rmtree(rootfs)
        run_command(
            [
                *("podman", "import", "--change", f"LABEL {INPUTS_LABEL}={key}"),
                *("--change", 'CMD ["/bin/bash"]', str(archive), BASE_IMAGE),
            ],
            timeout=300,
        )
    found = _inspect(BASE_IMAGE)
    if found is None:
        raise LocalToolError(f"podman import did not leave {BASE_IMAGE}")
    return BuiltImage(BASE_IMAGE, found[0], cached=False)


def _build_inputs_hash(base_id: str) -> str:
    """A hash over the base image's ID and every file the build reads (by path and content)."""
    digest = hashlib.sha256(base_id.encode())
    for top in BUILD_INPUTS:
        path = REPO_ROOT / top
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for file in files:
            if not file.is_file() or "__pycache__" in file.parts or file.suffix == ".pyc":
                continue
            digest.update(f"\0{file.relative_to(REPO_ROOT)}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def project_image() -> BuiltImage:
    """``localhost/pyabouts:<version>``, built unless the image there was built from the same
    inputs (Containerfile, sources, base)."""
    base = debian_base()
    key = _build_inputs_hash(base.image_id)
    version = project_version()
    name = f"{PROJECT_REPOSITORY}:{version}"
    found = _inspect(name)
    if found is not None and found[1] == key:
        return BuiltImage(name, found[0], cached=True)
    build = [
        *("podman", "build", "--quiet", "--layers", "--build-arg", f"BASE={BASE_IMAGE}"),
        *("--secret", f"id=ca-bundle,src={HOST_CA_BUNDLE}", "--file", "Containerfile"),
    ]
    # The first stage, tagged: the prune below keeps it (and the wheels it downloaded) for the
    # next build; an earlier one, untagged by this, is pruned.
    run_command(
        [*build, "--target", "deps", "--label", f"{INPUTS_LABEL}=deps", "--tag", DEPS_IMAGE, "."],
        cwd=REPO_ROOT,
        timeout=BUILD_TIMEOUT_S,
    )
    run_command(
        [*build, "--label", f"{INPUTS_LABEL}={key}", "--tag", name, "--tag", f"{name}-{key}", "."],
        cwd=REPO_ROOT,
        timeout=BUILD_TIMEOUT_S,
    )
    found = _inspect(name)
    if found is None:
        raise LocalToolError(f"podman build did not leave {name}")
    # Earlier builds' content tags of this version name images nothing uses any more.
    tags = run_command(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", PROJECT_REPOSITORY]
    )
    for stale in tags.split():
        if stale.startswith(f"{name}-") and stale != f"{name}-{key}":
            subprocess.run(["podman", "rmi", stale], capture_output=True, check=False)
    # Every build leaves its intermediate images (the label is on them too) and the last
    # build's; untagged ones nothing is built on any more would pile up, 300 MB a build.
    run_command(["podman", "image", "prune", "--force", "--filter", f"label={INPUTS_LABEL}"])
    return BuiltImage(name, found[0], cached=False)


def saved_archive(image: BuiltImage) -> Path:
    """The image as a docker archive (for ``ctr images import``), saved once per image ID."""
    repository, tag = image.name.rsplit(":", 1)
    archive = images_dir() / f"{repository.rsplit('/', 1)[-1]}-{tag}-{image.image_id[:12]}.tar"
    if not archive.is_file():
        # A name of its own: two saves at once must not take each other's file away.
        partial = archive.with_name(f"{archive.name}.{os.getpid()}.tmp")
        partial.unlink(missing_ok=True)
        run_command(
            ["podman", "save", "--format", "docker-archive", "-o", str(partial), image.name],
            timeout=300,
        )
        partial.replace(archive)
        # The archives of this name's earlier builds are of no use any more.
        for old in images_dir().glob(f"{repository.rsplit('/', 1)[-1]}-{tag}-*.tar"):
            if old != archive:
                old.unlink()
    return archive
