"""Request bodies in the OpenAI schema, plus the ``safety`` extension.

Fields an OpenAI client may send but this server does not use (``frequency_penalty``, ``user``,
...) are accepted and ignored, so the official client works unchanged. Numbers are bounded here
(finite floats, 64-bit seeds) so that no well-formed JSON can reach the model with a value it
would crash on; limits that depend on the server's settings are checked in the handlers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

Finite = Annotated[float, Field(allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class SafetyOptions(BaseModel):
    """``"safety": {"profile": "kids", "categories": ["alcohol"]}``: adds to the key's floor, never removes."""

    model_config = ConfigDict(extra="forbid")
    profile: str | None = Field(None, max_length=200, description="A profile name from the profiles file.")
    categories: list[str] | None = Field(
        None, max_length=256, description="Extra categories to activate (exact registry names)."
    )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        """An image, audio or file part is refused by name: left to the union, pydantic reports that
        the content "should be a valid string", which hides that a list of text parts is fine."""
        for part in value if isinstance(value, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise PydanticCustomError(
                    "content_part", "only text content parts are supported, not '{kind}'", {"kind": kind}
                )
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(
        ..., max_length=400, description="The served model id, optionally '<model>:<profile>'."
    )
    max_tokens: int | None = Field(None, ge=1, le=2**31)
    temperature: Finite | None = Field(None, ge=0.0, le=2.0, description="0 or absent: greedy decoding.")
    top_p: Finite | None = Field(None, ge=0.0, le=1.0, description="0 keeps only the likeliest token.")
    n: int | None = Field(1, ge=1, le=1, description="Only one choice per prompt is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    min_tokens: int | None = Field(
        None, ge=0, le=2**31, description="vLLM extension: suppress EOS before this."
    )
    safety: SafetyOptions | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31)


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(..., description="Each prompt is sent as one user turn.")
