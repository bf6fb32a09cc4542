"""The teacher engine: a vLLM engine on one model, rendering chats and generating with per-token top-k log-probabilities.

Everything that talks to vLLM goes through `TeacherEngine`: the one-process curation, evaluation, and (later) the teacher
service. Prompts are rendered with the model's own chat template and sent as token ids, so what is stored is exactly
what the model read. Log-probabilities come from vLLM's default `raw_logprobs` mode: the unmodified model distribution,
before temperature, top-k and top-p are applied (tests/services/teacher/test_engine.py proves it against a scoring pass).

Build it under an `if __name__ == "__main__":` guard: vLLM starts its workers with spawn (on a GPU; on a CPU the
synchronous engine runs in the calling process, `runs_in_process`). `engine_kwargs` is the one
definition of how an engine is built, shared by this synchronous engine and the teacher service's async one.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

from tqdm import tqdm

from shared.engine import PromptingEngine
from shared.prompts import render_chat
from shared.schemas import ChatMessage, Generation, RenderedPrompt, SamplingSettings

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two lines at every engine start that are not the user's to act on: the CPU build of vLLM saying that Triton has no
# CPU backend, and torch's deprecation of an alias that vLLM's kernel dispatcher touches.
logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)


SequenceReport = Callable[[int, int], None]  # (sequences finished, sequences in the engine call)


class FinishedSequences(tqdm):
    """What `LLM.generate(use_tqdm=...)` builds for one call and advances by each finished request's sequences: shows
    nothing itself, and passes (finished, total) to `report`. (vLLM also wraps the prompts it renders in one; iterating
    it does not call `update`.)"""

    monitor_interval = 0  # no tqdm monitor thread

    def __init__(self, *args, report: SequenceReport, sequences: int, **kwargs):
        super().__init__(*args, **{**kwargs, "file": io.StringIO()})
        self.report, self.sequences = report, sequences

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        self.report(min(int(self.n), self.sequences), self.sequences)
        return shown


@dataclass(frozen=True)
class EngineOptions:
    """How the engine is built (eager mode: what the CPU build of vLLM supports best). `dtype="auto"` is
    `native_dtype()`."""

    model: str
    dtype: str = "auto"
    max_model_len: int = 4096
    max_logprobs: int = 64
    kv_cache_gib: float = 2
    gpu_memory_utilization: float = 0.9  # the share of the GPU's memory vLLM takes (weights and KV cache)
    enable_lora: bool = True
    max_lora_rank: int = 32
    max_loras: int = 2
    seed: int = 0
    kv_block_tokens: int | None = None  # None: CPU_KV_BLOCK_TOKENS on a CPU, vLLM's default on a GPU
    cpu_threads: str = "auto"  # "auto": `cpu_thread_environment` on a CPU; "vllm": vLLM's own binding, untouched


def native_dtype() -> str:
    """bfloat16 where the hardware computes in it (a GPU; a CPU with AVX512-BF16 or AMX), float32 elsewhere.

    On a CPU with AVX2 only, the CPU build of vLLM emulates bfloat16 products: measured on a 2-core AVX2 machine,
    float32 generated 3.2 times the tokens per second of bfloat16 (53 against 16.7).
    """
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False
    )()
    return "bfloat16" if native else "float32"


def resolved_dtype(dtype: str) -> str:
    """The dtype an engine set to `dtype` computes in: `auto` is `native_dtype()`."""
    return native_dtype() if dtype == "auto" else dtype


def cpu_thread_environment(cores: int) -> dict[str, str]:
    """How vLLM's CPU build should bind its threads on a machine with `cores` usable cores.

    By default it reserves a core for the engine-core process (the scheduler, which busy-polls) and binds the model's
    threads to the rest: on 2 cores the model computes on one thread. On small machines every core goes to the model
    and none is reserved (docs/BENCHMARKS.md, "Engine threads": measured with `python -m benchmarks.engine_threads`).
    """
    if cores > 4:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def apply_cpu_thread_environment() -> None:
    """Set `cpu_thread_environment` for this machine's cores, leaving any variable the user set alone."""
    for name, value in cpu_thread_environment(len(os.sched_getaffinity(0))).items():
        os.environ.setdefault(name, value)


MULTIPROCESSING = "VLLM_ENABLE_V1_MULTIPROCESSING"
RPC_BASE_PATH = "VLLM_RPC_BASE_PATH"

