"""The audit log: one JSON object per line, for checkpoint loads and for requests.

Every replica appends to the same file; each record is written with one ``write`` on a file opened with
``O_APPEND``, so lines from several processes do not interleave. Prompts and outputs are left out unless the
operator asks for them (``--audit-prompts``): they may hold personal data the log's readers should not see.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AuditLog:
    def __init__(self, path: str | os.PathLike | None, *, prompts: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.prompts = prompts
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def load(self, checkpoint: Path, *, signer: str | None, encrypted: bool, replica: str) -> None:
        """A checkpoint load: which file (and its sha256), who signed it, which process loaded it where."""
        if self.path is None:
            return
        self.write(
            "load",
            path=str(checkpoint.resolve()),
            sha256=file_sha256(checkpoint),
            signer=signer,
            encrypted=encrypted,
            user=getpass.getuser(),
            host=socket.gethostname(),
            pid=os.getpid(),
            replica=replica,
        )

    def request(self, *, prompt: str | None = None, output: str | None = None, **fields: Any) -> None:
        if self.prompts:
            fields.update(prompt=prompt, output=output)
        self.write("request", **fields)
