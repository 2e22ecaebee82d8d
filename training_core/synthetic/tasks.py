"""The five synth tasks: how each builds a batch of records, from templates or with a generator.

Every record comes out in a format the trainers take as it is, with a `metadata` object saying
how it was made (task, generator, seed, index, and the task's own: template, source chunk, how
the chosen and rejected answers were made):

- `instructions`: chat `messages` (or `prompt`/`completion`) grown from seed examples, self-instruct
  style: a generator is shown `seeds_per_prompt` sampled seed tasks, writes a new one, then
  answers it.
- `qa_from_documents`: a question and its answer per chunk of the source documents; the record
  names the chunk by reference (`metadata.source_chunk`: dataset, offsets and hash, no text).
- `preferences`: DPO's `prompt`/`chosen`/`rejected`; chosen from the generator or the seed's
  reference answer, rejected from a weaker model or a controlled corruption of the chosen one.
- `workflow_traces`: `messages` with assistant `tool_calls` and `tool` results, meant to follow
  the company's tool schemas (the `schema` filter checks each one).
- `prompts`: prompt-only `{"prompt"}` records for GRPO.

The prompts shown to generators are the constants below; the manifest records them.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from training_core.synthetic.generators import (
    Completion,
    Conversation,
    TextGenerator,
    draw_slots,
    fill,
    slots_in,
)

TASKS = ("instructions", "qa_from_documents", "preferences", "workflow_traces", "prompts")

NEW_TASK_PROMPT = ("Here are examples of requests people make:\n{examples}\n\nWrite one new request in the "
                   "same style and domain, different from the examples. Reply with the request only.")
QUESTION_PROMPT = ("Passage:\n{chunk}\n\nWrite one question that this passage answers. Reply with the "
                   "question only.")
ANSWER_FROM_PASSAGE_PROMPT = ("Answer the question using only the passage.\n\nPassage:\n{chunk}\n\n"
                              "Question: {question}")
TRACE_PROMPT = ("The assistant can call these tools (JSON schemas):\n{tools}\n\n{examples}Write one new "
                "conversation in which a user asks for something and the assistant uses the tools. Reply "
                "with a JSON array of messages only: {{\"role\", \"content\"}}; an assistant turn that calls "
                "a tool has \"tool_calls\": [{{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}] "
                "and each call is followed by a {{\"role\": \"tool\", \"name\", \"content\"}} result; the last "
                "turn is the assistant's answer.")
PROMPTS = {"new_task": NEW_TASK_PROMPT, "question": QUESTION_PROMPT, "answer_from_passage": ANSWER_FROM_PASSAGE_PROMPT,
           "trace": TRACE_PROMPT}
CORRUPTIONS = ("truncate", "shuffle_sentences", "drop_sentence")


@dataclass
class Sources:
    """What the job read before generating: seed examples and document chunks."""

    seeds: list[dict[str, Any]] = field(default_factory=list)
    """Seed records as given (any synth format)."""
    chunks: list[dict[str, Any]] = field(default_factory=list)
    """`{"text", "reference"}` pieces of the source documents; only the reference (`{dataset_id,
    dataset_hash, index, start, end, sha256}`) goes into a record's metadata."""


@dataclass
class Batch:
    """Records in generation order (None where a generator's output could not be parsed)."""

    records: list[dict[str, Any] | None]


def from_templates(task: str, rng: random.Random, sources: Sources, options: dict[str, Any],
                   start: int, n: int) -> Batch:
    """`n` records by filling templates; the draw depends only on the seed and `start`."""
    generator = options["generator"]
    templates, slots = generator["templates"], generator.get("slots") or {}
    records: list[dict[str, Any] | None] = []
    for index in range(start, start + n):
        which = rng.randrange(len(templates))
        template = templates[which]
        values, meta = _task_slots(task, rng, sources)
        values |= draw_slots(rng, slots_in(template) - set(values), slots)
        record = _shape(task, fill(template, values), options, rng, meta)
        if record is not None:
            record["metadata"] |= {"template": which, "slots": {k: v for k, v in values.items() if k in slots}}
        records.append(_stamp(record, task, options, index))
    return Batch(records)