# Tokens per KV-cache block on a CPU: the smallest the CPU build's attention takes (its default is 128). Prefix caching
# shares whole blocks only, and every prompt opens with the same system turn and worked example (about 120 tokens):
# with 128-token blocks none of it is shared, with 32 nearly all. The demo's 400 evaluation prompts on a fresh engine:
# 49 s against 78 s, 397 of 400 answers the same (docs/BENCHMARKS.md, "KV-cache block size").
CPU_KV_BLOCK_TOKENS = 32


def runs_in_process(*, on_gpu: bool, another_in_process: bool) -> bool:
    """Whether a synchronous engine runs its scheduler and its model in the calling process instead of two processes
    of their own. Each of those imports vLLM and torch again, so on a CPU the engine is ready in 5 s instead of 21 s
    (2-core machine), closes in a second, and generates as fast (docs/BENCHMARKS.md, "Engine start").
    Not on a GPU (vLLM frees the GPU's memory reliably only with a process of its own), and one at a time: closing an
    in-process engine tears down the process's distributed state that another in-process engine would still use. A
    value of VLLM_ENABLE_V1_MULTIPROCESSING the user set wins."""
    if MULTIPROCESSING in os.environ:
        return os.environ[MULTIPROCESSING] == "0"
    return not on_gpu and not another_in_process


class EngineEnvironmentError(RuntimeError):
    """The environment names a place the engine cannot use."""


@contextmanager
def engine_environment(*, in_process: bool | None = None) -> Iterator[str]:
    """vLLM's variables set while one engine is built, and restored after, so that processes started later (a teacher
    service, whose async engine needs its core in a process of its own) keep vLLM's defaults: for a synchronous
    engine, whether its core runs in this process; for every engine, where its processes put their IPC sockets. vLLM
    leaves those socket files behind when an engine stops (three for each engine whose core runs in a process of its
    own), so each engine gets a new directory for them (yielded), inside vLLM's `VLLM_RPC_BASE_PATH` (by default the
    system's temporary directory), and removes it when it closes (`remove_ipc_directory`), or here if the build fails.
    The directory's name is short: a socket's whole path must stay under 108 bytes. vLLM caches its environment when
    an engine core starts; the cache is dropped on both sides so the next engine reads it again."""
    import vllm.envs

    base = os.environ.get(RPC_BASE_PATH) or None  # empty counts as unset: mkdtemp(dir="") would make a relative path
    try:
        ipc_dir = tempfile.mkdtemp(prefix="ssb-", dir=base)
    except OSError as exc:
        where = f"{RPC_BASE_PATH}={base}" if base else f"the temporary directory {tempfile.gettempdir()}"
        raise EngineEnvironmentError(
            f"cannot make the engine's IPC socket directory in {where} ({exc.strerror}); "
            f"set {RPC_BASE_PATH} to a writable directory"
        ) from exc
    variables = {RPC_BASE_PATH: ipc_dir}
    if in_process is not None:
        variables[MULTIPROCESSING] = "0" if in_process else "1"
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    vllm.envs.disable_envs_cache()
    try:
        yield ipc_dir
    except BaseException:
        remove_ipc_directory(ipc_dir)
        raise
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
        vllm.envs.disable_envs_cache()


def remove_ipc_directory(path: str) -> None:
    """Remove an engine's IPC directory and the sockets its processes left in it."""
    shutil.rmtree(path, ignore_errors=True)


def engine_kwargs(options: EngineOptions) -> dict:
    """The engine's arguments (for `vllm.LLM` and `AsyncEngineArgs` alike), with the environment set for them."""
    import torch

    on_gpu = torch.cuda.is_available()
    if options.cpu_threads == "auto" and not on_gpu:
        apply_cpu_thread_environment()
    return dict(
        model=options.model,
        dtype=resolved_dtype(options.dtype),
        max_model_len=options.max_model_len,
        max_logprobs=options.max_logprobs,
        enforce_eager=True,
        enable_lora=options.enable_lora,
        max_lora_rank=options.max_lora_rank,
        max_loras=options.max_loras,
        seed=options.seed,
        gpu_memory_utilization=options.gpu_memory_utilization,
        # Per-request seeds crash the CPU build when a prefill is split across steps (its CPU generators cannot
        # rewind), so prompts are prefilled whole.
        enable_chunked_prefill=False,
        max_num_batched_tokens=step_token_budget(options, on_gpu=on_gpu),
        **kv_block_kwargs(options, on_gpu=on_gpu),
        **kv_cache_kwargs(options, on_gpu=on_gpu),
        **executor_kwargs(on_gpu=on_gpu),
    )


