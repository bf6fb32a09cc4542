"""`ssb submit FILE`: send a problem file to the curator service and, with `--wait`, follow it to the end.

    ssb submit problems.jsonl --curator http://127.0.0.1:8001 --wait
    ssb submit gsm8k.parquet --k 4 --options '{"rollout_max_tokens": 192}' --train '{"epochs": 2}'

The file goes up as it is (the service checks every row and names the bad ones); options are `NewDatasetOptions`
(shared/curator_api.py), from the flags and `--options`. With `--wait`, a live progress bar of the funnel until every
problem has its final state (and a dataset that asked for training is handed to the trainer), then the funnel as a table
and the training run; exit status 1 when it did not end as asked (`fell_short`: a problem failed, the dataset was
cancelled, or the training it asked for was not started). The curator's key, if it has one, comes from
SSB_CURATOR_API_KEY; its URL from `--curator` or SSB_CURATOR_URL. The upload carries an `Idempotency-Key`, and is sent
again with it when the curator does not answer: a lost answer never makes a second dataset.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.runtime import checked_url, console, fail, progress_bar

POLL_SECONDS = 2.0
SEND_ATTEMPTS = 4  # the upload, sent again while the curator does not answer: pauses of 2, 4 and 8 s
SEND_PAUSE_SECONDS = 2.0
UNREACHABLE_SECONDS = 300  # how long `--wait` waits out a curator that does not answer
# How long `--wait` waits, once every problem is final, for the curator to hand a dataset that asked for training to
# the trainer (its tries take under a minute: services/curator/jobs.py).
HANDOFF_SECONDS = 120
_JSON_TYPES = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


def submit_command(
    file: Annotated[Path, typer.Argument(help="Problems: a .jsonl or .parquet file.")],
    curator: Annotated[
        Optional[str], typer.Option("--curator", help="The curator service (SSB_CURATOR_URL; http://127.0.0.1:8001).")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the dataset until every problem is final (and its training started).")
    ] = False,
    k: Annotated[Optional[int], typer.Option("--k", min=2, help="Rollouts per problem.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seeds sampling and hint tie-breaks.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Only the first N problems.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Problems per job.")] = None,
    rollout_adapter: Annotated[
        Optional[str], typer.Option(help="Roll out with this adapter of the teacher (e.g. a finished run's id).")
    ] = None,
    options: Annotated[
        Optional[str], typer.Option("--options", help="Any other curation options, as a JSON object.")
    ] = None,
    train: Annotated[
        Optional[str], typer.Option("--train", help="Start a training run when curation ends: its settings as JSON.")
    ] = None,
    name: Annotated[Optional[str], typer.Option(help="A label for listings (default: the file name).")] = None,
) -> None:
    """Submit a dataset to the curator service; with --wait, show its funnel live until it is done."""
    import httpx

    from shared.curator_api import DatasetCreated, NewDatasetOptions

    if not file.is_file():
        raise fail(f"{file}: no such file")
    chosen = parse_json_object(options, "--options") if options else {}
    if train is not None:
        chosen["train"] = parse_json_object(train, "--train")
    flags = {"k": k, "seed": seed, "limit": limit, "batch_size": batch_size, "rollout_adapter": rollout_adapter}
    chosen.update({key: value for key, value in flags.items() if value is not None})
    try:
        dataset_options = NewDatasetOptions.model_validate(chosen)
    except ValueError as exc:
        raise fail(f"invalid options: {exc}") from exc
    from services.curator.settings import CuratorSettings

    settings = CuratorSettings()
    url = checked_url(curator or settings.curator_url, "--curator" if curator else "SSB_CURATOR_URL")
    key = settings.curator_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(30.0, read=300.0)) as http:
        form = {"options": dataset_options.model_dump_json(exclude_unset=True)}
        if name:  # without it the curator names the dataset after the file
            form["name"] = name
        try:
            content = file.read_bytes()
        except OSError as exc:
            raise fail(f"{file}: cannot be read ({exc.strerror or exc})") from exc
        response = send_upload(http, {"file": (file.name, content)}, form, url)
        if response.status_code != 201:
            raise fail(f"the curator refused the dataset ({response.status_code}):\n{error_message(response)}")
        created = DatasetCreated.model_validate_json(response.content)
        console.print(f"dataset [bold]{created.id}[/bold]: {created.problems} problems in {created.jobs} jobs")
        print(created.id)
        if wait:
            status = follow(http, created.id, created.problems)
            print_status(status)
            if fell_short(status):
                raise typer.Exit(code=1)


def send_upload(http, files: dict, form: dict, url: str):
    """The curator's answer to the upload, sent with an `Idempotency-Key`: sent again with the same key, up to
    `SEND_ATTEMPTS` times with a growing pause, while the curator does not answer or answers 502-504 (restarting, its
    Redis down). An upload it received but whose answer was lost then answers as the first did: never a second
    dataset."""
    import httpx

    headers = {"Idempotency-Key": uuid.uuid4().hex}
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            response = http.post("/v1/datasets", files=files, data=form, headers=headers)
            problem = f"answered {response.status_code}" if response.status_code in (502, 503, 504) else None
        except httpx.TransportError as exc:
            response = None
            problem = "could not be reached" if isinstance(exc, httpx.ConnectError) else "did not answer"
            problem += f" ({type(exc).__name__}: {exc})" if str(exc) else f" ({type(exc).__name__})"
        if problem is None or attempt == SEND_ATTEMPTS:
            break
        pause = SEND_PAUSE_SECONDS * 2 ** (attempt - 1)
        console.print(f"[yellow]the curator at {url} {problem}; sending the upload again in {pause:.0f} s "
                      f"(try {attempt + 1} of {SEND_ATTEMPTS}; it is never created twice)[/yellow]")
        time.sleep(pause)
    if response is None:
        raise fail(f"the curator at {url} {problem}, {SEND_ATTEMPTS} times; should one of them have arrived, "
                   f"GET {url}/v1/datasets lists its dataset")
    return response


def parse_json_object(text: str, option: str) -> dict:
    """`text` as a JSON object; anything else ends the command with an error naming `option`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"{option}: not JSON: {exc}") from exc
    except RecursionError as exc:
        raise fail(f"{option}: JSON nested too deeply to read") from exc
    if not isinstance(value, dict):
        raise fail(f"{option}: expected a JSON object, got {_JSON_TYPES.get(type(value), 'null')}")
    return value


