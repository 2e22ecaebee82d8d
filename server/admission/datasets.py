"""Dataset registration: immutable, content-addressed snapshots, validated on the way in.

A dataset is the bytes it had when registered: they are copied to HOME/datasets/<sha256>/ and
never touched again, so a later edit of the source cannot change what a past job trained on.
Registering the same bytes twice returns the dataset already there. Bytes that fail validation are
not stored at all: the caller gets the report, with every problem and its line, and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlmodel import Session, select

from server.errors import InvalidRequest
from server.settings import Settings
from server.store.db import owned, write_transaction
from server.store.tables import Dataset
from training_core import data


def resolve_in_roots(settings: Settings, raw: str, param: str) -> Path:
    """The real path of `raw` if it lies inside a configured data root; refuse anything else.

    Symlinks and `..` are resolved before the check, so neither can step outside a root.
    """
    if not settings.data_roots:
        raise InvalidRequest("no data roots are configured, so nothing can be registered by path; "
                             "upload the content instead, or set WEIGHTSMITH_DATA_ROOTS", param=param)
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise InvalidRequest(f"{raw!r} is not an absolute path", param=param)
    real = path.resolve()
    roots = [root.expanduser().resolve() for root in settings.data_roots]
    if not any(real == root or real.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise InvalidRequest(f"{raw!r} is outside the configured data roots ({allowed})", param=param)
    if not real.exists():
        raise InvalidRequest(f"{raw!r} does not exist", param=param)
    return real


@dataclass(frozen=True)
class Registered:
    """A registration's outcome: the dataset (None when its bytes failed validation) and the report."""

    dataset: Dataset | None
    report: data.DatasetReport


def register_path(engine: Engine, settings: Settings, agent_id: str, path: str, name: str | None) -> Registered:
    source = resolve_in_roots(settings, path, "path")
    if not source.is_file():
        raise InvalidRequest(f"{path!r} is not a file", param="path")
    _check_file_type(source.name, "path")
    with _staged(_staging(settings), source.name) as staged, source.open("rb") as src:
        shutil.copyfileobj(src, staged)
    return _register(engine, settings.datasets_dir, settings.max_record_bytes, agent_id, Path(staged.name),
                     source.name, name or source.name, str(source))


def upload(engine: Engine, settings: Settings, agent_id: str, filename: str, content: str,
           encoding: str, name: str | None) -> Registered:
    """Register inline content: `encoding` is `utf-8` (text as given) or `base64` (Parquet, say)."""
    _check_file_type(filename, "filename")
    if encoding == "base64":
        try:
            payload = base64.b64decode(content, validate=True)
        except binascii.Error as err:
            raise InvalidRequest(f"content is not valid base64: {err}", param="content") from err
    else:
        payload = content.encode("utf-8")
    if len(payload) > settings.max_upload_bytes:
        raise InvalidRequest(f"upload is {len(payload):,} bytes; the cap is {settings.max_upload_bytes:,}: "
                             "register a file inside a data root instead", param="content")
    with _staged(_staging(settings), filename) as staged:
        staged.write(payload)
    return _register(engine, settings.datasets_dir, settings.max_record_bytes, agent_id, Path(staged.name),
                     Path(filename).name, name or filename, "upload")


def register_generated(engine: Engine, datasets_dir: Path, max_record_bytes: int, agent_id: str, produced: Path,
                       name: str, source: str, lineage: dict[str, Any]) -> Registered:
    """Register a file a job produced (a synth job's dataset) the way uploads are, with its lineage.

    Takes the home's datasets folder rather than the settings: job handlers run in the executor,
    which records the folder in the job when it is admitted.
    """
    staging = datasets_dir / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    with _staged(staging, produced.name) as staged, produced.open("rb") as src:
        shutil.copyfileobj(src, staged)
    return _register(engine, datasets_dir, max_record_bytes, agent_id, Path(staged.name), produced.name, name,
                     source, lineage)


def get(engine: Engine, agent_id: str, dataset_id: str) -> Dataset:
    with Session(engine) as session:
        return owned(session, Dataset, dataset_id, agent_id, "dataset_id")


def _register(engine: Engine, datasets_dir: Path, max_record_bytes: int, agent_id: str, staged: Path, filename: str,
              name: str, source: str, lineage: dict[str, Any] | None = None) -> Registered:
    report = data.validate_file(staged, max_record_bytes=max_record_bytes)
    if not report.ok:
        staged.unlink()
        return Registered(None, report)
    digest = sha256_file(staged)
    snapshot = datasets_dir / digest / filename
    if snapshot.exists():
        staged.unlink()
    else:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, snapshot)
        snapshot.chmod(0o444)
    dataset = Dataset(
        agent_id=agent_id, name=name, content_hash=digest, path=str(snapshot), source=source,
        file_type=report.file_type, format=report.format, records=report.records,
        bytes=snapshot.stat().st_size, valid=report.ok, report=dataclasses.asdict(report), lineage=lineage)
    with write_transaction(engine) as session:  # under the write lock: no concurrent twin can slip in
        existing = session.exec(select(Dataset).where(
            Dataset.agent_id == agent_id, Dataset.content_hash == digest)).first()
        if existing is not None:
            return Registered(existing, report)
        session.add(dataset)
    return Registered(dataset, report)


def _staged(folder: Path, filename: str) -> Any:
    # The suffix tells the validator the file's type (.jsonl, .csv, .parquet, .txt).
    return tempfile.NamedTemporaryFile(dir=folder, delete=False, suffix=Path(filename).suffix)


def _check_file_type(filename: str, param: str) -> None:
    try:
        data.detect_file_type(Path(filename))
    except ValueError as err:
        raise InvalidRequest(str(err), param=param) from err


def _staging(settings: Settings) -> Path:
    staging = settings.datasets_dir / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
