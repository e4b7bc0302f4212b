"""The request schema: what OpenAI clients send is accepted; what HAIA cannot do is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.schemas import ChatCompletionRequest


def test_content_parts_are_joined_as_text() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look at"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                        {"type": "text", "text": "this"},
                    ],
                }
            ],
        }
    )
    assert request.messages[0].text == "look at\nthis"


def test_sampling_settings_map_to_model_settings() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "x"}],
            "temperature": 0.2,
            "top_p": 0.5,
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "stop": "END",
            "seed": 3,
        }
    )
    assert request.sampling() == {
        "temperature": 0.2,
        "top_p": 0.5,
        "max_tokens": 20,
        "stop_sequences": ["END"],
        "seed": 3,
    }
    assert ChatCompletionRequest.model_validate({"messages": [{"role": "user"}]}).sampling() == {}


def test_unknown_and_unused_fields_are_accepted() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "x", "name": "bob", "weird": 1}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "n": 1,
            "logit_bias": {"1": 2},
            "stream_options": {"include_usage": True, "other": True},
        }
    )
    assert request.include_usage


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "user", "content": "x"}], "n": 3},
        {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
        {"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]},
        {"messages": [{"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]},
    ],
)
def test_invalid_requests(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)
