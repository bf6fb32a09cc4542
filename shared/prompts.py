"""The prompts of SSB, in the project's own words: one builder per prompt, used by curation, training and evaluation.

- `build_student_messages`: the math-tutor system prompt and the bare question. The rollouts, the student's training
  input and evaluation all use it, so the student is trained on exactly what it sees at inference.
- `build_hinted_messages`: the teacher's prompt: the problem, one correct and one incorrect earlier response, labelled,
  and a request for one standalone, careful solution that never mentions the hints.
- `attempt_mention`: how an explanation speaks of those attempts anyway, if it does (such an explanation is no pair).

An optional worked example (one user/assistant turn ending in `\\boxed{}`) can be placed before the question; small models
need it to answer in the expected form. When it is used, it is used identically in every prompt.
`PROMPT_VERSION` changes whenever any wording below changes; pairs record it.

`render_chat` is the one renderer: the model's own chat template, ending with the assistant's turn opened, as text and
token ids (it takes any tokenizer with `apply_chat_template` and `encode`, so this module imports no transformers).
`context_overflows` names the problems whose prompts cannot fit an engine's context, before any engine starts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from shared.schemas import ChatMessage, Problem, RenderedPrompt

PROMPT_VERSION = "ssb-prompts-v1"

SYSTEM_PROMPT = (
    "You are a careful math tutor. Solve the problem step by step, explaining each step briefly. "
    "Check your arithmetic. End with the final answer in the form \\boxed{answer}."
)

WORKED_EXAMPLE_QUESTION = "Sara has 12 pencils and gives 5 of them to her brother. How many pencils does Sara have left?"
WORKED_EXAMPLE_ANSWER = "Sara starts with 12 pencils and gives away 5.\n12 - 5 = 7\nThe answer is \\boxed{7}."

HINTED_INSTRUCTIONS = (
    "Below is a math problem and two earlier attempts at it. The first attempt reached the correct answer; "
    "the second made a mistake and reached a wrong answer.\n\n"
    "Write one new, complete, step-by-step solution to the problem, as if you were solving it for the first time. "
    "Explain each step clearly, point out where it is easy to go wrong and how to avoid it, "
    "and end with the final answer in the form \\boxed{answer}. "
    "Do not mention the attempts, do not say that you were shown any solutions, and do not copy them."
)


def _example_turns(worked_example: bool) -> list[ChatMessage]:
    if not worked_example:
        return []
    return [
        ChatMessage(role="user", content=WORKED_EXAMPLE_QUESTION),
        ChatMessage(role="assistant", content=WORKED_EXAMPLE_ANSWER),
    ]


def build_student_messages(question: str, *, worked_example: bool = False) -> list[ChatMessage]:
    """The bare-question chat: system prompt, optional worked example, then the question."""
    return [
        ChatMessage(role="system", content=SYSTEM_PROMPT),
        *_example_turns(worked_example),
        ChatMessage(role="user", content=question.strip()),
    ]


def build_hinted_messages(
    question: str, correct_response: str, incorrect_response: str, *, worked_example: bool = False
) -> list[ChatMessage]:
    """The teacher's chat: the problem with one correct and one incorrect attempt, asking for a standalone solution."""
    content = (
        f"{HINTED_INSTRUCTIONS}\n\n"
        f"### Problem\n{question.strip()}\n\n"
        f"### Correct attempt\n{correct_response.strip()}\n\n"
        f"### Incorrect attempt\n{incorrect_response.strip()}\n\n"
        "### Your solution"
    )
    return [
        ChatMessage(role="system", content=SYSTEM_PROMPT),
        *_example_turns(worked_example),
        ChatMessage(role="user", content=content),
    ]