def with_generator(task: str, rng: random.Random, sources: Sources, options: dict[str, Any],
                   generator: TextGenerator, rejecter: TextGenerator | None, start: int, n: int) -> Batch:
    """`n` records made by a model or an endpoint, each task in one or two batched rounds."""
    task_options = options["task_options"]
    if task == "qa_from_documents":
        chunks = [rng.choice(sources.chunks) for _ in range(n)]
        questions = _first_lines(generator.complete([_user(QUESTION_PROMPT.format(chunk=c["text"])) for c in chunks]))
        answers = generator.complete([_user(ANSWER_FROM_PASSAGE_PROMPT.format(chunk=c["text"], question=q))
                                      for c, q in zip(chunks, questions, strict=True)])
        records = [_pair(q, a.text, task_options, {"source_chunk": c["reference"]})
                   for c, q, a in zip(chunks, questions, answers, strict=True)]
    elif task == "workflow_traces":
        examples = [_trace_examples(rng, sources, task_options) for _ in range(n)]
        tools = json.dumps(task_options["tools"], indent=1)
        outputs = generator.complete([_user(TRACE_PROMPT.format(tools=tools, examples=e)) for e in examples])
        records = [_parse_trace(o.text) for o in outputs]
    elif task == "preferences":
        records = _preferences(rng, sources, task_options, generator, rejecter, n)
    else:
        prompts = _new_prompts(rng, sources, task_options, generator, n)
        if task == "prompts":
            records = [{"prompt": p, "metadata": {}} for p in prompts]
        else:
            answers = generator.complete([_conversation(p, task_options) for p in prompts])
            records = [_pair(p, a.text, task_options, {}) for p, a in zip(prompts, answers, strict=True)]
    return Batch([_stamp(r, task, options, index) for index, r in enumerate(records, start)])


def calls_per_record(task: str, options: dict[str, Any]) -> int:
    """Generator calls one record costs at most: what the token estimate and cap multiply by."""
    if options["generator"]["type"] == "template":
        return 0
    return {"qa_from_documents": 2, "workflow_traces": 1, "prompts": 1, "instructions": 2}.get(task, 3)


# ---- templates -----------------------------------------------------------------------------------

def _task_slots(task: str, rng: random.Random, sources: Sources) -> tuple[dict[str, str], dict[str, Any]]:
    """Slots the task fills itself: a document chunk and one of its sentences, or a seed example."""
    if task == "qa_from_documents":
        chunk = rng.choice(sources.chunks)
        sentences = _sentences(chunk["text"])
        return {"chunk": chunk["text"], "sentence": rng.choice(sentences)}, {"source_chunk": chunk["reference"]}
    if sources.seeds:
        seed = rng.choice(sources.seeds)
        prompt, completion = _seed_prompt(seed), seed_completion(seed)
        return {"seed_prompt": prompt or "", "seed_completion": completion or ""}, {}
    return {}, {}


def _shape(task: str, filled: dict[str, Any], options: dict[str, Any], rng: random.Random,
           meta: dict[str, Any]) -> dict[str, Any] | None:
    """A filled template as a record of the task's format."""
    task_options = options["task_options"]
    if task in ("instructions", "qa_from_documents"):
        if "messages" in filled:
            return {"messages": filled["messages"], "metadata": meta}
        prompt = filled.get("prompt", filled.get("question"))
        answer = filled.get("completion", filled.get("answer"))
        return _pair(prompt, answer, task_options, meta)
    if task == "preferences":
        record = {"prompt": filled["prompt"], "chosen": filled["chosen"],
                  "metadata": meta | {"chosen_from": "template"}}
        if "rejected" in filled:
            return record | {"rejected": filled["rejected"],
                             "metadata": record["metadata"] | {"rejected_from": "template"}}
        rejected, how = corrupt(filled["chosen"], rng.choice(CORRUPTIONS), rng)
        return record | {"rejected": rejected, "metadata": record["metadata"] | {"rejected_from": f"corruption:{how}"}}
    if task == "workflow_traces":
        return {"messages": [_trace_turn(t) for t in filled["messages"]], "metadata": meta}
    return {"prompt": filled["prompt"], "metadata": meta}


def _trace_turn(turn: dict[str, Any]) -> dict[str, Any]:
    """Arguments written as a JSON object in a template become the string the chat format wants."""
    if not isinstance(turn, dict) or "tool_calls" not in turn or not isinstance(turn["tool_calls"], list):
        return turn
    calls = []
    for call in turn["tool_calls"]:
        function = dict(call.get("function") or {}) if isinstance(call, dict) else {}
        if not isinstance(function.get("arguments"), str):
            function["arguments"] = json.dumps(function.get("arguments"), sort_keys=True)
        calls.append({"type": "function", "function": function})
    return {**turn, "content": turn.get("content", "")} | {"tool_calls": calls}


# ---- with a generator ----------------------------------------------------------------------------

def _new_prompts(rng: random.Random, sources: Sources, task_options: dict[str, Any], generator: TextGenerator,
                 n: int) -> list[str]:
    """Self-instruct's first step: new requests written from `seeds_per_prompt` sampled seeds."""
    k = task_options["seeds_per_prompt"]
    shown = []
    for _ in range(n):
        sample = rng.sample(sources.seeds, min(k, len(sources.seeds)))
        shown.append("\n".join(f"{i}. {_seed_prompt(s)}" for i, s in enumerate(sample, 1)))
    return _first_lines(generator.complete([_user(NEW_TASK_PROMPT.format(examples=e)) for e in shown]))


