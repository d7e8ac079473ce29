"""The Debian mirror the base image is bootstrapped from: the host's own, read from deb822."""

from pathlib import Path

from deploy.local.project_image import DEFAULT_MIRROR, debian_mirror

SOURCES = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian http://other.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_the_first_uri_of_the_bookworm_stanza(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(SOURCES)
    assert debian_mirror(sources) == "http://mirror.example/debian"


def test_deb_debian_org_without_a_bookworm_stanza(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(SOURCES.split("\n\n")[1])
    assert debian_mirror(sources) == DEFAULT_MIRROR
    assert debian_mirror(tmp_path / "missing") == DEFAULT_MIRROR