def executor_kwargs(*, on_gpu: bool) -> dict:
    """On a CPU, the model runs in the engine core's own process, as on one GPU. Where the core has a process of its
    own (the teacher service, a second engine of a process), vLLM's CPU build otherwise starts the model in a third
    process, which imports vLLM and torch once more: ready in 9 s instead of 19 s on a 2-core machine, at the same
    tokens/s, with one process and about 650 MB fewer (docs/BENCHMARKS.md, "Engine start"). vLLM replaces the name
    "uni" with its multiprocess executor on a CPU, not the executor's class, so the class is what is passed."""
    if on_gpu:
        return {}
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    return {"distributed_executor_backend": UniProcExecutor}


def kv_cache_kwargs(options: EngineOptions, *, on_gpu: bool) -> dict:
    """The KV cache's size on a CPU, as this engine's own argument: an engine built later in the same process (or a
    service it starts) gets its own size instead of inheriting the first one's through the environment.
    `VLLM_CPU_KVCACHE_SPACE`, where the user sets it, still wins (vLLM applies it over the argument). On a GPU the
    cache takes what `gpu_memory_utilization` leaves."""
    return {} if on_gpu else {"kv_cache_memory_bytes": int(options.kv_cache_gib * 2**30)}


def kv_block_kwargs(options: EngineOptions, *, on_gpu: bool) -> dict:
    """The KV cache's block size, where the options or the device ask for one other than vLLM's default."""
    if options.kv_block_tokens is not None:
        return {"block_size": options.kv_block_tokens}
    return {} if on_gpu else {"block_size": CPU_KV_BLOCK_TOKENS}


def step_token_budget(options: EngineOptions, *, on_gpu: bool) -> int:
    """Most prompt tokens one engine step may prefill (whole prompts, so at least `max_model_len`).

    On a CPU with LoRA enabled the budget is one context's worth: the CPU build's LoRA path is far slower than the base
    model and its cost grows with the tokens in a step (57 LoRA prompts, 8,182 tokens, outlasted vLLM's 300 s step
    timeout on a slow 2-core machine). Evaluation serves adapters merged on a CPU, so this only bounds LoRA requests.
    """
    if options.enable_lora and not on_gpu:
        return options.max_model_len
    return max(options.max_model_len, 8192)


def topk_from_vllm(position_logprobs: dict, k: int) -> tuple[list[int], list[float]]:
    """The top-k (ids, log-probabilities) of one position, by rank; vLLM adds the sampled token when it is outside."""
    ranked = sorted(position_logprobs.items(), key=lambda item: item[1].rank)
    ranked = [(token_id, lp) for token_id, lp in ranked if lp.rank is not None and lp.rank <= k][:k]
    return [token_id for token_id, _ in ranked], [float(lp.logprob) for _, lp in ranked]


