"""A throwaway certificate authority with openssl, for the local etcd and kube-apiserver."""

from __future__ import annotations

from pathlib import Path

from deploy.local.commands import run_command

_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
SERVER_USAGE = (
    "keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n"
)
CLIENT_USAGE = (
    "keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = clientAuth\n"
)


def make_ca(directory: Path, common_name: str, days: int) -> None:
    """ca.key and ca.crt in `directory`."""
    run_command(
        [
            *("openssl", "req", "-x509", *_EC_KEY, "-keyout", "ca.key", "-out", "ca.crt"),
            *("-days", str(days), "-subj", f"/CN={common_name}"),
            *("-addext", "basicConstraints=critical,CA:TRUE"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
        ],
        cwd=directory,
    )


def issue_certificate(directory: Path, name: str, subject: str, extensions: str, days: int) -> None:
    """<name>.key and <name>.crt, signed by the CA in `directory`, with openssl `extensions`."""
    (directory / f"{name}.ext").write_text(extensions)
    run_command(
        [
            *("openssl", "req", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr"),
            *("-subj", subject),
        ],
        cwd=directory,
    )
    run_command(
        [
            *("openssl", "x509", "-req", "-in", f"{name}.csr", "-out", f"{name}.crt"),
            *("-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", str(days)),
            *("-extfile", f"{name}.ext"),
        ],
        cwd=directory,
    )
