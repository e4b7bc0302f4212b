"""Client background tasks (OpenWebUI's title, tag and follow-up requests).

They arrive on the chat endpoint as one user message starting `### Task:`, without streaming.
HAIA answers them (on HAIA_TASK_MODEL when set) but does not store them as turns; a title
task's answer becomes the title of the chat's conversation.
"""

from __future__ import annotations

import json
import re

from app.schemas import ChatCompletionRequest

TASK_PREFIX = "### Task:"
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def is_task(body: ChatCompletionRequest) -> bool:
    if body.stream or len(body.messages) != 1 or body.messages[0].role != "user":
        return False
    return body.messages[0].text.lstrip().startswith(TASK_PREFIX)


def is_title_prompt(text: str) -> bool:
    """A task prompt asking for the chat's title (whichever API it came over)."""
    return "title" in text.lstrip()[:400].lower()


def title_from_answer(answer: str) -> str:
    """`{"title": "…"}` as OpenWebUI asks for it, or else the first line of plain text."""
    match = _JSON_OBJECT.search(answer)
    if match:
        try:
            data = json.loads(match.group(0))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("title"), str):
            return str(data["title"]).strip()
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    return lines[0].strip("\"'# ") if lines else ""