def sampling_params(settings: SamplingSettings, *, final_only: bool = False):
    """vLLM's sampling parameters for one request. `final_only` makes the async engine return all `n` samples in one
    final output (its default streaming kind keeps only one of them in the last item)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra = {"output_kind": RequestOutputKind.FINAL_ONLY} if final_only else {}
    return SamplingParams(
        n=settings.n,
        temperature=settings.temperature,
        top_k=settings.top_k if settings.top_k > 0 else -1,
        top_p=settings.top_p,
        max_tokens=settings.max_tokens,
        seed=settings.seed,
        logprobs=settings.logprobs,
        **extra,
    )


def generation_from_completion(completion, k: int | None) -> Generation:
    """One vLLM `CompletionOutput` as a `Generation`; with `k`, the top-k ids and log-probabilities of every token."""
    topk_ids = topk_logprobs = None
    if k:
        pairs = [topk_from_vllm(position, k) for position in completion.logprobs]
        topk_ids = [ids for ids, _ in pairs]
        topk_logprobs = [lps for _, lps in pairs]
    return Generation(
        text=completion.text,
        token_ids=list(completion.token_ids),
        finish_reason=completion.finish_reason,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
    )


class TeacherEngine(PromptingEngine):
    """A vLLM engine plus the model's tokenizer. `generate` batches all prompts into one engine call."""

    in_process_engines: ClassVar[int] = 0  # engines of this process running in it (`runs_in_process`): 0 or 1

    def __init__(self, options: EngineOptions):
        import torch
        from vllm import LLM

        threads = torch.get_num_threads()
        self.options = options
        self.in_process = runs_in_process(
            on_gpu=torch.cuda.is_available(), another_in_process=TeacherEngine.in_process_engines > 0
        )
        with engine_environment(in_process=self.in_process) as self.ipc_dir:
            self.llm = LLM(**engine_kwargs(options))
        TeacherEngine.in_process_engines += self.in_process
        # vLLM drops this process's torch threads to 1 "for serving"; give them back to the in-process model, or to
        # whatever else this process does (training, in `ssb run`).
        torch.set_num_threads(threads)
        self.tokenizer = self.llm.get_tokenizer()
        self._lora_ids: dict[str, int] = {}
        self._report: SequenceReport | None = None
        self.closed = False

    def close(self) -> None:
        """Stop the engine now (its processes, or its core in this process); left to interpreter exit, their threads
        can abort the process."""
        if self.closed:
            return
        try:
            self.llm.llm_engine.engine_core.shutdown()
        finally:
            remove_ipc_directory(self.ipc_dir)
        self.closed = True
        TeacherEngine.in_process_engines -= self.in_process

    def __enter__(self) -> TeacherEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def model_name(self) -> str:
        return self.options.model

    @property
    def dtype(self) -> str:
        """The dtype the engine computes in (`auto` resolved)."""
        return resolved_dtype(self.options.dtype)

    def load_weights(self, checkpoint: str | Path) -> None:
        """Replace the model's weights in place with those of `checkpoint`, a checkpoint of the same architecture (an
        adapter merged into the base weights, services/teacher/merging.py): a second or a few seconds instead of a new
        engine's start. The prefix cache is emptied, since its blocks were computed with the old weights (kept, they
        would answer a prompt seen before partly as the old model). `model_name` stays the engine's model."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(checkpoint)})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("the engine could not empty its prefix cache after loading new weights")

    def render(self, messages: Sequence[ChatMessage]) -> RenderedPrompt:
        """Render a chat with the model's chat template, ending with the assistant's turn opened."""
        return render_chat(self.tokenizer, messages)

    @contextmanager
    def reporting(self, report: SequenceReport) -> Iterator[None]:
        """Within the block, each `generate` call calls `report(finished, total)` when it starts and as its sequences
        finish (a request with `n` samples is `n` sequences), so that progress moves inside one long batched call."""
        self._report = report
        try:
            yield
        finally:
            self._report = None

    def _progress_hook(self, sequences: int):
        """vLLM's `use_tqdm` for one call of `sequences` sequences: False when nobody is told."""
        if self._report is None:
            return False
        self._report(0, sequences)
        return partial(FinishedSequences, report=self._report, sequences=sequences)

    def _lora_request(self, adapter: str | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        path = str(Path(adapter).resolve())
        lora_id = self._lora_ids.setdefault(path, len(self._lora_ids) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, path)

    def generate(
        self,
        prompts: Sequence[RenderedPrompt],
        sampling: SamplingSettings | Sequence[SamplingSettings],
        *,
        adapter: str | None = None,
    ) -> list[list[Generation]]:
        """Generate for every prompt in one batched engine call; returns `n` generations per prompt, in order."""
        from vllm.inputs import TokensPrompt

        settings = [sampling] * len(prompts) if isinstance(sampling, SamplingSettings) else list(sampling)
        if len(settings) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(settings)} sampling settings")
        params = [sampling_params(s) for s in settings]
        inputs = [TokensPrompt(prompt_token_ids=p.token_ids) for p in prompts]
        outputs = self.llm.generate(
            inputs,
            params,
            use_tqdm=self._progress_hook(sum(s.n for s in settings)),
            lora_request=self._lora_request(adapter),
        )
        return [
            [generation_from_completion(completion, s.logprobs) for completion in output.outputs]
            for output, s in zip(outputs, settings, strict=True)
        ]

    def score(
        self,
        prompt_token_ids: Sequence[int],
        completion_token_ids: Sequence[int],
        k: int,
        *,
        adapter: str | None = None,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """Top-k (ids, log-probabilities) of the model (with the LoRA `adapter` directory, if given) at each completion
        position, given the prompt, in one pass."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = list(prompt_token_ids) + list(completion_token_ids)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        (output,) = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False, lora_request=self._lora_request(adapter)
        )
        positions = output.prompt_logprobs[len(prompt_token_ids) :]
        pairs = [topk_from_vllm(position, k) for position in positions]
        return [i for i, _ in pairs], [lp for _, lp in pairs]
