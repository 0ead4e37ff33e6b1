"""OpenAI-compatible request bodies, validated strictly: a wrong type or an absurd value is a 400 naming the field.

Strict mode refuses ``"max_tokens": "5"`` or ``true`` instead of coercing it; NaN and infinities are refused; fields
the server does not use are ignored (clients send ``user``, ``logprobs`` ...), as OpenAI's API does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 256

StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class RequestError(ValueError):
    """A request to refuse with ``status``; ``param`` names the offending field where there is one."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str = "invalid_request_error",
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after


class _Sampling(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Annotated[list[StopText], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)  # one choice per request: clients needing more send more requests
    seed: int | None = Field(default=None, ge=0, lt=2**63)

    # OpenAI accepts a string or a list for these; one type (a list) keeps error locations simple ("stop.0").
    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop: object) -> object:
        return [stop] if isinstance(stop, str) else stop

    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: Annotated[list[str], Field(min_length=1, max_length=1)]  # one prompt per request

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_list(cls, prompt: object) -> object:
        return [prompt] if isinstance(prompt, str) else prompt

    def text(self) -> str:
        return self.prompt[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


def parse(model: type[_Sampling], body: bytes) -> _Sampling:
    """Validate a request body; raises :class:`RequestError` (400) naming the first bad field."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        if error["type"] in ("json_invalid", "json_type"):
            raise RequestError(400, f"the request body is not a JSON object: {error['msg']}") from None
        if not error["loc"]:
            raise RequestError(400, f"the request body is not a JSON object: {error['msg']}") from None
        param = ".".join(str(p) for p in error["loc"])
        raise RequestError(400, f"invalid {param}: {error['msg']}", param=param) from None
