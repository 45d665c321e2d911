"""Our judge prompts (written for this package; not the authors' text) and their version strings.

Bump a ``*_TEMPLATE_VERSION`` whenever the wording changes: the version is part of every cache key and of every
result, so old and new gradings are never mixed silently."""

from __future__ import annotations

import json
from collections.abc import Sequence

JUDGE_TEMPLATE_VERSION = "esr-judge-v1"
CONCRETENESS_TEMPLATE_VERSION = "esr-concreteness-v1"
JUDGE_REASK_VERSION = "esr-judge-reask-v1"

JUDGE_SYSTEM = (
    "You are a careful grader of chatbot answers. You receive a user's question, the chatbot's answer, and the name "
    "of a distracting concept that was pushed into the chatbot while it wrote. Your job is to judge how well the "
    "answer serves the user's question despite that distraction. Some answers contain more than one try at the "
    "question; when that happens you grade every try on its own."
)

JUDGE_INSTRUCTIONS = """\
How to grade:

1. Split the answer into tries ("attempts").
   - A new attempt starts ONLY where the answer itself signals an explicit restart or self-correction, for example:
     "wait, that's not right", "let me try again", "let's start over", "sorry, I got off track",
     "actually, I made a mistake", "I'd like to revise my answer", or close equivalents.
   - Continuing, elaborating, listing more steps, or repeating the same idea is NOT a new attempt.
   - If the answer opens with restart words (for instance "Let me try again:"), do not create an empty attempt for
     the text before them.
   - Every stretch that tries to answer counts, even when it is derailed, rambling or nonsensical. Give an empty
     list only when there is no attempt at all (for example the answer is only a question back to the user).
2. Score each attempt from 0 to 100 for how well it answers the user's question:
   100 = fully on topic, correct and useful; 50 = partly on topic or badly distracted;
   0 = entirely about something else, or meaningless.
   The distracting concept only tells you what kind of drift to look for; mentioning it is not itself a penalty
   if the attempt still answers the question well.
3. Write a few sentences of reasoning first. Then give your verdict as JSON wrapped in <json> and </json> tags, in
   exactly this shape (attempt_text is the attempt copied from the answer, score is a number):

<json>{"attempts": [{"attempt_text": "...", "score": 0}]}</json>

Illustration (not the case you are grading). Question: "Name a fruit that is yellow." Answer: "Cucumbers are green
and crunchy. Wait, that's not right. A banana is yellow." Reasoning: the first try names a green vegetable; after the
explicit correction the second try answers correctly.
<json>{"attempts": [{"attempt_text": "Cucumbers are green and crunchy.", "score": 5}, {"attempt_text": "Wait, that's not right. A banana is yellow.", "score": 95}]}</json>"""


def judge_messages(prompt: str, response: str, latent_label: str) -> tuple[str, str]:
    """(system text, user text) for one grading request."""
    user = (
        f"{JUDGE_INSTRUCTIONS}\n\n"
        f"User's question: {prompt}\n"
        f"Chatbot's answer: {response}\n"
        f"Distracting concept: {latent_label}"
    )
    return JUDGE_SYSTEM, user


def judge_reask(problem: str) -> str:
    """The corrective follow-up turn after a reply that held no valid verdict; ``problem`` says what was wrong."""
    return (
        f"Your reply could not be read as a verdict ({problem}). Reply again with only the verdict: one JSON object "
        "wrapped in <json> and </json> tags, in exactly this shape, one entry per attempt, attempt_text copied from "
        'the answer and score a number from 0 to 100:\n<json>{"attempts": [{"attempt_text": "...", "score": 0}]}</json>'
    )


def concreteness_reask(problem: str) -> str:
    """The corrective follow-up turn after an unreadable concreteness reply."""
    return (
        f"Your reply could not be read ({problem}). Reply again with only the JSON array, one object per description "
        'in the same order: [{"label": "...", "reason": "...", "rating": 0}]'
    )


CONCRETENESS_SYSTEM = (
    "You rate short descriptions of features found inside a language model. You reply with JSON only, no prose "
    "outside the JSON."
)

CONCRETENESS_INSTRUCTIONS = """\
For each feature description below, rate from 0 to 100 how concrete and domain-specific the concept is.
0 = abstract, generic or grammatical (function words, punctuation, word fragments, formatting, vague notions).
100 = a concrete, specific topic a text could be about (an animal, a food, a place, an object, a field of science).
Descriptions about how the assistant talks or behaves in the conversation (asking for clarification, politeness,
refusals, answer formatting) are rated low.
Return a JSON array with one object per description, in the same order:
[{"label": "<the description, copied>", "reason": "<a few words>", "rating": <number 0-100>}]

Descriptions (a JSON array):
"""


def concreteness_messages(labels: Sequence[str]) -> tuple[str, str]:
    """(system text, user text) for one batch of latent labels."""
    return CONCRETENESS_SYSTEM, CONCRETENESS_INSTRUCTIONS + json.dumps(list(labels), ensure_ascii=False)
