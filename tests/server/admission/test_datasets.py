"""Datasets at the service: snapshots, data roots, and malformed files that start nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import Session, func, select

from server.context import ServiceContext
from server.errors import InvalidRequest
from server.store import agents as auth
from server.store.tables import Dataset, Job
from tests.conftest import chat_records, quick_hyperparameters, write_jsonl
from tools.launch_training import LaunchTrainingRequest, launch_training
from tools.upload_dataset import UploadDatasetRequest, upload_dataset

GOOD = json.dumps(chat_records(1)[0])
USER = {"role": "user", "content": "hi"}
# (kind, content, the line the problem is on, the field it names or None)
MALFORMED = [
    ("invalid json", GOOD + "\n{\"messages\": [\n", 2, None),
    ("not an object", GOOD + "\n[1, 2]\n", 2, None),
    ("unknown field", GOOD + "\n" + json.dumps({"text": "a", "colour": "red"}) + "\n", 2, "colour"),
    ("missing completion", json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n",
     2, "completion"),
    ("unknown role", json.dumps({"messages": [USER, {"role": "wizard", "content": "x"}]}) + "\n", 1, "role"),
    ("empty content", json.dumps({"messages": [USER, {"role": "assistant", "content": ""}]}) + "\n", 1, "content"),
    ("no assistant turn", GOOD + "\n" + json.dumps({"messages": [USER]}) + "\n", 2, "messages"),
    ("mixed formats", GOOD + "\n" + json.dumps({"text": "plain"}) + "\n", 2, None),
    ("content not a string", json.dumps({"messages": [USER, {"role": "assistant", "content": 3}]}) + "\n", 1,
     "content"),
    ("messages not a list", json.dumps({"messages": "hello"}) + "\n", 1, "messages"),
    ("empty text", json.dumps({"text": "   "}) + "\n", 1, "text"),
    ("oversized record", GOOD + "\n" + json.dumps({"text": "x" * 2_000_000}) + "\n", 2, None),
]


@pytest.fixture
def agent(service: ServiceContext):  # type: ignore[no-untyped-def]
    return auth.create_agent(service.engine, service.settings, "data-agent")[0]


@pytest.mark.parametrize(("kind", "content", "line", "field"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_dataset_names_its_line_and_stores_nothing(service: ServiceContext, agent, kind: str,
                                                               content: str, line: int, field: str | None) -> None:
    view = upload_dataset(service, agent, UploadDatasetRequest(filename="bad.jsonl", content=content))
    assert not view.ok and view.dataset is None
    assert any(p.line == line and (field is None or p.field == field or field in (p.field or ""))
               for p in view.problems), (kind, view.problems)
    with Session(service.engine) as session:
        assert session.exec(select(func.count()).select_from(Dataset)).one() == 0
        assert session.exec(select(func.count()).select_from(Job)).one() == 0
    assert not any(path.is_file() for path in service.settings.datasets_dir.rglob("*"))


def test_wrong_encoding_is_reported_with_its_line(service: ServiceContext, agent) -> None:
    import base64

    raw = (GOOD + "\n").encode() + json.dumps({"text": "caf\u00e9"}).encode("latin-1").replace(b"\\u00e9", b"\xe9")
    view = upload_dataset(service, agent, UploadDatasetRequest(
        filename="latin.jsonl", content=base64.b64encode(raw).decode(), encoding="base64"))
    assert not view.ok and view.problems[0].line == 2 and "UTF-8" in view.problems[0].message


def test_paths_outside_the_data_roots_are_refused(service: ServiceContext, agent, tmp_path: Path) -> None:
    inside = write_jsonl(tmp_path / "ok.jsonl", chat_records(3))
    escape = f"{tmp_path}/../../etc/passwd"
    outside = tmp_path.parent / "elsewhere.jsonl"
    write_jsonl(outside, chat_records(3))
    link = tmp_path / "link.jsonl"
    link.symlink_to(outside)
    for path in (escape, str(outside), str(link), "/etc/hostname"):
        with pytest.raises(InvalidRequest) as refused:
            upload_dataset(service, agent, UploadDatasetRequest(path=path))
        assert refused.value.param == "path"
    assert upload_dataset(service, agent, UploadDatasetRequest(path=str(inside))).ok


def test_a_registered_dataset_is_a_snapshot_that_later_edits_cannot_change(service: ServiceContext, agent,
                                                                            tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "chat.jsonl", chat_records(6))
    first = upload_dataset(service, agent, UploadDatasetRequest(path=str(source))).dataset
    original = source.read_bytes()
    write_jsonl(source, chat_records(9))
    again = upload_dataset(service, agent, UploadDatasetRequest(path=str(source))).dataset
    assert again.id != first.id and again.content_hash != first.content_hash
    from server.admission import datasets

    snapshot = Path(datasets.get(service.engine, agent.id, first.id).path)
    assert snapshot.read_bytes() == original and first.records == 6
    same = upload_dataset(service, agent, UploadDatasetRequest(filename="chat.jsonl", content=original.decode()))
    assert same.dataset.id == first.id


def test_upload_over_the_size_cap_is_refused(service: ServiceContext, agent) -> None:
    service.settings.max_upload_bytes = 1000
    with pytest.raises(InvalidRequest) as refused:
        upload_dataset(service, agent, UploadDatasetRequest(filename="big.txt", content="x" * 2000))
    assert refused.value.param == "content"


def test_unknown_base_model_and_hyperparameters_name_the_field(service: ServiceContext, agent,
                                                               tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "chat.jsonl", chat_records(6))
    ds = upload_dataset(service, agent, UploadDatasetRequest(path=str(source))).dataset.id
    with pytest.raises(InvalidRequest) as refused:
        launch_training(service, agent, LaunchTrainingRequest(base_model=str(tmp_path), datasets=[ds]))
    assert refused.value.param == "base_model"
    with pytest.raises(InvalidRequest) as too_long:
        launch_training(service, agent, LaunchTrainingRequest.model_validate({
            "base_model": str(service.settings.data_roots[1] / "tiny"), "datasets": [ds],
            "hyperparameters": quick_hyperparameters(max_seq_length=1_000_000 // 10)}))
    assert too_long.value.param == "hyperparameters.max_seq_length"
