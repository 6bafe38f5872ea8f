"""Certificates made at test time (trustme): a CA and the server/client pairs signed by it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class CertFiles:
    """One certificate and its key on disk, with the CA that signed it."""

    ca: str
    cert: str
    key: str


class TestCA:
    """A CA in ``folder``; ``issue`` writes a leaf certificate for some names."""

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, folder: Path, name: str = "ca") -> None:
        self.folder = folder
        self._ca = trustme.CA()
        self.ca_file = str(folder / f"{name}.pem")
        self._ca.cert_pem.write_to_path(self.ca_file)

    def issue(self, name: str, *identities: str) -> CertFiles:
        """A certificate for ``identities`` (host names, IPs; the first is its common name)."""
        leaf = self._ca.issue_cert(*(identities or (name,)))
        cert, key = self.folder / f"{name}.crt", self.folder / f"{name}.key"
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(str(cert), append=cert.exists())
        leaf.private_key_pem.write_to_path(str(key))
        return CertFiles(self.ca_file, str(cert), str(key))
