"""GRPO's reward functions as TRL calls them: graders score text and conversational completions, and a
sandboxed reward that raises, hangs or answers in the wrong shape fails naming the function."""

from __future__ import annotations

import contextlib

import pytest

from training_core import grpo
from training_core.sandboxed import SandboxError, available_isolation
from training_core.spec import JobError

needs_sandbox = pytest.mark.skipif(not available_isolation(), reason="no namespace isolation on this machine")


def test_a_grader_reward_scores_text_and_turns_against_the_reference() -> None:
    with contextlib.ExitStack() as stack:
        reward = grpo._reward_function({"type": "contains", "ignore_case": True}, 0, stack)
        scores = reward(prompts=["q", "q"], completions=["It is -27 dBm", [{"role": "assistant", "content": "no"}]],
                        reference=["-27 DBM", "-27 dBm"])
    assert scores == [1.0, 0.0]
    assert reward.__name__ == "contains_0"


@needs_sandbox
@pytest.mark.parametrize(("source", "kind", "says"), [
    ("def r(prompts, completions, **kw):\n    raise KeyError('reference')\n", "raised", "KeyError"),
    ("def r(prompts, completions, **kw):\n    while True:\n        pass\n", "timeout", "did not return within 1 s"),
    ("def r(prompts, completions, **kw):\n    return {'score': 1}\n", "bad_output", "a list of 2 numbers"),
    ("def r(prompts, completions, **kw):\n    return ['high', 'low']\n", "bad_output", "scores are numbers"),
])
def test_a_python_reward_that_misbehaves_fails_naming_the_function(source: str, kind: str, says: str) -> None:
    with contextlib.ExitStack() as stack:
        reward = grpo._reward_function({"type": "python", "source": source, "function": "r",
                                        "timeout_seconds": 1.0}, 0, stack)
        with pytest.raises(SandboxError) as caught:
            reward(prompts=["a", "b"], completions=["x", "y"], reference=["x", "y"], trainer_state=object())
    assert caught.value.function == "r" and caught.value.kind == kind and says in caught.value.message


@needs_sandbox
def test_a_python_reward_sees_the_dataset_columns_but_not_trainer_objects() -> None:
    source = ("def r(prompts, completions, **kw):\n"
              "    return [float(sorted(kw) == ['reference'] and c == ref)\n"
              "            for c, ref in zip(completions, kw['reference'])]\n")
    with contextlib.ExitStack() as stack:
        reward = grpo._reward_function({"type": "python", "source": source, "function": "r"}, 0, stack)
        assert reward(prompts=["a", "b"], completions=["x", "z"], reference=["x", "y"], trainer_state=object(),
                      log_metric=print) == [1.0, 0.0]


@needs_sandbox
def test_code_that_does_not_load_is_refused_before_training() -> None:
    with contextlib.ExitStack() as stack, pytest.raises(JobError) as caught:
        grpo._reward_function({"type": "python", "source": "import nonexistent_module\ndef r(**kw): pass\n",
                               "function": "r"}, 3, stack)
    assert caught.value.code == "reward_error" and caught.value.param == "options.rewards[3]"