def _preferences(rng: random.Random, sources: Sources, task_options: dict[str, Any], generator: TextGenerator,
                 rejecter: TextGenerator | None, n: int) -> list[dict[str, Any] | None]:
    if task_options["chosen"] == "reference":
        # The seed's own answer is chosen, with the seed's prompt, so the pair stays consistent.
        answered = [s for s in sources.seeds if seed_completion(s)]
        seeds = [rng.choice(answered) for _ in range(n)]
        prompts = [_seed_prompt(s) or "" for s in seeds]
        chosen = [Completion(seed_completion(s) or "", 0) for s in seeds]
    else:
        prompts = _new_prompts(rng, sources, task_options, generator, n)
        chosen = generator.complete([_conversation(p, task_options) for p in prompts])
    if rejecter is not None:
        rejected = [(c.text, f"model:{rejecter.name}")
                    for c in rejecter.complete([_conversation(p, task_options) for p in prompts])]
    else:
        rejected = []
        for c in chosen:
            worse, how = corrupt(c.text, rng.choice(CORRUPTIONS), rng)
            rejected.append((worse, f"corruption:{how}"))
    chosen_from = "reference" if task_options["chosen"] == "reference" else f"generator:{generator.name}"
    return [{"prompt": p, "chosen": c.text, "rejected": r,
             "metadata": {"chosen_from": chosen_from, "rejected_from": how}}
            for p, c, (r, how) in zip(prompts, chosen, rejected, strict=True)]


def corrupt(text: str, how: str, rng: random.Random) -> tuple[str, str]:
    """A controlled corruption: a worse answer, and the way it was made worse (one sentence cannot be
    shuffled or lose a sentence, so it is truncated, and says so)."""
    sentences = _sentences(text)
    if how == "shuffle_sentences" and len(sentences) > 1 and len(set(sentences)) > 1:
        shuffled = sentences[:]
        while shuffled == sentences:
            rng.shuffle(shuffled)
        return " ".join(shuffled), how
    if how == "drop_sentence" and len(sentences) > 1:
        dropped = rng.randrange(len(sentences))
        return " ".join(s for i, s in enumerate(sentences) if i != dropped), how
    words = text.split()
    return " ".join(words[: max(1, len(words) // 2)]) + ("" if len(words) > 1 else " ..."), "truncate"


def _parse_trace(text: str) -> dict[str, Any] | None:
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        messages = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(messages, list):
        return None
    return {"messages": [_trace_turn(t) for t in messages], "metadata": {}}


def _trace_examples(rng: random.Random, sources: Sources, task_options: dict[str, Any]) -> str:
    traces = [s for s in sources.seeds if "messages" in s]
    if not traces:
        return ""
    sample = rng.sample(traces, min(task_options["seeds_per_prompt"], len(traces)))
    return "".join(f"Example:\n{json.dumps(s['messages'])}\n\n" for s in sample)


# ---- shared --------------------------------------------------------------------------------------

def _pair(prompt: Any, answer: Any, task_options: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A prompt and its answer in the output format the request chose."""
    if task_options["output_format"] == "prompt_completion":
        return {"prompt": prompt, "completion": answer, "metadata": meta}
    return {"messages": _conversation(prompt, task_options) + [{"role": "assistant", "content": answer}],
            "metadata": meta}


def _conversation(prompt: Any, task_options: dict[str, Any]) -> Conversation:
    system = task_options.get("system_prompt")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def _user(content: str) -> Conversation:
    return [{"role": "user", "content": content}]


def _stamp(record: dict[str, Any] | None, task: str, options: dict[str, Any], index: int) -> dict[str, Any] | None:
    if record is None:
        return None
    made = {"task": task, "generator": options["generator"]["describe"], "seed": options["seed"], "index": index}
    record["metadata"] = made | record.get("metadata", {})
    return record


_NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*•]|(?:request|question|task)\s*:)\s*", re.IGNORECASE)


def _first_lines(completions: list[Completion]) -> list[str]:
    """The first non-empty line of each output, without list numbering or a 'Question:' label."""
    lines = []
    for completion in completions:
        line = next((ln for ln in completion.text.splitlines() if ln.strip()), "")
        lines.append(_NUMBERING.sub("", line).strip())
    return lines


def _sentences(text: str) -> list[str]:
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]
    return parts or [text.strip()]


def _seed_prompt(seed: dict[str, Any]) -> str | None:
    if "prompt" in seed:
        return str(seed["prompt"])
    turns = seed.get("messages") or []
    return next((t.get("content") for t in turns if isinstance(t, dict) and t.get("role") == "user"), None)


def seed_completion(seed: dict[str, Any]) -> str | None:
    for key in ("completion", "chosen"):
        if key in seed:
            return str(seed[key])
    turns = seed.get("messages") or []
    return next((t.get("content") for t in turns if isinstance(t, dict) and t.get("role") == "assistant"), None)
