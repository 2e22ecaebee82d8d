"""Eval suites: declared once per agent (YAML or JSON), validated whole, stored with the hash of
their definition and data; reports are comparable only within one hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlmodel import Session, select

from server.errors import InvalidRequest, problems_of
from server.store.db import owned, write_transaction
from server.store.tables import Dataset, EvalSuite
from training_core import suite

EVAL_FORMATS = ("prompt_completion", "messages")


def create_suite(engine: Engine, agent_id: str, raw: dict[str, Any]) -> EvalSuite:
    """Validate and store a suite; the same definition on the same data returns the stored one."""
    try:
        definition = suite.SuiteDefinition.model_validate(raw)
    except ValidationError as err:
        found = problems_of(err, model=suite.SuiteDefinition)  # in our words, not pydantic's
        listed = "; ".join(f"{where}: {message}" if where else message for where, message in found)
        raise InvalidRequest(f"the suite has {len(found)} problem(s): {listed}", param=found[0][0] or None,
                             details={"problems": [{"param": w, "message": m} for w, m in found]}) from None
    with Session(engine) as session:
        dataset = owned(session, Dataset, definition.dataset, agent_id, "dataset")
    if not dataset.valid or dataset.format not in EVAL_FORMATS:
        why = "failed validation" if not dataset.valid else f"holds {dataset.format} records"
        raise InvalidRequest(f"dataset {dataset.id} {why}; eval items need valid prompt_completion or "
                             "messages records (the completion or last assistant turn is the reference)",
                             param="dataset")
    canonical = definition.model_dump(mode="json")
    content_hash = hashlib.sha256(json.dumps([canonical, dataset.content_hash], sort_keys=True)
                                  .encode("utf-8")).hexdigest()
    with write_transaction(engine) as session:
        existing = session.exec(select(EvalSuite).where(EvalSuite.agent_id == agent_id,
                                                        EvalSuite.content_hash == content_hash)).first()
        if existing is not None:
            return existing
        row = EvalSuite(agent_id=agent_id, name=definition.name, definition=canonical, dataset_id=dataset.id,
                        content_hash=content_hash, items=min(dataset.records, definition.max_items or dataset.records))
        session.add(row)
        return row


def owned_suite(session: Session, agent_id: str, suite_id: str, param: str = "suite_id") -> EvalSuite:
    return owned(session, EvalSuite, suite_id, agent_id, param)


def parse_definition(text: str) -> dict[str, Any]:
    """JSON or YAML text (JSON is YAML, but its own parser gives clearer errors for it)."""
    try:
        raw = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise InvalidRequest(f"definition is not valid JSON: line {err.lineno} column {err.colno}: {err.msg}",
                             param="definition") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # only some YAML errors carry a position
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        raise InvalidRequest(f"definition is not valid YAML: {where}{getattr(err, 'problem', err)}",
                             param="definition") from err
    if not isinstance(raw, dict):
        raise InvalidRequest("definition must be a mapping with name, dataset and kpis", param="definition")
    return raw
