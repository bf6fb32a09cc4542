"""A typed HTTP client of the teacher service that implements `shared.engine.Engine`, so `curate()` and `evaluate()`
run against a remote teacher unchanged.

    with TeacherClient("http://teacher:8000", api_key=...) as teacher:
        curate(problems, teacher, store, config)

Every call has explicit timeouts; connection errors, 502 and 503 (not ready) are retried with exponential backoff
(honouring Retry-After) up to `retries` times, and 429 (busy with other clients' work) for up to `busy_wait_seconds`,
then raise `TeacherUnavailable`. A POST that got no answer within the read timeout, or a 504, raises `TeacherTimedOut`
and is not sent again (nor to another service of a pool): the teacher aborted it, and it would take as long again.
Any other 4xx raises `TeacherRejected` with the service's message (which names the field). Top-k arrays travel in the
compact base64 encoding. Adapters are names of adapters in the service's adapters directory; the client loads one on
first use. `TeacherPool` spreads calls over several teacher services.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TypeVar

import httpx

from shared.engine import ConcurrentCalls, HintedQuestion, PromptedGenerations, check_lengths
from shared.schemas import SamplingSettings
from shared.teacher_api import (
    MAX_BATCH,
    START_FAILED,
    AdapterCard,
    AdapterLoadRequest,
    ExplanationsRequest,
    GenerationsResponse,
    HintedItem,
    LogprobsRequest,
    LogprobsResponse,
    ModelsResponse,
    RolloutQuestion,
    RolloutsRequest,
)

# The longest wait between two tries, whatever Retry-After says.
MAX_WAIT_SECONDS = 30.0
# How long a busy teacher (429) is waited for; a pool's services each get a share of it.
BUSY_WAIT_SECONDS = 600.0
RETRIED_STATUSES = (502, 503)  # and 429 (busy) for up to `busy_wait_seconds`, and 504 for a GET
T = TypeVar("T")


class TeacherError(Exception):
    """A call to the teacher service failed."""


class TeacherUnavailable(TeacherError):
    """The service could not be reached, or stayed not ready or busy through every retry."""


class TeacherTimedOut(TeacherError):
    """A generation got no answer in time (the read timeout, or a gateway's 504): not sent again, to this service or
    another, since it would take as long there."""


class TeacherRejected(TeacherError):
    """The service refused the request (a 4xx): `status`, and its message naming the field in `param`."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(f"teacher refused the request ({status}): {message}")
        self.status = status
        self.message = message
        self.param = param


def default_timeout() -> httpx.Timeout:
    """Connect quickly; a batch of long generations may take minutes on a CPU."""
    return httpx.Timeout(connect=10.0, read=1800.0, write=60.0, pool=60.0)


class TeacherClient(ConcurrentCalls):
    """The teacher service over HTTP, as an `Engine`."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout | float | None = None,
        retries: int = 5,
        backoff_seconds: float = 0.5,
        busy_wait_seconds: float = BUSY_WAIT_SECONDS,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=timeout if timeout is not None else default_timeout(),
            transport=transport,
        )
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.busy_wait_seconds = busy_wait_seconds
        self.calls_at_once = 1  # calls sharing the teacher's bound now (`sharing_the_bound`)
        self._model: ModelsResponse | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def backoff(self, tries: int) -> float:
        """The wait after the `tries`-th refused try in a row: `backoff_seconds`, doubling each time."""
        return self.backoff_seconds * 2 ** min(tries - 1, 16)

    def request(self, method: str, path: str, json=None) -> httpx.Response:
        """One call, retried as the module docstring says, with exponential backoff (or the Retry-After, at most
        `MAX_WAIT_SECONDS`) and a little jitter, so that clients refused together do not come back together."""
        attempt, busy, busy_since = 0, 0, None  # failed tries (up to `retries`), and 429s (up to a time)
        while True:
            try:
                response = self.http.request(method, path, json=json)
            except httpx.TransportError as exc:
                if method == "POST" and isinstance(exc, httpx.ReadTimeout):
                    message = f"no answer within the read timeout ({self.http.timeout.read} s); sent again it would "
                    raise TeacherTimedOut(f"{method} {path}: {message}take as long: send smaller batches") from exc
                if attempt >= self.retries:
                    raise TeacherUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
                attempt += 1
                wait = self.backoff(attempt)
            else:
                status = response.status_code
                if status == 429:
                    busy_since = busy_since if busy_since is not None else time.monotonic()
                    if time.monotonic() - busy_since >= self.busy_wait_seconds:
                        waited = f"busy for {self.busy_wait_seconds:.0f} s"
                        raise TeacherUnavailable(f"{method} {path}: {waited}: {error_message(response)}")
                    busy += 1
                    wait = self.backoff(busy)
                elif status == 504 and method == "POST":
                    message = f"504 {error_message(response)}: a gateway gave up waiting; sent again it would again"
                    raise TeacherTimedOut(f"{method} {path}: {message}")
                elif status in RETRIED_STATUSES or status == 504:
                    if attempt >= self.retries:
                        raise TeacherUnavailable(f"{method} {path}: {status} {error_message(response)}")
                    attempt += 1
                    wait = self.backoff(attempt)
                else:
                    break
                wait = max(wait, retry_after_seconds(response))
            time.sleep(min(wait, MAX_WAIT_SECONDS) * random.uniform(1.0, 1.2))
        if response.status_code >= 400:
            message, param = error_message(response), error_field(response, "param")
            if response.status_code >= 500:
                raise TeacherError(f"{method} {path}: {response.status_code} {message}")
            raise TeacherRejected(response.status_code, message, param)
        return response

    def wait_ready(self, timeout_seconds: float = 300.0, unreachable_seconds: float | None = None) -> None:
        """Block until `/readyz` says ready, or raise TeacherUnavailable: at once when the teacher's engine failed to
        start (a 503 of type `start_failed`: no wait helps) or when the URL answers as no teacher does (e.g. a 404);
        after `unreachable_seconds` (default: the whole timeout) without the teacher's own answer (nothing listening
        there, or a gateway's 502, 503 or 504 with nothing behind it); after `timeout_seconds` in any case (an engine
        still loading: a 503 of type `not_ready`, or a 429)."""
        started = time.monotonic()
        unreachable_since = None
        while True:
            now = time.monotonic()
            try:
                response = self.http.get("/readyz", timeout=10.0)
                status, kind = response.status_code, error_field(response, "type")
                silence = None
                if status == 200:
                    return
                if status == 503 and kind == START_FAILED:
                    raise TeacherUnavailable(f"the teacher at {self.http.base_url} could not start its engine: "
                                             f"{error_message(response)}")
                if status in (502, 503, 504) and kind != "not_ready":  # a gateway's answer, no teacher's
                    silence = f"{status} from something in front of it"
                elif status not in (429, 503):  # a teacher's /readyz answers 200 or 503, and needs no key
                    raise TeacherUnavailable(f"{self.http.base_url}/readyz answered {status}, as no teacher does: "
                                             "is the URL right?")
            except httpx.TransportError as exc:
                silence = type(exc).__name__
            if silence is None:
                unreachable_since = None
            else:
                unreachable_since = unreachable_since if unreachable_since is not None else now
                if unreachable_seconds is not None and now - unreachable_since >= unreachable_seconds:
                    raise TeacherUnavailable(
                        f"no teacher answers at {self.http.base_url} ({silence}) after {now - unreachable_since:.0f} "
                        "s: is the teacher started, and is the URL right?"
                    )
            if now - started > timeout_seconds:
                raise TeacherUnavailable(f"{self.http.base_url} not ready after {timeout_seconds:.0f} s")
            time.sleep(0.5)

    def models(self) -> ModelsResponse:
        return ModelsResponse.model_validate_json(self.request("GET", "/v1/models").content)

    @property
    def model_name(self) -> str:
        """The base model as the service's engine names it (pairs record it)."""
        return self.served().model

    @property
    def max_logprobs(self) -> int:
        """The largest top-k of log-probabilities the service's engine returns (it refuses a request for more)."""
        return self.served().max_logprobs

    @property
    def dtype(self) -> str | None:
        """The dtype the service's engine computes in (None from a teacher of an earlier version)."""
        return self.served().dtype

    @property
    def batch_size(self) -> int:
        """Prompts sent in one request: `MAX_BATCH`, or fewer where the teacher admits fewer at once, its bound shared
        among the calls this client makes at once (`sharing_the_bound`)."""
        bound = self.served().max_pending_requests or MAX_BATCH
        return min(MAX_BATCH, max(1, bound // self.calls_at_once))

    @contextmanager
    def sharing_the_bound(self, calls: int = 2) -> Iterator[None]:
        """Within it, requests of at most 1/`calls` of what the teacher admits at once: curation's rollouts and
        explanations, sent together (`rollouts_and_explanations`), must never refuse each other (one would wait out
        the other's minutes on a CPU, then fail). A bound of 1 cannot be shared: the two then take turns."""
        before, self.calls_at_once = self.calls_at_once, calls
        try:
            yield
        finally:
            self.calls_at_once = before

    def served(self) -> ModelsResponse:
        """The teacher's model and limits, read once."""
        if self._model is None:
            self._model = self.models()
        return self._model

    def load_adapter(self, name: str, path: str | None = None, *, replace: bool = False) -> AdapterCard:
        body = AdapterLoadRequest(name=name, path=path, replace=replace)
        response = self.request("POST", "/v1/adapters", body.model_dump(mode="json"))
        return AdapterCard.model_validate_json(response.content)

    def unload_adapter(self, name: str) -> None:
        self.request("DELETE", f"/v1/adapters/{name}")

    def ensure_adapter(self, name: str) -> None:
        """Load the adapter of that name from the service's adapters directory unless it is loaded already (also
        when another client loaded it between the check and the load: the service's 409 then says so)."""
        if name in {a.name for a in self.models().adapters}:
            return
        try:
            self.load_adapter(name)
        except TeacherRejected as exc:
            if exc.status != 409 or name not in {a.name for a in self.models().adapters}:
                raise

    def rollouts(
        self,
        questions: Sequence[str],
        sampling: Sequence[SamplingSettings],
        *,
        worked_example: bool = False,
        adapter: str | None = None,
    ) -> list[PromptedGenerations]:
        check_lengths("questions", questions, sampling)
        if adapter is not None:
            self.ensure_adapter(adapter)
        results, size = [], self.batch_size
        for start in range(0, len(questions), size):
            body = RolloutsRequest(
                questions=[
                    RolloutQuestion(question=q, sampling=s)
                    for q, s in zip(questions[start : start + size], sampling[start : start + size])
                ],
                worked_example=worked_example,
                adapter=adapter,
            )
            results += self.post_generations("/v1/rollouts", body)
        return results

    def explanations(
        self,
        items: Sequence[HintedQuestion],
        sampling: Sequence[SamplingSettings],
        *,
        worked_example: bool = False,
    ) -> list[PromptedGenerations]:
        check_lengths("items", items, sampling)
        results, size = [], self.batch_size
        for start in range(0, len(items), size):
            body = ExplanationsRequest(
                items=[
                    HintedItem(**item.model_dump(), sampling=s)
                    for item, s in zip(items[start : start + size], sampling[start : start + size])
                ],
                worked_example=worked_example,
            )
            results += self.post_generations("/v1/explanations", body)
        return results

    def post_generations(self, path: str, body) -> list[PromptedGenerations]:
        """One generation request; one naming an adapter the teacher does not hold (it restarted since the adapter was
        loaded, or another replica answers) loads it and is sent once more."""
        payload = body.model_dump(mode="json", exclude_none=True)
        try:
            content = self.request("POST", path, payload).content
        except TeacherRejected as exc:
            adapter = payload.get("adapter")
            if adapter is None or exc.status != 404 or exc.param != "adapter":
                raise
            self.ensure_adapter(adapter)
            content = self.request("POST", path, payload).content
        response = GenerationsResponse.model_validate_json(content)
        return [
            PromptedGenerations(prompt=r.prompt, generations=[s.to_generation() for s in r.samples])
            for r in response.results
        ]

    def logprobs(self, request: LogprobsRequest) -> LogprobsResponse:
        return LogprobsResponse.model_validate_json(
            self.request("POST", "/v1/logprobs", request.model_dump(mode="json", exclude_none=True)).content
        )


def error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def error_field(response: httpx.Response, name: str) -> str | None:
    """A field of the error envelope (`param`, `type`), or None."""
    try:
        return response.json()["error"][name]
    except (ValueError, KeyError, TypeError):
        return None


def retry_after_seconds(response: httpx.Response) -> float:
    try:
        return float(response.headers.get("retry-after", 0))
    except ValueError:
        return 0.0


class TeacherPool(ConcurrentCalls):
    """Several teacher services (same model) as one `Engine`: each call goes to the next service in turn, starting at
    a random one so that many workers spread out; a service that stays unreachable through its client's retries is
    skipped for that call. One URL is a pool of one.

        with TeacherPool(["http://gpu-a:8000", "http://gpu-b:8000"], api_key=key) as teacher:
            curate(problems, teacher, store, config)
    """

    def __init__(self, urls: Sequence[str], *, api_key: str | None = None, **client_options):
        if not urls:
            raise ValueError("a teacher pool needs at least one URL")
        # A busy service is left for the next one sooner than a single service would be waited for.
        client_options.setdefault("busy_wait_seconds", BUSY_WAIT_SECONDS / len(urls))
        self.clients = [TeacherClient(url, api_key=api_key, **client_options) for url in urls]
        self._turn = random.randrange(len(self.clients))

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __enter__(self) -> TeacherPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def call(self, method: str, *args, **kwargs):
        """`method` on the next client; on TeacherUnavailable, on the one after, until each was tried once."""
        for _ in range(len(self.clients)):
            client = self.clients[self._turn % len(self.clients)]
            self._turn += 1
            try:
                return getattr(client, method)(*args, **kwargs)
            except TeacherUnavailable as exc:
                unavailable = exc
        raise unavailable

    def first_answer(self, read: Callable[[TeacherClient], T]) -> T:
        """What `read` gets from the first service that answers (each client asks once, then remembers)."""
        for client in self.clients:
            try:
                return read(client)
            except TeacherUnavailable as exc:
                unavailable = exc
        raise unavailable

    @property
    def model_name(self) -> str:
        """The model, as the first service that answers names it."""
        return self.first_answer(lambda client: client.model_name)

    @property
    def dtype(self) -> str | None:
        """The dtype of the first service that answers."""
        return self.first_answer(lambda client: client.dtype)

    @property
    def max_logprobs(self) -> int:
        """The largest top-k every service that answers returns (each client asks once, then remembers)."""
        found, unavailable = [], None
        for client in self.clients:
            try:
                found.append(client.max_logprobs)
            except TeacherUnavailable as exc:
                unavailable = exc
        if not found:
            raise unavailable
        return min(found)

    @contextmanager
    def sharing_the_bound(self, calls: int = 2) -> Iterator[None]:
        with ExitStack() as sharing:  # the calls may go to one service
            for client in self.clients:
                sharing.enter_context(client.sharing_the_bound(calls))
            yield

    def rollouts(self, questions, sampling, *, worked_example: bool = False, adapter: str | None = None):
        return self.call("rollouts", questions, sampling, worked_example=worked_example, adapter=adapter)

    def explanations(self, items, sampling, *, worked_example: bool = False):
        return self.call("explanations", items, sampling, worked_example=worked_example)
