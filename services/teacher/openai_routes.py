"""vLLM's own OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, mounted on the teacher's engine.

All of the glue to vLLM's serving layer lives here, because its import paths move between releases: this is written
against vLLM 0.32 (`vllm.entrypoints.launchers`; pinned in requirements/). The routes serve the base model under its
served names and every adapter loaded through `/v1/adapters` under the adapter's name (vLLM's model registry reads the
service's own adapter table), so the `openai` client and evaluation harnesses use the teacher and the students as they
are. Logprobs work as in vLLM (`return_tokens_as_token_ids` gives `token_id:N` keys).

They count against `SSB_MAX_PENDING_REQUESTS` as the teacher's own routes do, one engine request per prompt, from
before vLLM reads the request until its answer (streamed or not) is sent or its client leaves (`OpenAIAdmission`).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI

from services.errors import ServiceError
from services.http import refusal_response

OPENAI_ROUTES = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}  # path: the field that holds prompts


def attach_openai_routers(app: FastAPI) -> None:
    """Register the two routes; their handlers read `app.state`, filled by `init_openai_state` at start-up."""
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
    app.state.openai_serving_models.lora_requests = service.lora_requests


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


def prompts_in(body: Any, field: str) -> int:
    """The engine requests an OpenAI request asks for, counted as the teacher's own routes count them (one per prompt):
    a chat is one; a completion's `prompt` is one text or one list of token ids, or a list of either. A body that is
    not such a request counts one (vLLM refuses it itself)."""
    prompt = body.get(field) if isinstance(body, dict) and field == "prompt" else None
    if isinstance(prompt, list) and prompt and not all(isinstance(part, int) for part in prompt):
        return len(prompt)
    return 1


class OpenAIAdmission:
    """ASGI middleware: a POST to one of vLLM's OpenAI routes is admitted by the teacher's bound before vLLM sees it
    (429 with Retry-After past it, 400 for more prompts than it admits at all) and counts until the route is done
    with it. Other requests pass untouched. The body is read here and handed on unchanged."""

    def __init__(self, app, retry_after_seconds: int | None = None):
        self.app = app
        self.retry_after_seconds = retry_after_seconds

    async def __call__(self, scope, receive, send) -> None:
        field = OPENAI_ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        service = scope["app"].state.service if field and scope["method"] == "POST" else None
        if service is None:  # not an OpenAI request, or the engine not up (refused before this layer)
            return await self.app(scope, receive, send)
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            requests = prompts_in(json.loads(body or b"null"), field)
        except ValueError:
            requests = 1  # not JSON: vLLM answers it
        try:
            admission = service.admitted(requests, field)
            admission.__enter__()
        except ServiceError as exc:
            return await refusal_response(exc, self.retry_after_seconds)(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            admission.__exit__(None, None, None)
