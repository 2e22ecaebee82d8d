"""The base of every request model: refuses unknown fields and non-finite numbers, and its JSON
schema carries no restated titles (the tool list must fit in an agent's context)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


def drop_property_titles(schema: dict[str, Any]) -> None:
    # Pydantic titles every property with its own name, restated: pure noise in a model's context.
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=drop_property_titles)
