"""Certificates with openssl: a throwaway certificate authority and what it signs, and the
control plane's set (CA, kube-apiserver serving, admin client, service-account keys)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deploy.local.commands import run_command

_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
SERVER_USAGE = (
    "keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n"
)
CLIENT_USAGE = (
    "keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = clientAuth\n"
)
#: A server that calls itself as a client with its own certificate (etcd's HTTP gateway does).
SERVER_AND_CLIENT_USAGE = (
    "keyUsage = critical, digitalSignature, keyEncipherment\n"
    "extendedKeyUsage = serverAuth, clientAuth\n"
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


CONTROL_PLANE_CERT_DAYS = 365


@dataclass(frozen=True)
class Certificates:
    """Paths of the PEM files the control plane uses (all inside ``<state>/pki``)."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path

    @classmethod
    def in_dir(cls, pki: Path) -> Certificates:
        return cls(
            ca_cert=pki / "ca.crt",
            ca_key=pki / "ca.key",
            serving_cert=pki / "apiserver.crt",
            serving_key=pki / "apiserver.key",
            admin_cert=pki / "admin.crt",
            admin_key=pki / "admin.key",
            sa_key=pki / "sa.key",
            sa_pub=pki / "sa.pub",
        )

    def all_present(self) -> bool:
        return all(Path(p).is_file() for p in vars(self).values())


def make_certificates(pki: Path, serving_ips: tuple[str, ...] = ()) -> Certificates:
    """Create the CA, serving, admin and service-account keys with openssl (reused if present).

    ``serving_ips`` are addresses the apiserver serves on besides 127.0.0.1 (a node's bridge).
    """
    certs = Certificates.in_dir(pki)
    if certs.all_present():
        return certs
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    make_ca(pki, "pyabouts-local-ca", CONTROL_PLANE_CERT_DAYS)
    issue_certificate(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        f"subjectAltName = {''.join(f'IP:{ip}, ' for ip in serving_ips)}"
        "IP:127.0.0.1, IP:10.96.0.1, DNS:localhost, DNS:kubernetes, "
        "DNS:kubernetes.default, DNS:kubernetes.default.svc\n"
        "basicConstraints = critical, CA:FALSE\n" + SERVER_USAGE,
        CONTROL_PLANE_CERT_DAYS,
    )
    issue_certificate(
        pki,
        "admin",
        "/O=system:masters/CN=kubernetes-admin",
        "basicConstraints = critical, CA:FALSE\n" + CLIENT_USAGE,
        CONTROL_PLANE_CERT_DAYS,
    )
    run_command(
        [
            *("openssl", "genpkey", "-algorithm", "RSA"),
            *("-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key"),
        ],
        cwd=pki,
    )
    run_command(["openssl", "pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"], cwd=pki)
    for key in pki.glob("*.key"):
        key.chmod(0o600)
    return certs
