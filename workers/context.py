"""What the model sees: the stored conversation turned into pydantic-ai messages."""

from __future__ import annotations

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    SystemPromptPart,
    TextPart,
    UserPromptPart,
)
from tortoise.expressions import Q

from app.db.models import Message, Status
from app.prompts import HOMELAB_ASSISTANT_PROMPT


async def load_context(
    assistant: Message, *, limit: int
) -> tuple[list[ModelMessage], ModelRequest]:
    """The conversation's system messages, the last `limit` other messages before the new user
    turn, and that turn as a request carrying HAIA's instructions.

    Failed or empty assistant turns are left out: the model should not see them.
    """
    before = Message.filter(
        conversation_id=assistant.conversation_id,  # type: ignore[attr-defined]
        id__lt=assistant.id,
    ).filter(~(Q(role="assistant") & (Q(content="") | Q(status=Status.FAILED))))
    system = await before.filter(role="system").order_by("id")
    rows = await before.filter(role__not="system").order_by("-id").limit(limit + 1)
    rows.reverse()
    if not rows or rows[-1].role != "user":
        raise LookupError(f"no user turn precedes {assistant.completion_id}")
    *history, turn = rows
    context = [to_model_message(row.role, row.content) for row in (*system, *history)]
    return context, ModelRequest(
        parts=[UserPromptPart(content=turn.content)], instructions=HOMELAB_ASSISTANT_PROMPT
    )


def to_model_message(role: str, text: str) -> ModelMessage:
    """One stored or client message as pydantic-ai sees it."""
    if role == "assistant":
        return ModelResponse(parts=[TextPart(content=text)])
    if role == "system":
        return ModelRequest(parts=[SystemPromptPart(content=text)])
    return ModelRequest(parts=[UserPromptPart(content=text)])
