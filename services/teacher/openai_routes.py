"""vLLM's own OpenAI-compatible `/v1/completions`, `/v1/chat/completions` and `/v1/chat/completions/batch`, mounted on
the teacher's engine.

All of the glue to vLLM's serving layer lives here, because its import paths move between releases: this is written
against vLLM 0.32 (`vllm.entrypoints.launchers`; pinned in requirements/). The routes serve the base model under its
served names and every adapter loaded through `/v1/adapters` under the adapter's name (vLLM's model registry reads the
service's own adapter table), so the `openai` client and evaluation harnesses use the teacher and the students as they
are. Logprobs work as in vLLM (`return_tokens_as_token_ids` gives `token_id:N` keys).

They count against `SSB_MAX_PENDING_REQUESTS` like the teacher's own routes, from before vLLM reads the request until
its answer (streamed or not) is sent or its client leaves (`OpenAIAdmission`): one engine request per prompt and
sample (vLLM runs each of a request's `n` samples as a request of its own; the teacher's routes, whose `n` is at most
64, count prompts).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from typing import Any

from fastapi import FastAPI
from pydantic import TypeAdapter, ValidationError

from services.errors import ServiceError
from services.http import refusal_response

# Each POST route of vLLM's OpenAI routers, and the field that holds its prompts: a completion's one or more, a chat's
# one conversation, a batch chat's list of conversations.
COMPLETIONS, CHAT, BATCH_CHAT = "/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch"
OPENAI_ROUTES = {COMPLETIONS: "prompt", CHAT: "messages", BATCH_CHAT: "messages"}
LAX_INT = TypeAdapter(int)


def attach_openai_routers(app: FastAPI) -> None:
    """Register vLLM's completion router and its chat router (`/v1/chat/completions` and its `/batch`): the three
    `OPENAI_ROUTES`. Their handlers read `app.state`, filled by `init_openai_state` at start-up."""
    from vllm.entrypoints.openai.chat_completion.api_router import attach_router as attach_chat
    from vllm.entrypoints.openai.completion.api_router import attach_router as attach_completion

    attach_completion(app)
    attach_chat(app)


def openai_server_args(model_path: str, served_names: list[str]):
    """vLLM's server arguments with its defaults, for the model the engine already runs."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    return parser.parse_args(["--model", model_path, "--served-model-name", *served_names])


async def init_openai_state(app: FastAPI, service) -> None:
    """Fill `app.state` with vLLM's serving objects on the service's engine, sharing its adapter table."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    served_names = list(dict.fromkeys([service.served_name, service.model_name]))
    args = openai_server_args(service.model_name, served_names)
    await init_app_state(service.engine, app.state, args, ("generate",))
    models = app.state.openai_serving_models
    models.lora_requests = service.lora_requests
    models.model_name = service.public_name  # an answer's `model`: the adapter's name, not the engine's for it


def register_vllm_error_handler(app: FastAPI, error_response) -> None:
    """vLLM's errors raised inside its routes, in the service's envelope: a dead engine is 503, the rest get the
    status vLLM itself gives them (a bad value 400, ...)."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMError
    from vllm.v1.engine.exceptions import EngineDeadError

    @app.exception_handler(VLLMError)
    async def vllm_error(request, exc: VLLMError):
        if isinstance(exc, EngineDeadError):
            return error_response(503, "the engine has died; restart the service", "not_ready")
        error = create_error_response(exc).error
        return error_response(error.code, error.message, error.type, error.param)


def prompts_in(body: Any, route: str) -> int:
    """The engine requests an OpenAI request asks for: its prompts (a completion's `prompt` is one text or one list of
    token ids, or a list of either; a chat is one conversation, a batch chat's `messages` a list of them) times its
    samples (`n`). A body that is not such a request counts one (vLLM refuses it itself)."""
    if not isinstance(body, dict):
        return 1
    prompts = body.get(OPENAI_ROUTES[route])
    if route == CHAT or not isinstance(prompts, list) or not prompts:
        count = 1
    elif route == COMPLETIONS and all(isinstance(part, int) for part in prompts):
        count = 1  # one prompt of token ids
    else:
        count = len(prompts)
    return count * samples_in(body.get("n"))


def samples_in(n: Any) -> int:
    """A request's `n` as vLLM reads it (pydantic's lax mode: 8, "8" and 8.0 are 8 samples); 1 for no `n`, or one
    that vLLM refuses itself."""
    try:
        return max(LAX_INT.validate_python(n), 1)
    except ValidationError:
        return 1


def route_path(scope) -> str:
    """The request's path as the app's routes see it (without a `root_path` the server was started with)."""
    root, path = scope.get("root_path", ""), scope.get("path", "")
    return path[len(root):] if root and path.startswith(root) else path


class OpenAIAdmission:
    """ASGI middleware: a POST to one of vLLM's OpenAI routes is admitted by the teacher's bound before vLLM sees it
    (429 with Retry-After past it, 400 for more prompts than it admits at all) and counts until the route is done
    with it. Other requests pass untouched. The body is read here and handed on unchanged."""

    def __init__(self, app, retry_after_seconds: int | None = None):
        self.app = app
        self.retry_after_seconds = retry_after_seconds

    async def __call__(self, scope, receive, send) -> None:
        route = route_path(scope) if scope["type"] == "http" else None
        service = scope["app"].state.service if route in OPENAI_ROUTES and scope["method"] == "POST" else None
        if service is None:  # not an OpenAI request, or the engine not up (refused before this layer)
            return await self.app(scope, receive, send)
        messages = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        body = b"".join(message.get("body", b"") for message in messages)
        try:
            requests = prompts_in(json.loads(body or b"null"), route)
        except (ValueError, RecursionError):
            requests = 1  # not JSON (or nested past the parser's depth): vLLM answers it

        async def replay():
            return messages.pop(0) if messages else await receive()

        with ExitStack() as admission:  # held until the route has answered, or its client left
            try:
                admission.enter_context(service.admitted(requests, OPENAI_ROUTES[route]))
            except ServiceError as exc:
                return await refusal_response(exc, self.retry_after_seconds)(scope, receive, send)
            await self.app(scope, replay, send)
