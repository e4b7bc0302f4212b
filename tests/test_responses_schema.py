"""`POST /v1/responses` bodies as clients really send them, translated for the model."""

from __future__ import annotations

from typing import Any

from app.responses_schema import ResponsesRequest


def options(**body: Any) -> dict[str, Any]:
    return ResponsesRequest.model_validate({"input": "hi", **body}).options()


def test_chat_completions_names_openwebui_sends_reach_the_model() -> None:
    """OpenWebUI's Responses connection renames max_tokens only: its chat's reasoning effort
    and seed arrive under their chat completions names."""
    sent = options(reasoning_effort="high", seed=7, max_output_tokens=50)
    assert sent["reasoning_effort"] == "high"
    assert sent["openai"]["seed"] == 7
    assert sent["openai"]["max_tokens"] == 50


def test_reasoning_effort_wins_over_the_chat_name() -> None:
    assert options(reasoning={"effort": "low"}, reasoning_effort="high")["reasoning_effort"] == (
        "low"
    )


def test_values_a_model_cannot_take_are_accepted_and_left_out() -> None:
    sent = options(reasoning_effort="extreme", seed="7")
    assert "reasoning_effort" not in sent
    assert "seed" not in sent["openai"]
    assert "seed" not in options(seed=True)["openai"]
