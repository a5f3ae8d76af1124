"""The wire protocol of ``serve``: OpenAI's chat-completions request as this server reads it,
its errors, headers and limits (shared by the app and both backends).

Differences from the OpenAI API, on purpose: an omitted ``temperature`` means greedy (as
``chat``); ``n`` must be 1; ``stop``, tools and logprobs are refused with a 400 rather than
silently ignored; the last message must be the user's. Every error is a JSON body in the
OpenAI shape ``{"error": {"message", "type", "param", "code"}}``, never a traceback.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import field_path
from .engine import Sampling

ROUTE_HEADER = "x-safety-patch-route"
MAX_BODY_BYTES = 4 * 1024 * 1024


VIA_HEADER = "x-safety-patch-via"
"""The servers a request passed through on its way here (their ids, comma-separated), sent on with
this server's id added when it asks an upstream. A request that reaches a server it already passed
through is a loop (``serve --upstream`` pointing back at itself, or at a server that points back):
answered 508 at once, where it would otherwise call itself until the upstream timeout (a user's
trial, 2026-12-05: 220 requests in 20 s from one). Chains of distinct servers pass; each app
(:func:`.app.create_app`) has its own id, so two servers in one process are two servers."""


VIA: contextvars.ContextVar[str] = contextvars.ContextVar("safety_patch_via", default="")
"""The ``VIA_HEADER`` value a request's upstream call sends (set per request; tasks copy it)."""


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.route = None  # set where the request was routed before it failed (upstream mode): audited and in the header

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}



# ----------------------------------------------------------------------------- request schema


# strict: a JSON true is not max_tokens 1 nor "5" a 5 (pydantic's lax mode coerces both); OpenAI's API
# refuses them with a 400, and so does this server. An integer is still a valid float (temperature 0).
class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat-completions request this server honours (a field outside it, UNSUPPORTED
    and IGNORED is refused in ``parse``; known ones must have their JSON type: no string or boolean read as
    a number)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stream: bool | None = False
    stream_options: dict | None = None
    n: int | None = Field(default=None, ge=1)  # more than one choice: UNSUPPORTED
    stop: str | list[str] | None = None
    tools: list | None = None
    logprobs: bool | None = None
    user: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None


# OpenAI's request fields that change the answer or its form, which this server does not implement:
# a request setting one to anything but its neutral value gets a 400 (param named), never an answer
# that silently ignored it. Neutral values: what OpenAI does when the field is absent.
UNSUPPORTED: dict[str, tuple] = {
    "n": (None, 1), "stop": (None, "", []), "tools": (None, []), "logprobs": (None, False), "top_logprobs": (None, 0),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "response_format": (None, {"type": "text"}), "top_k": (None,), "min_p": (None,),
    "repetition_penalty": (None,), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,), "store": (None, False),
}


# Fields that do not change the answer, accepted and not acted on. Any other field (a misspelt one,
# or one of another API such as best_of, echo, suffix) is a 400 `unknown_parameter`: a request is
# never answered as if a field it set had been read.
IGNORED = frozenset({"metadata", "service_tier", "user"})


@dataclass
class ServeConfig:
    """Limits and options; every limit is checked before a request reaches the model."""

    default_max_tokens: int = 256
    max_tokens_limit: int = 1024
    max_prompt_tokens: int | None = None  # None: only the model's context length bounds it
    audit_path: str | None = None
    log_prompts: bool = False


@dataclass
class Prepared:
    """A validated request: what the backend needs."""

    model: str
    messages: list[dict]
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stream: bool
    include_usage: bool
    views: list[list[int]] | None = None  # what the gates read, where the messages have a system prompt


SHUTTING_DOWN = "server shutting down"  # the error of an answer cut because the server stops


def cut_reason(e: ApiError) -> dict:
    """The audit line's finish_reason of an answer the stopping server cut (503), as for one uvicorn cut,
    or of a client that left (499)."""
    return {"finish_reason": "cancelled"} if (e.status, e.message) == (503, SHUTTING_DOWN) or e.status == 499 else {}


def plain_messages(req: ChatRequest) -> list[dict]:
    out = []
    for m in req.messages:
        text = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        # OpenAI's newer name for the system role; chat templates know only "system".
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def validation_message(e: ValidationError) -> tuple[str, str]:
    """(message, param) for the first error. A field of several accepted types (``content``: a string or a
    list of text parts) gets one error per type, each located under a tag naming the type
    (``content.str``, ``content.list[TextPart][0].type``): where every branch failed at the field
    itself, it is named with the types it accepts; where the input took one branch (a list) and failed
    inside it, that branch's error is given, located without the tag."""
    errs = e.errors()
    tags = ("str", "list[TextPart]")

    def untagged(loc: tuple) -> tuple:
        return tuple(x for x in loc if x not in tags)

    branch = [x for x in errs if any(t in x.get("loc", ()) for t in tags)]
    if branch:
        loc0 = tuple(branch[0]["loc"])
        at = loc0[:min(i for i, x in enumerate(loc0) if x in tags)]  # the field the union is at
        shallow = [x for x in branch if len(x["loc"]) == len(at) + 1]
        if len(shallow) == len(branch) > 1:  # every branch failed on the value itself: say what it may be
            where = field_path(at)
            names = [str(x["loc"][-1]) for x in branch]
            return f"{where}: must be one of {' | '.join(names)} (got {type(branch[0].get('input')).__name__})", where
        deep = [x for x in branch if len(x["loc"]) > len(at) + 1]  # the input's own branch, failed inside
        err = deep[0] if deep else branch[0]
        where = field_path(untagged(err["loc"]))
        return f"{where}: {err.get('msg', 'invalid value')}", where
    err = errs[0]
    where = field_path(tuple(err.get("loc", ())))
    if err.get("type") == "missing":
        missing = [field_path(tuple(x["loc"])) for x in errs if x.get("type") == "missing"
                   and tuple(x["loc"][:-1]) == tuple(err["loc"][:-1])]
        return f"missing required field{'s' * (len(missing) > 1)} {', '.join(repr(m) for m in missing)}", missing[0]
    return f"{where or 'body'}: {err.get('msg', 'invalid value')}", where

