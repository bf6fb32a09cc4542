"""The teacher service's logic, without HTTP: rollouts, hinted explanations, scoring and LoRA adapters on vLLM's async
engine (`AsyncLLM`), so that the requests of every client share the engine's batches.

`TeacherService.start(settings)` builds the engine with `services.teacher.engine.engine_kwargs` (the one definition of
its arguments); prompts are built by `shared.prompts` and rendered by `shared.prompts.render_chat`, exactly as the
in-process engine does, so pairs curated through the service equal pairs curated in-process. Each prompt becomes one
engine request; all of a call's requests are submitted at once. Bad input raises `InvalidRequest` (naming the field),
`NotFound`, `Conflict` or `Overloaded`; the HTTP layer (services/teacher/app.py) maps them to statuses in one place.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from services.errors import ServiceError
from services.teacher.engine import (
    EngineOptions,
    engine_environment,
    engine_kwargs,
    generation_from_completion,
    remove_ipc_directory,
    resolved_dtype,
    sampling_params,
    topk_from_vllm,
)
from services.teacher.settings import TeacherSettings
from shared.engine import HintedQuestion, explanation_messages, rollout_messages
from shared.models import resolve_model
from shared.prompts import PROMPT_VERSION, render_chat
from shared.schemas import ChatMessage, Generation, RenderedPrompt, SamplingSettings
from shared.teacher_api import (
    AdapterCard,
    AdapterLoadRequest,
    ExplanationsRequest,
    GenerationsResponse,
    LogprobsRequest,
    LogprobsResponse,
    ModelCard,
    ModelsResponse,
    PromptedSamples,
    RolloutsRequest,
    encode_topk,
    sample_from_generation,
)

log = logging.getLogger("ssb.teacher")


class Refused(ServiceError):
    """A request the teacher refuses, with the HTTP status and error type of its class."""

    status, type = 400, "invalid_request"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(self.status, message, self.type, param)


class InvalidRequest(Refused):
    pass


class NotFound(Refused):
    status, type = 404, "not_found"


class Conflict(Refused):
    status, type = 409, "conflict"


class Overloaded(Refused):
    status, type = 429, "overloaded"


def engine_options(settings: TeacherSettings, model_path: str) -> EngineOptions:
    return EngineOptions(
        model=model_path,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_logprobs=settings.max_logprobs,
        kv_cache_gib=settings.kv_cache_gib,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        seed=settings.seed,
        enable_lora=settings.enable_lora,
        max_lora_rank=settings.max_lora_rank,
    )


def resolve_adapter_dir(adapters_dir: Path, relative: str, param: str) -> Path:
    """The adapter directory `relative` names inside `adapters_dir`; nothing outside it (no `..`, no absolute path,
    no symlink out of it)."""
    parts = PurePosixPath(relative).parts
    if relative.startswith(("/", "\\")) or PurePosixPath(relative).is_absolute() or ".." in parts or "\\" in relative:
        raise InvalidRequest(f"{param} {relative!r}: must be a plain path inside the adapters directory", param=param)
    root = adapters_dir.resolve()
    try:
        candidate = (root / relative).resolve()
        has_config = (candidate / "adapter_config.json").is_file()
    except (ValueError, OSError) as exc:  # a NUL byte; a name longer than the filesystem allows; no permission
        raise InvalidRequest(f"{param} {relative!r}: not a usable path: {exc}", param=param) from exc
    if not candidate.is_relative_to(root):
        raise InvalidRequest(f"{param} {relative!r}: leads outside the adapters directory", param=param)
    if not has_config:
        raise NotFound(f"{param} {relative!r}: no adapter_config.json there in the adapters directory", param=param)
    return candidate


# How long the copy of a replaced or unloaded adapter stays once no request that may use it runs: the engine hears of
# a request given up (a client gone) a moment after the service stops waiting for it.
RETIRED_COPY_GRACE_SECONDS = 60.0


def snapshot_adapter(directory: Path, into: Path) -> Path:
    """Copy an adapter's files (its config and weights, and whatever else lies beside them, but no subdirectory: a
    training run's checkpoints stay) into `into`, a directory of the engine's own that nothing else writes.

    vLLM keeps only a few adapters in memory (`max_loras`) and reads one again from its path whenever a step needs one
    it dropped, also for a request that was running when the adapter was replaced or unloaded; a directory deleted or
    half-rewritten by then (a training run publishing its adapter again) would kill the engine, not fail one request.
    A copy per load also gives each load a path of its own, and vLLM keys its prefix cache by an adapter's name and
    path: a replaced adapter's requests never reuse the previous weights' cached work. A replaced or unloaded
    adapter's copy goes once the requests that may use it have ended (`RetiredCopies`), the rest when the engine stops
    (they live in its IPC directory)."""
    into.mkdir(parents=True)
    for path in directory.iterdir():
        if path.is_file() and not path.is_symlink():  # a link could lead outside the adapters directory
            shutil.copy2(path, into / path.name)
    return into


class RetiredCopies:
    """The copies of adapters replaced or unloaded, each deleted `grace_seconds` after every engine request admitted
    before it was retired has ended (however long such a request waits in the engine's queue, it may need vLLM to read
    the copy again; a request that never ends keeps the copies retired while it runs). Looked at whenever a request
    ends and whenever a copy is retired; those left go with the engine's IPC directory."""

    def __init__(self, grace_seconds: float = RETIRED_COPY_GRACE_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.grace_seconds = grace_seconds
        self.clock = clock
        self._next_request = 0
        self._running: set[int] = set()  # the numbers of the requests admitted and not ended
        # [first request admitted after its retirement, when the last request before that ended (None: runs), copy]
        self._copies: list[list] = []

    @contextmanager
    def request(self):
        """One admitted request, from its admission until it has ended."""
        number = self._next_request
        self._next_request += 1
        self._running.add(number)
        try:
            yield
        finally:
            self._running.discard(number)
            self.sweep()

    def retire(self, copy: Path) -> None:
        self._copies.append([self._next_request, None, copy])
        self.sweep()

    def sweep(self) -> None:
        now = self.clock()
        oldest_running = min(self._running, default=self._next_request)
        kept = []
        for entry in self._copies:
            first_after, unused_since, copy = entry
            if unused_since is None and oldest_running >= first_after:
                entry[1] = unused_since = now
            if unused_since is not None and now - unused_since >= self.grace_seconds:
                shutil.rmtree(copy, ignore_errors=True)
            else:
                kept.append(entry)
        self._copies = kept

    def __len__(self) -> int:
        return len(self._copies)


class TeacherService:
    """One async vLLM engine on one base model, its tokenizer, and the LoRA adapters loaded into it."""

    def __init__(self, engine, options: EngineOptions, settings: TeacherSettings, served_name: str, ipc_dir: str):
        self.engine = engine
        self.ipc_dir = ipc_dir
        self.options = options
        self.settings = settings
        self.served_name = served_name
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len = engine.model_config.max_model_len
        self.vocab_size = engine.model_config.get_vocab_size()
        self.lora_requests: dict = {}
        self.adapter_paths: dict[str, str] = {}
        self._lora_ids = itertools.count(1)
        self._adapter_lock = asyncio.Lock()
        self.retired_copies = RetiredCopies()
        # Prompts are rendered and tokenized off the event loop (a request of many long questions takes seconds), on
        # one thread: the tokenizer is not safe to call from several at once.
        self._renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssb-render")
        self.pending = 0

    @classmethod
    def start(cls, settings: TeacherSettings) -> TeacherService:
        """Build the engine on the settings' model (blocking: about half a minute for the small model on the CPU)."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        model_path = resolve_model(settings.model, settings)
        options = engine_options(settings, model_path)
        served_names = list(dict.fromkeys([settings.model, model_path]))
        args = AsyncEngineArgs(**engine_kwargs(options), served_model_name=served_names, disable_log_stats=False)
        with engine_environment() as ipc_dir:
            engine = AsyncLLM.from_engine_args(args)
        try:
            return cls(engine, options, settings, served_names[0], ipc_dir)
        except BaseException:  # the tokenizer or the model's configuration unreadable: the engine goes too
            engine.shutdown()
            remove_ipc_directory(ipc_dir)
            raise

    @property
    def model_name(self) -> str:
        """The base model as pairs record it (the same string as the in-process engine's)."""
        return self.options.model

    @functools.cached_property
    def dtype(self) -> str:
        """The dtype the engine computes in (`auto` resolved), read once."""
        return resolved_dtype(self.options.dtype)

    @property
    def ready(self) -> bool:
        return not self.engine.errored

    def close(self) -> None:
        """Stop the engine's processes, and remove the IPC sockets they leave."""
        self._renderer.shutdown(wait=False, cancel_futures=True)
        try:
            self.engine.shutdown()
        finally:
            remove_ipc_directory(self.ipc_dir)

    @contextmanager
    def admitted(self, requests: int, param: str):
        """Admit `requests` engine requests, or raise Overloaded when that would pass `max_pending_requests`: a call is
        admitted before its prompts are rendered, and counts until its generation ends. More than the bound at once is
        refused as invalid (`param` names the list): no wait would admit it."""
        limit = self.settings.max_pending_requests
        if requests > limit:  # never admissible: waiting would not help
            raise InvalidRequest(
                f"{requests} engine requests in one request (one per prompt; on the OpenAI routes, per sample too); "
                f"this teacher admits at most {limit} at once (SSB_MAX_PENDING_REQUESTS): split the request",
                param=param,
            )
        if self.pending + requests > limit:
            raise Overloaded(f"{self.pending} engine requests pending, {requests} more would pass the bound of {limit}")
        self.pending += requests
        try:
            with self.retired_copies.request():
                yield
        finally:
            self.pending -= requests

    def render(self, messages: Sequence[ChatMessage]) -> RenderedPrompt:
        return render_chat(self.tokenizer, messages)

    async def off_the_loop(self, work: Callable):
        """`work()` (rendering, tokenizing) on the renderer's thread, the event loop answering meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._renderer, work)

    async def render_all(self, conversations: Sequence[Sequence[ChatMessage]]) -> list[RenderedPrompt]:
        return await self.off_the_loop(lambda: [self.render(messages) for messages in conversations])

    def check_lora(self, param: str) -> None:
        if not self.options.enable_lora:
            raise Conflict(
                f"{param}: this teacher was started without LoRA support (SSB_ENABLE_LORA=false, `--no-lora`); it "
                "serves the base model only",
                param=param,
            )

    def lora_request(self, adapter: str | None, param: str = "adapter"):
        if adapter is None:
            return None
        self.check_lora(param)
        if adapter not in self.lora_requests:
            loaded = ", ".join(self.lora_requests) or "none"
            raise NotFound(f"{param}: no adapter named {adapter!r} is loaded (loaded: {loaded})", param=param)
        return self.lora_requests[adapter]

    def check_sampling(self, settings: SamplingSettings, prompt_tokens: int, param: str) -> None:
        """Refuse what the engine cannot do: k above `max_logprobs`, a prompt plus max_tokens over the context,
        settings vLLM refuses (e.g. n > 1 at temperature 0)."""
        from vllm.exceptions import VLLMError

        try:
            sampling_params(settings)
        except (ValueError, VLLMError) as exc:
            raise InvalidRequest(f"{param}: {exc}", param=param) from exc
        if settings.logprobs is not None and settings.logprobs > self.options.max_logprobs:
            raise InvalidRequest(
                f"{param}.logprobs: {settings.logprobs} is above the engine's max_logprobs "
                f"{self.options.max_logprobs} (refused, not truncated)",
                param=f"{param}.logprobs",
            )
        overflow = prompt_tokens + settings.max_tokens - self.max_model_len
        if overflow > 0:
            raise InvalidRequest(
                f"{param}.max_tokens: the prompt's {prompt_tokens} tokens plus max_tokens {settings.max_tokens} "
                f"exceed the context length {self.max_model_len} by {overflow} tokens",
                param=f"{param}.max_tokens",
            )

    async def generate_one(self, prompt: RenderedPrompt, settings: SamplingSettings, lora_request) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        final = None
        params = sampling_params(settings, final_only=True)
        request_id = uuid.uuid4().hex
        async for output in self.engine.generate(
            TokensPrompt(prompt_token_ids=prompt.token_ids), params, request_id, lora_request=lora_request
        ):
            final = output
        return [generation_from_completion(c, settings.logprobs) for c in final.outputs]

    async def generate_all(
        self, prompts: list[RenderedPrompt], settings: list[SamplingSettings], params: list[str], adapter: str | None
    ) -> list[list[Generation]]:
        """Every prompt as its own engine request, submitted together so that the engine batches them. The adapter is
        looked up here, with no await before the requests are submitted: an adapter replaced meanwhile is not used."""
        lora_request = self.lora_request(adapter)
        for prompt, setting, param in zip(prompts, settings, params, strict=True):
            self.check_sampling(setting, len(prompt.token_ids), param)
        try:  # one request failing cancels (and so aborts in the engine) the others: none runs on unadmitted
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self.generate_one(p, s, lora_request))
                    for p, s in zip(prompts, settings, strict=True)
                ]
        except BaseExceptionGroup as group_error:
            raise group_error.exceptions[0] from None
        return [task.result() for task in tasks]

    def response(
        self, prompts: list[RenderedPrompt], outputs: list[list[Generation]], adapter: str | None, encoding: str
    ) -> GenerationsResponse:
        return GenerationsResponse(
            model=self.model_name,
            adapter=adapter,
            prompt_version=PROMPT_VERSION,
            results=[
                PromptedSamples(prompt=p, samples=[sample_from_generation(g, encoding) for g in gens])
                for p, gens in zip(prompts, outputs, strict=True)
            ],
        )

    async def rollouts(self, request: RolloutsRequest) -> GenerationsResponse:
        questions = [q.question for q in request.questions]
        settings = [q.sampling or request.sampling for q in request.questions]
        params = [f"questions.{i}.sampling" if q.sampling else "sampling" for i, q in enumerate(request.questions)]
        with self.admitted(len(questions), "questions"):
            prompts = await self.render_all(rollout_messages(questions, worked_example=request.worked_example))
            outputs = await self.generate_all(prompts, settings, params, request.adapter)
        return self.response(prompts, outputs, request.adapter, request.topk_encoding)

    async def explanations(self, request: ExplanationsRequest) -> GenerationsResponse:
        items = [HintedQuestion(**item.model_dump(exclude={"sampling"})) for item in request.items]
        settings = [item.sampling or request.sampling for item in request.items]
        params = [f"items.{i}.sampling" if item.sampling else "sampling" for i, item in enumerate(request.items)]
        with self.admitted(len(items), "items"):
            prompts = await self.render_all(explanation_messages(items, worked_example=request.worked_example))
            outputs = await self.generate_all(prompts, settings, params, request.adapter)
        return self.response(prompts, outputs, request.adapter, request.topk_encoding)

    async def logprobs(self, request: LogprobsRequest) -> LogprobsResponse:
        """Score the reply's tokens under the prompt in one forward pass (`prompt_logprobs`, no temperature)."""
        from jinja2 import TemplateError
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if request.k > self.options.max_logprobs:
            raise InvalidRequest(
                f"k: {request.k} is above the engine's max_logprobs {self.options.max_logprobs} "
                "(refused, not truncated)",
                param="k",
            )
        self.lora_request(request.adapter)  # an unknown adapter is refused before any work
        with self.admitted(1, "messages"):
            try:
                prompt_ids = request.prompt_token_ids or (await self.render_all([request.messages]))[0].token_ids
            except TemplateError as exc:  # a chat template that refuses these turns (e.g. roles must alternate)
                message = f"messages: the model's chat template refused them: {exc}"
                raise InvalidRequest(message, param="messages") from exc
            reply_ids = request.reply_token_ids or await self.off_the_loop(
                lambda: self.tokenizer.encode(request.reply_text, add_special_tokens=False)
            )
            for field, ids in (("prompt_token_ids", prompt_ids), ("reply_token_ids", reply_ids)):
                bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
                if bad is not None:
                    message = f"{field}: token id {bad} is outside the vocabulary of {self.vocab_size}"
                    raise InvalidRequest(message, param=field)
            overflow = len(prompt_ids) + len(reply_ids) + 1 - self.max_model_len
            if overflow > 0:
                raise InvalidRequest(
                    f"reply: {len(prompt_ids)} prompt and {len(reply_ids)} reply tokens exceed the context length "
                    f"{self.max_model_len} by {overflow} tokens",
                    param="reply_token_ids" if request.reply_token_ids else "reply_text",
                )
            params = SamplingParams(
                max_tokens=1, temperature=0.0, prompt_logprobs=request.k, output_kind=RequestOutputKind.FINAL_ONLY
            )
            final = None
            lora_request = self.lora_request(request.adapter)  # again, after the await: the adapter loaded now
            async for output in self.engine.generate(
                TokensPrompt(prompt_token_ids=list(prompt_ids) + list(reply_ids)),
                params,
                uuid.uuid4().hex,
                lora_request=lora_request,
            ):
                final = output
        positions = final.prompt_logprobs[len(prompt_ids) :]
        pairs = [topk_from_vllm(position, request.k) for position in positions]
        return LogprobsResponse(
            model=self.model_name,
            adapter=request.adapter,
            prompt_token_ids=list(prompt_ids),
            reply_token_ids=list(reply_ids),
            logprobs=[float(position[token].logprob) for position, token in zip(positions, reply_ids, strict=True)],
            topk=encode_topk([i for i, _ in pairs], [lp for _, lp in pairs], request.topk_encoding),
        )

    def models(self) -> ModelsResponse:
        adapters = [AdapterCard(name=name, path=path) for name, path in self.adapter_paths.items()]
        return ModelsResponse(
            data=[ModelCard(id=self.served_name)] + [ModelCard(id=a.name, parent=self.served_name) for a in adapters],
            model=self.model_name,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            max_logprobs=self.options.max_logprobs,
            dtype=self.dtype,
            adapters=adapters,
            max_pending_requests=self.settings.max_pending_requests,
        )

    async def load_adapter(self, request: AdapterLoadRequest) -> AdapterCard:
        """Load an adapter from the adapters directory under a name; a loaded name needs `replace`. The engine loads
        a copy of its own (`snapshot_adapter`), not the directory, which a training run may rewrite later."""
        from vllm.exceptions import VLLMServerError
        from vllm.lora.request import LoRARequest

        self.check_lora("name")
        if request.name in (self.served_name, self.model_name):
            message = f"name: {request.name!r} is the base model's name; an adapter under it would take its place"
            raise Conflict(message, param="name")
        relative = request.path or request.name
        directory = resolve_adapter_dir(self.settings.adapters_dir, relative, "path" if request.path else "name")
        async with self._adapter_lock:
            previous = self.lora_requests.get(request.name)
            if previous is not None and not request.replace:
                raise Conflict(
                    f"name: an adapter named {request.name!r} is loaded already; use a new name, or replace=true",
                    param="name",
                )
            lora_id = next(self._lora_ids)
            copy = Path(self.ipc_dir) / "adapters" / str(lora_id)
            try:
                snapshot = await asyncio.to_thread(snapshot_adapter, directory, copy)
            except OSError as exc:
                shutil.rmtree(copy, ignore_errors=True)
                if not isinstance(exc, FileNotFoundError):  # a full disk, no permission: the teacher's own trouble
                    log.exception("adapter %s: its files could not be copied from %s", request.name, relative)
                    reason = exc.strerror or str(exc)  # the copy's path left out
                    message = f"path {relative!r}: the teacher could not copy the adapter's files: {reason}"
                    raise ServiceError(500, message, "copy_failed", "path") from exc
                # A run publishing its adapter again while it was read (the directory replaced whole)
                message = f"path {relative!r}: its files changed while being read ({exc}); retry"
                raise Conflict(message, param="path") from exc
            # A name of its own in the engine: vLLM tells adapters apart by name, so two loads under one (a replaced
            # adapter's requests still running beside its replacement's) would be one adapter in a batch there, the
            # other left out of the batch's slots: the engine dies. Answers name it as loaded (`public_name`).
            lora_request = LoRARequest(f"{request.name}@{lora_id}", lora_id, str(snapshot))
            try:
                await self.engine.add_lora(lora_request)
            except Exception as exc:  # the engine says why it cannot load these weights
                shutil.rmtree(snapshot, ignore_errors=True)
                if isinstance(exc, VLLMServerError):  # the engine's failure (it died), not the adapter's: 503
                    raise
                raise InvalidRequest(f"path {relative!r}: the engine could not load it: {exc}", param="path") from exc
            # The name serves the new weights from here on, also while the engine removes the previous ones (a
            # utility call between two engine steps: on a CPU, minutes), whose requests still running read its copy.
            self.lora_requests[request.name] = lora_request
            self.adapter_paths[request.name] = relative
            if previous is not None:
                self.retired_copies.retire(Path(previous.lora_path))
                await self.engine.remove_lora(previous.lora_int_id)
        log.info("adapter %s loaded from %s", request.name, relative)
        return AdapterCard(name=request.name, path=relative)

    def public_name(self, lora_request) -> str:
        """The name an adapter was loaded under (the engine's, `<name>@<load id>`, less its load id); the served
        model's name for none."""
        if lora_request is None:
            return self.served_name
        return lora_request.lora_name.rpartition("@")[0] or lora_request.lora_name

    async def unload_adapter(self, name: str) -> None:
        async with self._adapter_lock:
            lora_request = self.lora_request(name, param="name")
            del self.lora_requests[name]
            del self.adapter_paths[name]
            await self.engine.remove_lora(lora_request.lora_int_id)
            self.retired_copies.retire(Path(lora_request.lora_path))
        log.info("adapter %s unloaded", name)