# How an explanation speaks of the attempts its prompt showed (headed "Correct attempt" and "Incorrect attempt", and
# called the first and the second): "the" before them, as for things already shown, or both of them at once; "the
# incorrect solution" too, but not one followed by what it is ("the wrong solution x = -1" of an equation: a root). A
# solution in its own voice says "a common wrong attempt", "a first attempt", which do not count.
_ATTEMPT_MENTION = re.compile(
    r"\b(?:the|these|those)\s+(?:(?:in)?correct|right|wrong|mistaken|flawed|first|second|earlier|previous|other|given"
    r"|provided|two|above)\s+(?:attempt|response)s?\b"
    r"|\b(?:the|these|those)\s+attempts\b"
    r"|\b(?:the|these|those)\s+(?:incorrect|wrong|mistaken|flawed)\s+solutions?\b(?!,?\s*(?:\$|\\\(|[a-z]\s*=|-?\d))"
    r"|\bboth\s+(?:attempt|response)s\b"
    r"|\b(?:was|were|been)\s+(?:shown|given|provided)\s+(?:two|the|these|both)\s+(?:attempts|responses|solutions)\b",
    re.IGNORECASE,
)
# A question with tries of its own (a player's shots, a guess at a code, a survey's responses) may have its solution
# speak of attempts or responses; one to solve, with roots, of solutions that may be wrong.
_OWN_WORDS = {
    "attempt": re.compile(r"\b(?:attempt|tr(?:y|ies|ied|ials?)|shots?|throws?|toss|guess)", re.IGNORECASE),
    "response": re.compile(r"\brespon", re.IGNORECASE),
    "solution": re.compile(r"\b(?:solution|solv|roots?\b|zeros?\b|equation)", re.IGNORECASE),
}


def attempt_mention(explanation: str, question: str) -> str | None:
    """The first phrase by which `explanation` speaks of the attempts shown with its question ("unlike the incorrect
    attempt", "both attempts"), or None. The hinted prompt asks for a solution that never mentions them: the student,
    trained on the explanation after the bare question, would learn to speak of attempts it never saw. A question with
    tries or responses of its own (a player's shots, a survey's respondents) lets its explanation speak of them."""
    for match in _ATTEMPT_MENTION.finditer(explanation):
        noun = re.search(r"attempt|response|solution", match.group(), re.IGNORECASE).group().lower()
        if not _OWN_WORDS[noun].search(question):
            return " ".join(match.group().split())
    return None


def render_chat(tokenizer, messages: Sequence[ChatMessage]) -> RenderedPrompt:
    """Render a chat with the tokenizer's chat template, ending with the assistant's turn opened, exactly as the model
    reads it: the text and its token ids (no special tokens added beyond what the template writes)."""
    plain = [m.model_dump() for m in messages]
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    return RenderedPrompt(messages=list(messages), text=text, token_ids=tokenizer.encode(text, add_special_tokens=False))


# A response re-tokenized inside the hinted prompt may take a few tokens more than it did alone.
RESPONSE_TOKENS_SLACK = 8


def context_overflows(
    tokenizer,
    problems: Sequence[Problem],
    *,
    context: int,
    answer_tokens: int,
    explanation_tokens: int | None = None,
    worked_example: bool = False,
) -> list[str]:
    """The problems whose prompts cannot fit a `context`-token engine, each as `source: why`: the question's prompt
    plus an answer of `answer_tokens` (a rollout, or an evaluation's answer), and, with `explanation_tokens`, the
    hinted prompt at its largest (two earlier answers of `answer_tokens` each) plus the explanation. The engine
    refuses such a prompt only when it comes to it, in the middle of a run."""
    overflows = []
    for problem in problems:
        where = problem.source or problem.id
        student = build_student_messages(problem.question, worked_example=worked_example)
        asked = len(render_chat(tokenizer, student).token_ids)
        if asked + answer_tokens > context:
            overflows.append(
                f"{where}: the question's prompt is {asked} tokens; with {answer_tokens} for the answer that passes "
                f"the context by {asked + answer_tokens - context}"
            )
            continue
        if explanation_tokens is None:
            continue
        hinted = build_hinted_messages(problem.question, "", "", worked_example=worked_example)
        largest = len(render_chat(tokenizer, hinted).token_ids) + 2 * (answer_tokens + RESPONSE_TOKENS_SLACK)
        if largest + explanation_tokens > context:
            overflows.append(
                f"{where}: the hinted prompt can reach {largest} tokens (two answers of up to {answer_tokens}); with "
                f"{explanation_tokens} for the explanation that passes the context by "
                f"{largest + explanation_tokens - context}"
            )
    return overflows
