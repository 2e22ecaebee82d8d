"""What an eval job evaluates: a registered model (by id or alias) or a model directory, with what
its report needs of its lineage (the family its KPI drift is judged in, its parent as the default
baseline)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlmodel import Session

from server.admission.datasets import resolve_in_roots
from server.errors import InvalidRequest
from server.settings import Settings
from server.store import aliases
from server.store.tables import Model
from training_core import modelinfo


@dataclass(frozen=True)
class EvalTarget:
    """A model as an eval job loads it, and what the report needs to know of its lineage."""

    ref: str
    """The registered model id, or the local directory."""
    path: str
    base_path: str | None
    """The base a LoRA adapter (at `path`) is loaded onto; None for full weights."""
    parameters: int
    family: str
    model_id: str | None = None
    parent_ref: str | None = None
    dataset_hashes: list[str] = field(default_factory=list)


def resolve_target(session: Session, settings: Settings, agent_id: str, ref: str, param: str) -> EvalTarget:
    """A registered model of the agent's (by id or alias), or a model directory inside a data root."""
    model = aliases.resolve_model(session, agent_id, ref, param)
    if model is not None:
        return target_for_model(session, model)
    directory = resolve_in_roots(settings, ref, param)
    if not (directory / "config.json").is_file():
        raise InvalidRequest(f"{ref!r} is not a Hugging Face model directory (no config.json)", param=param)
    return EvalTarget(ref=str(directory), path=str(directory), base_path=None,
                      parameters=modelinfo.count_parameters(directory), family=str(directory))


def target_for_model(session: Session, model: Model) -> EvalTarget:
    base_dir = model.config.get("spec", {}).get("base_model")
    lora_only = model.adapter == "lora" and not model.merged_path
    parent_ref = model.parent_model_id or base_dir
    return EvalTarget(ref=model.id, model_id=model.id, path=model.merged_path or model.path,
                      base_path=base_dir if lora_only else None, parameters=model.parameters,
                      family=_family(session, model), parent_ref=parent_ref, dataset_hashes=model.dataset_hashes)


def _family(session: Session, model: Model) -> str:
    """The first base model of the lineage: every fine-tune of one base is one family."""
    seen = {model.id}
    while model.parent_model_id and model.parent_model_id not in seen:
        parent = session.get(Model, model.parent_model_id)
        if parent is None:
            break
        seen.add(parent.id)
        model = parent
    return model.config.get("spec", {}).get("base_model") or model.base_model
