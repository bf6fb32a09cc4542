"""vLLM's own OpenAI-compatible `/v1/completions` and `/v1/chat/completions`, mounted on the teacher's engine.

All of the glue to vLLM's serving layer lives here, because its import paths move between releases: this is written
against vLLM 0.32 (`vllm.entrypoints.launchers`; pinned in requirements/). The routes serve the base model under its
served names and every adapter loaded through `/v1/adapters` under the adapter's name (vLLM's model registry reads the
service's own adapter table), so the `openai` client and evaluation harnesses use the teacher and the students as they
are. Logprobs work as in vLLM (`return_tokens_as_token_ids` gives `token_id:N` keys).
"""

from __future__ import annotations

from fastapi import FastAPI


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
