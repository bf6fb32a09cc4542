"""The curator service end to end on real parts: `ssb serve curator` and `ssb worker curate` processes, the real
teacher service on the small model, Redis, and the pair store on disk.

- 8 arithmetic problems through two workers end with every problem in exactly one final state, and the same pairs
  as in-process `curate()` with the same seed (up to the engine's batch-dependent rounding, measured in the teacher's
  tests);
- a worker SIGKILLed mid-job loses nothing and doubles nothing: another worker finishes its problems;
- every malformed upload is rejected whole and leaves nothing in Redis or on disk.
"""

from __future__ import annotations

import io
import json
import signal
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.arithmetic import make_arithmetic_problems
from shared.curator_api import FINAL_STATES
from shared.storage import PairStore
from tests.conftest import CURATION_CONFIG
from tests.prometheus_text import metric
from tests.services.curator.conftest import MAX_PROBLEMS, MAX_UPLOAD_BYTES, PREFIX
from tests.teacher_server import API_KEY as TEACHER_KEY

pytestmark = pytest.mark.engine


def rows_of(problems) -> list[dict]:
    return [p.model_dump(exclude_none=True) for p in problems]


def assert_each_problem_final_once(status: dict, store: PairStore, problem_ids: list[str]) -> None:
    funnel = status["funnel"]
    assert funnel["queued"] == funnel["running"] == 0
    assert sum(funnel[s] for s in FINAL_STATES) == status["problems"] == len(problem_ids)
    pairs = set(store.pair_ids())
    dropped = {d.problem_id for d in store.iter_dropped()}
    assert not pairs & dropped
    assert pairs | dropped == set(problem_ids)
    assert funnel["paired"] == len(pairs)
    assert status["state"] == "done" and status["finished_at"] >= status["started_at"]


def test_a_dataset_through_two_workers_matches_in_process_curation(curator, curation_run):
    """The session's in-process curation (tests/conftest.py) ran `curate()` on six arithmetic problems of seed 0 with
    CURATION_CONFIG; the service curates four of them (the fifth to the eighth of seed 0, one of which paired) with
    the same options, in two jobs of two for the two workers."""
    local_problems, local_store, _ = curation_run
    problems = local_problems[:4]
    options = {**CURATION_CONFIG, "batch_size": 2}
    with curator.client() as http:
        created = http.post("/v1/datasets", json={"rows": rows_of(problems), "name": "arith", "options": options})
        assert created.status_code == 201, created.text
        dataset = created.json()
        assert (dataset["problems"], dataset["jobs"]) == (4, 2)
        queued = http.get(f"/v1/datasets/{dataset['id']}").json()
        assert queued["state"] == "queued" and queued["funnel"]["queued"] == 4
        curator.start_worker(), curator.start_worker()
        status = curator.wait_done(dataset["id"])
        listed = http.get("/v1/datasets").json()["datasets"]
        exported = [json.loads(line) for line in http.get(f"/v1/datasets/{dataset['id']}/pairs").text.splitlines()]
        dropped = [json.loads(line) for line in http.get(f"/v1/datasets/{dataset['id']}/dropped").text.splitlines()]
    curator.stop_workers()

    store = PairStore(curator.data_dir / "datasets" / dataset["id"])
    assert_each_problem_final_once(status, store, [p.id for p in problems])
    assert status["tokens_per_second"] > 0 and status["problems_per_minute"] > 0 and status["seconds_left"] == 0
    assert [d["id"] for d in listed].count(dataset["id"]) == 1  # with whatever other tests of the session left
    assert sorted(p["problem_id"] for p in exported) == store.pair_ids()
    assert len(exported) + len(dropped) == 4

    # The same outcomes as in-process curation, problem by problem, wherever the engine's samples agree.
    same_outcome = sum(store.outcome(p.id) == local_store.outcome(p.id) for p in problems)
    print(f"\nservice vs in-process: {same_outcome}/4 outcomes, {status['funnel']}")
    assert same_outcome >= 3
    for problem_id in set(store.pair_ids()) & set(local_store.pair_ids()):
        mine, theirs = store.load_pair(problem_id), local_store.load_pair(problem_id)
        assert mine.record.student_prompt == theirs.record.student_prompt
        if mine.record.rollouts == theirs.record.rollouts and mine.record.explanation_attempt == 0:
            assert_same_sample_up_to_rounding(mine, theirs)


