"""SHA-256 checksums of a checkpoint directory's files: written beside them, verified when present.

A checksum source is either a ``*.sha256`` file (or ``SHA256SUMS``) in ``sha256sum`` format — ``<hex>  <name>``
per line, ``sha256sum -c`` checks it too; a lone ``<hex>`` in ``<name>.sha256`` names that file — or a
``"sha256": {name: hex}`` map in ``model.safetensors.index.json``'s ``metadata``. A directory without any (the
released BAGEL-7B-MoT) is not verified byte for byte: its weights still get the strict key, shape, dtype and
finiteness checks, which a flipped mantissa bit passes.

Absolute imports only: this module is imported from ``checkpoint.py`` wherever that file lives.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_CHUNK = 16 << 20  # bytes per read: memory stays flat for a 14 GB file


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_sha256(path: str) -> str:
    """Write ``<path>.sha256`` (``sha256sum`` format) and return the hex digest."""
    digest = file_sha256(path)
    with open(path + ".sha256", "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    return digest


def expected_sha256(directory: str, index_file: str) -> tuple[dict[str, str], list[str]]:
    """({file name: hex digest} from every checksum source in ``directory``, problems with the sources)."""
    want: dict[str, str] = {}
    problems: list[str] = []
    names = sorted(os.listdir(directory))
    for src in (n for n in names if n.endswith(".sha256") or n == "SHA256SUMS"):
        with open(os.path.join(directory, src), errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        for ln in lines:
            parts = ln.split(None, 1)
            if len(parts) == 1 and src.endswith(".sha256") and len(lines) == 1:
                parts = [parts[0], src[:-len(".sha256")]]
            if len(parts) != 2 or not _HEX.match(parts[0]):
                problems.append(f"{src}: unreadable line {ln[:80]!r}")
                continue
            want[parts[1].lstrip("*").strip()] = parts[0].lower()
    index = os.path.join(directory, index_file)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                sums = (json.load(f).get("metadata") or {}).get("sha256") or {}
        except (ValueError, AttributeError) as e:
            problems.append(f"{index_file}: not a JSON object with metadata ({e})")
            sums = {}
        for name, digest in (sums.items() if isinstance(sums, dict) else ()):
            if not (isinstance(digest, str) and _HEX.match(digest)):
                problems.append(f"{index_file}: metadata.sha256[{name!r}] is not a SHA-256 hex digest")
            elif want.setdefault(name, digest.lower()) != digest.lower():
                problems.append(f"{name}: the checksum files and {index_file} disagree")
    return want, problems


def verify_directory(directory: str, index_file: str) -> tuple[list[str], list[str]]:
    """(files verified, problems): every present file a checksum source names is hashed and compared."""
    want, problems = expected_sha256(directory, index_file)
    verified = []
    for name, digest in sorted(want.items()):
        path = os.path.normpath(os.path.join(directory, name))
        if os.path.dirname(path) != os.path.normpath(directory):
            problems.append(f"{name}: a checksum entry outside the checkpoint directory")
        elif not os.path.isfile(path):
            continue  # the loader names a missing file it needs, in its own words
        elif (got := file_sha256(path)) != digest:
            problems.append(f"{name}: SHA-256 {got[:16]}... != the recorded {digest[:16]}... (the file changed: "
                            "a flipped bit, a partial copy or another file under its name)")
        else:
            verified.append(name)
    return verified, problems