def follow(http, dataset_id: str, problems: int):
    """Poll the dataset until every problem is final and, where it asked for training, the trainer has taken it or
    refused it (for up to `HANDOFF_SECONDS` more); a progress bar of the funnel meanwhile. The curator out of reach or
    unavailable (restarting, Redis down) is waited out for up to `UNREACHABLE_SECONDS`: curation goes on without
    it."""
    import httpx

    from shared.curator_api import DatasetStatus

    with progress_bar("counts") as progress:
        task = progress.add_task("curating", total=problems, counts="")
        unreachable_since = finished_since = None
        while True:
            try:
                response = http.get(f"/v1/datasets/{dataset_id}")
                problem = f"answered {response.status_code}" if response.status_code in (502, 503, 504) else None
            except httpx.HTTPError as exc:
                response, problem = None, f"could not be reached ({type(exc).__name__})"
            if problem is not None:
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > UNREACHABLE_SECONDS:
                    raise fail(f"the curator {problem} for {UNREACHABLE_SECONDS} s; the dataset is {dataset_id}")
                progress.update(task, counts=f"the curator {problem}; trying again")
                time.sleep(POLL_SECONDS)
                continue
            unreachable_since = None
            if response.status_code != 200:
                raise fail(f"the curator answered {response.status_code}: {error_message(response)}")
            status = DatasetStatus.model_validate_json(response.content)
            progress.update(task, completed=status.funnel.finished, counts=funnel_line(status))
            # "done" as the curator counts it: a newer one's funnel may hold a state this version does not know.
            if status.funnel.finished >= status.problems or status.state == "done":
                handed = status.training_run or status.training_error or status.state == "cancelled"
                if status.options.train is None or handed:
                    return status
                finished_since = finished_since or time.monotonic()
                if time.monotonic() - finished_since > HANDOFF_SECONDS:
                    console.print(f"[yellow]no training run recorded {HANDOFF_SECONDS} s after curation ended[/yellow]")
                    return status
                progress.update(task, counts=funnel_line(status) + ", handing it to the trainer")
            time.sleep(POLL_SECONDS)


def fell_short(status) -> bool:
    """Whether a followed dataset ended otherwise than asked: a problem failed, it was cancelled, or the training it
    asked for has no run (refused, or none recorded in time)."""
    cancelled = status.state == "cancelled" or status.funnel.cancelled > 0
    untrained = status.options.train is not None and status.training_run is None
    return status.funnel.failed > 0 or cancelled or untrained


def funnel_line(status) -> str:
    counts = {k: v for k, v in status.funnel.model_dump().items() if v}
    rate = f", {status.tokens_per_second:.0f} tok/s" if status.tokens_per_second else ""
    return " ".join(f"{k} {v}" for k, v in counts.items()) + rate


def print_status(status) -> None:
    from rich.table import Table

    table = Table(title=f"dataset {status.id}: {status.state}")
    table.add_column("stage")
    table.add_column("problems", justify="right")
    for stage, count in status.funnel.model_dump().items():
        table.add_row(stage, str(count))
    table.add_row("[bold]total[/bold]", f"[bold]{status.problems}[/bold]")
    console.print(table)
    if status.started_at and status.finished_at:
        console.print(
            f"{status.problems_per_minute:.1f} problems/minute, teacher {status.tokens_per_second:.0f} tokens/s, "
            f"{status.finished_at - status.started_at:.0f} s"
        )
    for failure in status.failures[:10]:
        console.print(f"[red]failed[/red] {failure.problem_id}: {failure.reason}")
    if status.training_run:
        console.print(f"training run started: {status.training_run}")
    if status.training_error:
        console.print(f"[red]training not started[/red]: {status.training_error}")


def error_message(response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:2000]