def assert_same_sample_up_to_rounding(mine, theirs) -> None:
    """Two engines' explanations of one prompt with one seed agree token by token, unless the engine's
    batch-dependent rounding tipped a draw: then, where they part, each token is among the other's top-k, and before
    it the top log-probabilities agree."""
    if mine.token_ids == theirs.token_ids:
        return
    shortest = min(len(mine.token_ids), len(theirs.token_ids))
    parted = next((i for i in range(shortest) if mine.token_ids[i] != theirs.token_ids[i]), shortest)
    if parted < shortest:  # (else one stopped where the other went on)
        assert mine.token_ids[parted] in theirs.topk_ids[parted] and theirs.token_ids[parted] in mine.topk_ids[parted]
    before = [(a[0], b[0]) for a, b in zip(mine.topk_logprobs[:parted], theirs.topk_logprobs[:parted])]
    assert all(abs(a - b) < 0.1 for a, b in before), before


def test_a_worker_killed_mid_job_loses_nothing_and_doubles_nothing(curator):
    """SIGKILL a worker and everything it started mid-job (two jobs of one problem: should the first end before the
    kill, the second is the one cut short); another worker finishes: every problem final once, nothing failed, a
    retry spent."""
    problems = make_arithmetic_problems(2, seed=7)
    options = {**CURATION_CONFIG, "seed": 7, "batch_size": 1, "rollout_max_tokens": 96, "explanation_max_tokens": 96}
    with curator.client() as http:
        dataset = http.post("/v1/datasets", json={"rows": rows_of(problems), "options": options}).json()
        victim = curator.start_worker()
        deadline = time.monotonic() + 120
        while http.get(f"/v1/datasets/{dataset['id']}").json()["funnel"]["running"] == 0:
            assert time.monotonic() < deadline, curator.logs()
            time.sleep(0.2)
    time.sleep(1.0)  # mid-job: the rollouts are being generated
    family = [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]
    for process in family:  # the whole machine is lost: worker, work horse, grading helper
        process.send_signal(signal.SIGKILL)
    victim.wait()
    psutil.wait_procs(family, timeout=10)
    killed_at = time.monotonic()
    curator.start_worker()
    status = curator.wait_done(dataset["id"], timeout=300)
    recovered_in = time.monotonic() - killed_at
    curator.stop_workers()

    store = PairStore(curator.data_dir / "datasets" / dataset["id"])
    assert_each_problem_final_once(status, store, [p.id for p in problems])
    assert status["funnel"]["failed"] == 0
    job_ids = [f"{PREFIX}-{dataset['id']}-{i}" for i in range(2)]
    jobs = Job.fetch_many(job_ids, connection=curator.redis, serializer=JSONSerializer)
    assert [job.get_status() for job in jobs] == ["finished", "finished"]
    assert sorted(job.retries_left for job in jobs)[0] < int(curator.env.get("SSB_JOB_RETRIES", 3))
    print(f"\nkilled worker's job finished by another in {recovered_in:.0f} s: {status['funnel']}")


def parquet_bytes(rows: list[dict], compression: str = "snappy") -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer, compression=compression)
    return buffer.getvalue()


def snapshot(curator) -> tuple[set, set]:
    datasets = curator.data_dir / "datasets"
    files = {p for p in datasets.rglob("*")} if datasets.exists() else set()
    # Everything an upload writes carries the prefix: the ledger's keys, the queue, the jobs (their ids); RQ's own
    # maintenance locks come and go with their TTLs and are left out.
    return set(curator.redis.keys(f"*{PREFIX}*")), files


GOOD = {"question": "What is 2 + 3?", "answer": "5"}


