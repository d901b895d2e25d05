"""TLS certificates for the SuperLink and authentication keys for SuperNodes (the `cryptography` package).

    python -m deploy.certs ca     --out DIR                         # DIR/ca.crt, DIR/ca.key
    python -m deploy.certs server --out DIR --host 10.0.0.1 [--host superlink.example.org ...]
                                                                    # DIR/server.pem, DIR/server.key (signed by DIR/ca.*)
    python -m deploy.certs node   --out DIR --name node-0           # DIR/node-0 (private), DIR/node-0.pub

* The SuperLink serves the Fleet, Control and Runtime APIs on one HTTPS port with `server.pem`/`server.key`;
  SuperNodes, the `flwr` CLI and the SuperLink's own ServerApp process verify it against `ca.crt`. The server
  certificate must therefore name every address it is reached by: the public address the SuperNodes dial and
  127.0.0.1/localhost (the ServerApp process dials the SuperLink on loopback). `server` always adds those two.
* A node key pair is ECDSA P-384 in OpenSSH format (what `flower-supernode --auth-supernode-private-key` and
  `flwr supernode register` read; the same as `ssh-keygen -t ecdsa -b 384 -N ""`). The private key stays on its
  machine; only the `.pub` file travels to whoever registers the node.
* Keys are written with mode 0600; existing files are never overwritten (an error names the file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1()  # P-384: a NIST curve, as SuperNode authentication requires
LOOPBACK = ("127.0.0.1", "localhost")


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite it (delete it or choose another --out)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmeta"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(out: str | Path, days: int = 365) -> tuple[Path, Path]:
    """A self-signed certificate authority: `out/ca.crt`, `out/ca.key`."""
    out = Path(out)
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("fedmeta CA")).issuer_name(_name("fedmeta CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    crt = _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    return crt, _write(out / "ca.key", _pem_key(key), private=True)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys([*hosts, *LOOPBACK]):  # ordered, no duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_server_cert(out: str | Path, hosts: list[str], days: int = 365) -> tuple[Path, Path]:
    """`out/server.pem` + `out/server.key`, signed by `out/ca.crt`/`out/ca.key`, valid for `hosts` + loopback."""
    out = Path(out)
    ca_crt, ca_key = out / "ca.crt", out / "ca.key"
    for p in (ca_crt, ca_key):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; run `python -m deploy.certs ca --out {out}` first")
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else LOOPBACK[0]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(signer, hashes.SHA384()))
    pem = _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    return pem, _write(out / "server.key", _pem_key(key), private=True)


def make_node_keys(out: str | Path, name: str) -> tuple[Path, Path]:
    """`out/<name>` (OpenSSH private key, 0600) and `out/<name>.pub` (OpenSSH public key)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad node key name {name!r}: use a plain file name such as 'node-0'")
    out = Path(out)
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    priv = _write(out / name, private, private=True)
    return priv, _write(out / f"{name}.pub", public + f" fedmeta-{name}\n".encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.certs", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("ca", help="create ca.crt/ca.key")
    s = sub.add_parser("server", help="create server.pem/server.key signed by the CA in --out")
    s.add_argument("--host", action="append", default=[],
                   help="an IP address or DNS name SuperNodes use to reach the SuperLink (repeatable)")
    n = sub.add_parser("node", help="create a SuperNode authentication key pair")
    n.add_argument("--name", required=True, help="file name of the key pair, e.g. node-0")
    for q in (c, s, n):
        q.add_argument("--out", required=True, help="output directory")
        q.add_argument("--days", type=int, default=365, help="certificate validity (ca, server)")
    args = p.parse_args(argv)
    try:
        if args.command == "ca":
            paths = make_ca(args.out, args.days)
        elif args.command == "server":
            paths = make_server_cert(args.out, args.host, args.days)
        else:
            paths = make_node_keys(args.out, args.name)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"deploy.certs: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
