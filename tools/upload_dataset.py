"""upload_dataset: register a dataset from inline content or a path in a data root, validated on the
way in. Bad bytes store nothing; the answer lists every problem with its line."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from server.admission import datasets
from server.context import ServiceContext
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolRequest
from tools.validate_dataset import ValidationView, validation_view


class UploadDatasetRequest(ToolRequest):
    filename: str | None = Field(None, description="With content: its file name; the suffix picks the type "
                                 "(.jsonl, .csv, .parquet, .txt).")
    content: str | None = Field(None, description="The file's content: utf-8 text, or base64 with encoding base64.")
    encoding: Literal["utf-8", "base64"] = Field("utf-8", description="How content is written.")
    path: str | None = Field(None, description="Instead of content: an absolute path inside a data root.")
    name: str | None = Field(None, max_length=200, description="A name for it; default the file name.")

    @model_validator(mode="after")
    def _one_source(self) -> UploadDatasetRequest:
        if (self.content is None) == (self.path is None):
            raise ValueError("give exactly one of content (with filename) or path")
        if self.content is not None and not self.filename:
            raise ValueError("filename is required with content (its suffix picks the file type)")
        return self


def upload_dataset(ctx: ServiceContext, agent: Agent, request: UploadDatasetRequest) -> ValidationView:
    if request.path is not None:
        registered = datasets.register_path(ctx.engine, ctx.settings, agent.id, request.path, request.name)
    else:
        assert request.content is not None and request.filename is not None
        registered = datasets.upload(ctx.engine, ctx.settings, agent.id, request.filename, request.content,
                                     request.encoding, request.name)
    return validation_view(registered.dataset, registered.report, limit=20)


def _from_file(given: dict[str, Any]) -> dict[str, Any]:
    """`weightsmith datasets upload FILE`: the file's bytes as content (or, with --by-path, its path)."""
    file = Path(given.pop("file")).expanduser()
    if given.pop("by_path", False):
        return {**given, "path": str(file.resolve())}
    raw = file.read_bytes()
    if file.suffix == ".parquet":
        return {**given, "filename": file.name, "content": base64.b64encode(raw).decode("ascii"),
                "encoding": "base64"}
    return {**given, "filename": file.name, "content": raw.decode("utf-8")}


TOOL = Tool(
    name="upload_dataset", request=UploadDatasetRequest, result=ValidationView, function=upload_dataset,
    access="idempotent_write",
    description="Register a dataset (JSONL, CSV, Parquet or text) from content or a path in a data root. "
                "Records: {text}, {prompt, completion}, {messages: [{role, content}]}, {prompt, chosen, rejected} "
                "or {prompt}. Same bytes give the same dataset. Returns ok and every problem with its line; bad "
                "data stores nothing.",
    route=Route("POST", "/datasets"),
    command=Command(("datasets", "upload"), args=("file",), inputs={"file": "The file to upload.",
                                                     "by_path": "Register FILE by its path (inside a data root)."},
                    prepare=_from_file))