@pytest.mark.parametrize(
    ("upload", "status", "says"),
    [
        ({"files": {"file": ("p.jsonl", b'{"question": "q", "answer": 1}\n{"question": "q2"\n\n{"answer": 2}\n')}},
         422, ["p.jsonl:2: malformed JSON", "p.jsonl:4: missing question field"]),
        ({"files": {"file": ("p.jsonl", b'{"id": "a", "question": "q", "answer": 1}\n'
                                        b'{"id": "a", "question": "r", "answer": 2}\n')}},
         422, ["p.jsonl:2: duplicate id 'a' (also at p.jsonl:1)"]),
        ({"files": {"file": ("p.parquet", parquet_bytes([GOOD, {"question": "q", "answer": None}]))}},
         422, ["p.parquet:row 1: missing answer"]),
        ({"files": {"file": ("p.csv", b"question,answer\n")}}, 422, ["unsupported file type '.csv'"]),
        ({"files": {"file": ("p.jsonl", json.dumps(GOOD).encode())}, "data": {"options": '{"k": 1}'}},
         422, ["k: Input should be greater than or equal to 2"]),
        ({"files": {"name": (None, "no file")}}, 422, ["needs a `file` part"]),
        ({"json": {"rows": [GOOD, {"question": 3, "answer": 1}]}}, 422, ["rows:row 1: 'question' must be a string"]),
        ({"json": {"rows": [GOOD], "options": {"rollout_adapter": "../x"}}}, 422, ["options.rollout_adapter"]),
        ({"json": {"rows": []}}, 422, ["rows: List should have at least 1 item"]),
        ({"json": {"rows": [GOOD], "options": {"rollout_temprature": 0.2}}}, 422,
         ["options.rollout_temprature: Extra inputs are not permitted"]),
        ({"files": {"file": ("p.jsonl", json.dumps(GOOD).encode())}, "data": {"options": '{"train": {"lr": "x"}}'}},
         422, ["options.train.lr: Input should be a valid number"]),
        ({"json": {"rows": [GOOD], "options": {"train": {"epoch": 2}}}}, 422,
         ["options.train.epoch: Extra inputs are not permitted"]),
        ({"json": {"rows": [GOOD], "options": {"train": {"dataset_id": "ds-other"}}}}, 422,
         ["options.train.dataset_id: set by the curator"]),
        ({"json": {"rows": [GOOD], "options": {"train": {"run_id": "ds-0123456789ab-train"}}}}, 422,
         ["the name dataset ds-0123456789ab gives its own run"]),
        ({"files": {"file": ("big.jsonl", (json.dumps(GOOD) + "\n").encode() * (MAX_UPLOAD_BYTES // 30))}},
         413, ["at most 200000"]),
        # More problems than SSB_MAX_PROBLEMS: refused at the first one past it, in a file or in rows.
        ({"files": {"file": ("many.jsonl", (json.dumps(GOOD) + "\n").encode() * (MAX_PROBLEMS + 5))}}, 413,
         [f"many.jsonl:{MAX_PROBLEMS + 1}: more than {MAX_PROBLEMS} problems; at most {MAX_PROBLEMS} per dataset"]),
        ({"json": {"rows": [GOOD] * (MAX_PROBLEMS + 5)}}, 413, [f"rows:row {MAX_PROBLEMS}: more than {MAX_PROBLEMS}"]),
        # Options a worker could not use: refused at upload, not after four failed attempts of every job.
        ({"json": {"rows": [GOOD], "options": {"rollout_max_tokens": 40000, "seed": 2**63}}}, 422,
         ["options.rollout_max_tokens: Input should be less than or equal to 32768", "options.seed"]),
        ({"json": {"rows": [GOOD], "options": {"extraction_order": ["boxd"]}}}, 422,
         ["options.extraction_order: Value error, unknown extraction strategies ['boxd']"]),
        ({"json": {"rows": [GOOD], "option": {"k": 8}}}, 422, ["option: Extra inputs are not permitted"]),
        ({"files": {"file": ("p.jsonl", json.dumps(GOOD).encode())}, "data": {"option": '{"k": 8}'}}, 422,
         ["unknown form parts ['option']"]),
        ({"files": {"file": ("p.jsonl", json.dumps(GOOD).encode())}, "data": {"name": "n" * 201}}, 422,
         ["name: at most 200 characters"]),
        ({"files": {"file": ("p.jsonl", b'{"question": "q", "answer": 1, "n": ' + b"9" * 5000 + b"}\n")}}, 422,
         ["p.jsonl:1: unreadable JSON: a number of more than 4300 digits"]),
        # a few kilobytes on the wire, a megabyte once decompressed: bounded as a JSONL file of that size would be
        ({"files": {"file": ("p.parquet", parquet_bytes([{"question": "q" * 2**20, "answer": 1}], "zstd"))}}, 413,
         ["p.parquet: its columns ['question', 'answer'] decompress to", "at most 200000"]),
    ],
    ids=["bad-json-lines", "duplicate-ids", "parquet-row", "extension", "options", "no-file", "json-rows",
         "adapter-name", "empty", "misspelt-option", "train-value", "train-field", "train-dataset-id", "train-run-id",
         "too-large",
         "too-many-in-file", "too-many-rows",
         "sampling-bounds", "extraction-order", "misspelt-field", "misspelt-part", "long-name", "huge-number",
         "parquet-bomb"],
)
def test_a_malformed_upload_is_rejected_whole_and_leaves_nothing(curator, upload, status, says):
    before = snapshot(curator)
    with curator.client() as http:
        response = http.post("/v1/datasets", **upload)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for fragment in says:
        assert fragment in message
    assert snapshot(curator) == before


def test_a_chunked_upload_over_the_limit_is_refused_as_it_arrives(curator):
    """No Content-Length to go by: the body is counted as it arrives."""
    before = snapshot(curator)
    chunks = ((json.dumps(GOOD) + "\n").encode() * 100 for _ in range(MAX_UPLOAD_BYTES // 3000 + 10))
    with curator.client() as http:
        response = http.post("/v1/datasets", content=chunks, headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and "at most 200000" in response.json()["error"]["message"]
    assert snapshot(curator) == before


def test_unknown_ids_auth_and_cancel(curator):
    with curator.client() as http:
        for path in ("/v1/datasets/ds-nope", "/v1/datasets/ds-nope/pairs", "/v1/datasets/ds-nope/dropped"):
            assert http.get(path).status_code == 404
        assert http.delete("/v1/datasets/ds-nope").status_code == 404
        # No worker runs: a cancelled dataset's problems all end `cancelled` at once, and its jobs leave the queue.
        rows = rows_of(make_arithmetic_problems(6, seed=11))
        dataset = http.post("/v1/datasets", json={"rows": rows, "options": {"batch_size": 4}}).json()
        # An id that names another of the dataset's keys in Redis is no dataset either.
        for suffix in (":jobs", ":final", ":cancelled"):
            assert http.get(f"/v1/datasets/{dataset['id']}{suffix}").status_code == 404
            assert http.delete(f"/v1/datasets/{dataset['id']}{suffix}").status_code == 404
        cancelled = http.delete(f"/v1/datasets/{dataset['id']}").json()
        again = http.delete(f"/v1/datasets/{dataset['id']}")
    assert cancelled["state"] == "cancelled" and cancelled["funnel"]["cancelled"] == 6
    assert again.status_code == 200 and again.json()["funnel"] == cancelled["funnel"]
    with curator.client(key=None) as anonymous:
        assert anonymous.get("/v1/datasets").status_code == 401
        assert anonymous.get("/healthz").status_code == 200
    with curator.client(key="wrong") as wrong:
        assert wrong.post("/v1/datasets", json={"rows": [GOOD]}).status_code == 401


def test_an_upload_sent_again_with_its_idempotency_key_creates_nothing_more(curator):
    """The same upload sent again with its Idempotency-Key (its answer lost) answers as the first did: one dataset,
    its jobs queued once, a file as JSON rows alike (another multipart boundary each time). The key with another
    upload is a 422, as is a key no header may carry. No worker runs: the datasets are cancelled after."""
    rows = rows_of(make_arithmetic_problems(3, seed=23))
    key = {"Idempotency-Key": "upload-7f3a"}
    jsonl = "".join(json.dumps(row) + "\n" for row in rows).encode()
    with curator.client() as http:
        before = {d["id"] for d in http.get("/v1/datasets").json()["datasets"]}
        queued = curator.redis.llen(f"rq:queue:{PREFIX}:curate")
        sent = [http.post("/v1/datasets", json={"rows": rows, "options": {"batch_size": 2}}, headers=key)
                for _ in range(2)]
        files = [http.post("/v1/datasets", files={"file": ("p.jsonl", jsonl)}, headers={"Idempotency-Key": "f-1"})
                 for _ in range(2)]
        other = http.post("/v1/datasets", json={"rows": rows[:2]}, headers=key)
        bad = http.post("/v1/datasets", json={"rows": rows}, headers={"Idempotency-Key": "two words"})
        after = {d["id"] for d in http.get("/v1/datasets").json()["datasets"]}
        queued_after = curator.redis.llen(f"rq:queue:{PREFIX}:curate")
        for dataset_id in after - before:
            http.delete(f"/v1/datasets/{dataset_id}")
    assert [r.status_code for r in sent + files] == [201] * 4, [r.text for r in sent + files]
    assert sent[0].json() == sent[1].json() == {"id": sent[0].json()["id"], "problems": 3, "jobs": 2}
    assert files[0].json() == files[1].json() and files[0].json()["id"] != sent[0].json()["id"]
    assert after - before == {sent[0].json()["id"], files[0].json()["id"]} and queued_after - queued == 2 + 1
    assert other.status_code == 422 and "came with another upload" in other.json()["error"]["message"], other.text
    assert bad.status_code == 422 and "Idempotency-Key" in bad.text, bad.text


def test_metrics_show_the_funnel_the_queue_and_the_requests(curator):
    """`/metrics` on the real service and Redis: a dataset no worker has taken shows all its problems queued and its
    jobs waiting; once cancelled, all of them cancelled; the requests are counted; the key is needed."""
    rows = rows_of(make_arithmetic_problems(5, seed=17))
    with curator.client() as http:
        dataset = http.post("/v1/datasets", json={"rows": rows, "options": {"batch_size": 2}}).json()
        series = f'dataset="{dataset["id"]}"'
        queued = http.get("/metrics").text
        http.delete(f"/v1/datasets/{dataset['id']}")
        cancelled = http.get("/metrics").text
    assert metric(queued, "ssb_curator_problems", f'{series},state="queued"') == 5
    assert metric(queued, "ssb_curator_problems", series) == 5  # the states add up to the problems
    # No worker runs now; one SIGKILLed by an earlier test counts until its key in Redis expires (up to a minute).
    assert metric(queued, "ssb_curator_queued_jobs") >= 3 and metric(queued, "ssb_curator_workers") <= 1
    assert metric(queued, "ssb_curator_datasets", 'state="queued"') >= 1
    assert metric(cancelled, "ssb_curator_problems", f'{series},state="cancelled"') == 5
    assert metric(cancelled, "ssb_curator_queued_jobs") == metric(queued, "ssb_curator_queued_jobs") - 3
    assert metric(cancelled, "ssb_curator_requests_total", 'endpoint="/v1/datasets",status="201"') >= 1
    assert metric(cancelled, "ssb_curator_requests_total", 'endpoint="/metrics",status="200"') >= 1
    with curator.client(key=None) as anonymous:
        assert anonymous.get("/metrics").status_code == 401


def test_submit_waits_with_a_progress_bar_and_prints_the_funnel(curator, tmp_path):
    """`ssb submit FILE --wait` as a user runs it (the key from the environment): the dataset id, then the funnel."""
    import subprocess
    import sys

    problems = make_arithmetic_problems(2, seed=21)
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_of(problems)))
    curator.start_worker()
    options = json.dumps({"rollout_max_tokens": 32, "explanation_max_tokens": 32})  # the waiting is under test
    command = [sys.executable, "-m", "cli.main", "submit", str(path), "--curator", curator.url, "--wait"]
    command += ["--k", "2", "--options", options]
    done = subprocess.run(command, env=curator.env, capture_output=True, text=True, timeout=300)
    curator.stop_workers()
    assert done.returncode == 0, done.stderr
    dataset_id = done.stdout.strip()
    assert dataset_id.startswith("ds-")
    assert "curating" in done.stderr and "total" in done.stderr and "problems/minute" in done.stderr
    status = curator.client().get(f"/v1/datasets/{dataset_id}").json()
    assert status["state"] == "done" and status["options"]["rollout_max_tokens"] == 32 and status["options"]["k"] == 2


def test_the_teachers_model_decides_the_worked_example_when_the_dataset_leaves_it_unset(curator, teacher_server):
    """The real teacher names its model by the directory the default model was pulled to: a dataset without
    `worked_example` curates with it there (the small model needs it), and with what it says when it says."""
    from shared.curator_api import DatasetOptions
    from shared.teacher_client import TeacherClient

    with TeacherClient(teacher_server.url, api_key=TEACHER_KEY) as teacher:
        model = teacher.model_name
    assert DatasetOptions().curation_config(model).worked_example is True
    assert DatasetOptions(worked_example=False).curation_config(model).worked_example is False
    assert DatasetOptions().curation_config("Qwen/Qwen2.5-3B-Instruct").worked_example is False


def test_a_top_k_above_the_teachers_is_every_problems_failure_said_at_once(curator):
    """A dataset asking for more log-probabilities than the teacher returns (the schema allows 256, the teacher 64 by
    default) had every explanation refused, taken for its problem's fault: each batch curated again one problem at a
    time, every problem with a mix `failed` and the rest dropped as usual. Now its problems end `failed` at once,
    saying why, before anything is generated."""
    problems = rows_of(make_arithmetic_problems(3, seed=29))
    options = {**CURATION_CONFIG, "k": 2, "seed": 29, "topk": 65, "rollout_max_tokens": 64,
               "explanation_max_tokens": 64}
    with curator.client() as http:
        dataset = http.post("/v1/datasets", json={"rows": problems, "options": options}).json()
    curator.start_worker()
    status = curator.wait_done(dataset["id"], timeout=120)
    curator.stop_workers()
    assert status["funnel"]["failed"] == 3 and status["tokens_per_second"] == 0, status
    assert all("top-k 65 is above the teacher's max_logprobs 64" in f["reason"] for f in status["failures"]), status


def test_a_problem_the_teacher_refuses_fails_alone_with_its_reason(curator):
    """A question longer than the teacher's context: the teacher refuses the batch (400), the job retries its problems
    one at a time, and only that problem ends `failed`, with the teacher's message; the others are curated."""
    problems = rows_of(make_arithmetic_problems(3, seed=13))
    problems[1]["question"] = "How many apples? " * 3000
    options = {**CURATION_CONFIG, "k": 2, "seed": 13, "rollout_max_tokens": 64, "explanation_max_tokens": 64}
    with curator.client() as http:
        dataset = http.post("/v1/datasets", json={"rows": problems, "options": options}).json()
        # A job of that problem alone fails it at once: retried (at once, 30 s and 120 s later), its problem would end
        # 150 s later at the earliest; 120 s leave a slow machine time for the one attempt.
        alone = http.post("/v1/datasets", json={"rows": [problems[1]], "options": options}).json()
    curator.start_worker()
    status = curator.wait_done(dataset["id"], timeout=300)
    alone_status = curator.wait_done(alone["id"], timeout=120)
    curator.stop_workers()
    assert status["funnel"]["failed"] == 1 and status["funnel"]["queued"] == status["funnel"]["running"] == 0
    (failure,) = status["failures"]
    assert failure["problem_id"] == problems[1]["id"] and "exceed the context length" in failure["reason"]
    assert alone_status["failures"] == [failure]
    store = PairStore(curator.data_dir / "datasets" / dataset["id"])
    assert store.outcome(problems[0]["id"]) is not None and store.outcome(problems[2]["id"]) is not None
