"""The CLI's tool commands, registered from `tools.TOOLS`: one command per tool (`Tool.command`), its
options read from the tool's request model, so nothing here re-declares a tool's parameters.

A field becomes an option (`--datasets ID`, repeatable for a list; `--dry-run` for a flag); the
fields of a nested settings object become options of their own (`--max-steps` for
`hyperparameters.max_steps`, `--lora-r`, `--limits-max-seconds`); an object or a list of objects is
given as JSON (`--options '{"preset": "tiny"}'`). Every command also takes `--config FILE` (the
request as JSON or YAML, flags on top), `--json` (the raw result) and, where it starts a job,
`--watch` (follow it to the end). Results print as the tool's human summary.
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from server.cli import watch
from server.cli.client import ClientError, call
from tools import TOOLS, Tool
from tools.base import ToolResult

GROUP_HELP = {"jobs": "Follow and control jobs.", "datasets": "Upload, list and inspect datasets.",
              "models": "Registered models and their lineage.", "eval": "Eval suites, eval jobs, reports, drift.",
              "schedules": "Schedules, their runs and next fire times.", "aliases": "Promote models and roll back."}
UNPREFIXED = ("hyperparameters",)
"""Nested settings whose fields are options under their own names (`--max-steps`)."""


def add_tool_commands(app: typer.Typer, groups: dict[str, typer.Typer]) -> None:
    """Register a command per tool on `app`, in the sub-apps `groups` (made as needed)."""
    for tool in TOOLS:
        if tool.command is None:
            continue
        *path, name = tool.command.path
        parent = app
        for depth, group in enumerate(path):
            key = ".".join(path[: depth + 1])
            if key not in groups:
                groups[key] = typer.Typer(help=GROUP_HELP.get(group), no_args_is_help=True)
                parent.add_typer(groups[key], name=group)
            parent = groups[key]
        short = tool.description.split(". ")[0].rstrip(".") + "."
        parent.command(name, help=f"{short}  (tool {tool.name})", short_help=_listing_line(short))(_command(tool))


def _listing_line(sentence: str, width: int = 120) -> str:
    """The sentence as a command listing shows it: whole where it fits, else cut at a word with an ellipsis."""
    if len(sentence) <= width:
        return sentence
    return sentence[: width - 1].rsplit(" ", 1)[0].rstrip(",;:(") + "…"


def _command(tool: Tool) -> Callable[..., None]:
    """A function whose signature typer reads: an argument or option per request field."""
    assert tool.command is not None
    spec = tool.command
    params: list[inspect.Parameter] = []
    fields: dict[str, tuple[tuple[str, ...], FieldInfo]] = {}
    """Parameter name -> (where in the request, the field)."""

    def add(name: str, annotation: Any, default: Any) -> None:
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default))

    for arg in spec.args:
        help_text = spec.inputs.get(arg) or (tool.request.model_fields[arg].description if arg in
                                             tool.request.model_fields else None)
        add(arg, str, typer.Argument(..., help=help_text, show_default=False))
    for virtual, help_text in spec.inputs.items():
        if virtual not in spec.args:
            add(virtual, bool, typer.Option(False, _flag(virtual), help=help_text))
    for field_name, field in tool.request.model_fields.items():
        if field_name in spec.args:
            fields[field_name] = ((field_name,), field)
            continue
        nested = _model_type(field)
        members = nested.model_fields.items() if nested is not None else [(field_name, field)]
        for sub_name, sub in members:
            dest = sub_name if nested is None or field_name in UNPREFIXED else f"{field_name}_{sub_name}"
            fields[dest] = ((field_name, sub_name) if nested is not None else (field_name,), sub)
            add(dest, *_option(dest, sub))
    add("config", Path | None, typer.Option(None, "--config", exists=True, dir_okay=False, help=(
        "The request as a JSON or YAML file; options given on top replace its values.")))
    add("as_json", bool, typer.Option(False, "--json", help="Print the result as JSON."))
    if {"job", "study_id"} & set(tool.result.model_fields):  # the fields follow_result reads
        add("watch_job", bool, typer.Option(False, "--watch", help="Follow the job it starts until it ends."))

    def run(**given: Any) -> None:
        as_json, follow, config = given.pop("as_json"), given.pop("watch_job", False), given.pop("config")
        request = _load(config) if config else {}
        inputs = {name: given.pop(name) for name in spec.inputs if name in given}
        for dest, value in given.items():
            if value is None or value == []:
                continue
            path, field = fields[dest]
            target = request
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = _coerce(value, field)
        if spec.prepare is not None:
            request = spec.prepare({**request, **inputs})
        try:
            result = _send(tool, request)
            _print(tool.result, result, as_json)
            if follow:
                watch.follow_result(result, as_json)
        except ClientError as err:
            typer.secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(err.exit_code) from err

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__name__ = tool.name
    return run


def _send(tool: Tool, request: dict[str, Any]) -> Any:
    path = tool.route.path
    for name in tool.path_fields():
        path = path.replace(f"{{{name}}}", str(request.pop(name)))
    if tool.takes_query():
        return call(tool.route.method, f"/v1{path}", params=request)
    return call(tool.route.method, f"/v1{path}", body=request)


def _print(result_type: type[ToolResult], payload: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(payload, indent=2))
    else:
        typer.echo(result_type.model_validate(payload).summary())


def _option(dest: str, field: FieldInfo) -> tuple[Any, Any]:
    """(annotation, typer.Option) for a field given as an option."""
    help_text = field.description
    if _is_bool(field):
        return bool | None, typer.Option(None, f"{_flag(dest)}/--no-{dest.replace('_', '-')}", help=help_text,
                                         show_default=False)
    if _is_str_list(field):
        names = [_flag(dest)] + ([_flag(dest)[:-1]] if dest.endswith("s") and len(dest) > 3 else [])
        return list[str] | None, typer.Option(None, *names, help=f"{help_text} (repeat for several)",
                                              show_default=False)
    return str | None, typer.Option(None, _flag(dest), help=help_text, show_default=False)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _args(field: FieldInfo) -> tuple[Any, ...]:
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(annotation) if a is not type(None))
    return (annotation,)


def _model_type(field: FieldInfo) -> type[BaseModel] | None:
    options = _args(field)
    if len(options) == 1 and isinstance(options[0], type) and issubclass(options[0], BaseModel):
        return options[0]
    return None


def _is_bool(field: FieldInfo) -> bool:
    return _args(field) == (bool,)


def _is_str_list(field: FieldInfo) -> bool:
    options = _args(field)
    return len(options) == 1 and typing.get_origin(options[0]) is list and typing.get_args(options[0])[0] is str


def _coerce(value: Any, field: FieldInfo) -> Any:
    """A command-line string as the field takes it: text stays text; numbers, flags, `auto` and JSON
    objects are read as such (the service validates the result and names what is wrong)."""
    if isinstance(value, (bool, list)):
        return value
    if _args(field) == (str,):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _load(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    loaded = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    if not isinstance(loaded, dict):
        raise typer.BadParameter(f"{path} holds no object of request fields", param_hint="--config")
    return loaded
