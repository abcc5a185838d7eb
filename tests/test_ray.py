"""Batch jobs on a real local Ray cluster (2 CPUs, started here): exactly once through a worker's death, the same
greedy outputs as local mode."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from minicpmv.batch.job import JobSpec, run_job
from minicpmv.batch.sink import read_output
from minicpmv.engine.sampling import SamplingParams
from tests.tiny import image

ray = pytest.importorskip("ray", reason="the ray extra is part of the test extra")

GREEDY = SamplingParams(temperature=0.0, max_tokens=5)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_100_rows_with_a_worker_killed_mid_run(cluster, llm, tiny_dir, tmp_path):
    from minicpmv.batch.ray_runner import RayJob, run_ray_job

    for i in range(5):
        image(36 + 4 * i, 28, seed=i).save(tmp_path / f"{i}.png")
    rows = [{"id": f"row-{i:03d}", "image": f"{i % 5}.png", "prompt": f"Question {i}"} for i in range(100)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))

    local = {r["id"]: r for r in read_output(_local(llm, source, tmp_path / "local.jsonl"))}

    pids = tmp_path / "pids"
    pids.mkdir()
    out = tmp_path / "ray.jsonl"
    job = RayJob(model=str(tiny_dir), dtype="float32", max_num_seqs=4, workers=2, threads=1, pid_dir=str(pids))
    killed: list[int] = []

    def kill_one_worker():
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 12 and list(pids.iterdir()):
                pid = int(sorted(pids.iterdir())[0].stem)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    summary = run_ray_job(job, source, out, JobSpec(sampling=GREEDY), progress=False)
    killer.join()
    assert killed, "the job ended before a worker could be killed"
    assert len(list(pids.iterdir())) >= 3  # two workers, then the one that replaced the killed one
    records = read_output(out)
    ids = [r["id"] for r in records]
    assert len(ids) == 100 and len(set(ids)) == 100
    assert summary.rows == 100 and summary.failed == 0
    assert 0 < summary.ready_seconds < summary.first_output_seconds < summary.seconds  # the workers' start, then rows
    assert {r["id"]: r["text"] for r in records} == {k: r["text"] for k, r in local.items()}

    # resume filters done ids whatever the source: drop 10 rows from the output, rerun, only those are redone
    kept = records[10:]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    again = run_ray_job(RayJob(model=str(tiny_dir), dtype="float32", max_num_seqs=4, workers=2), source, out,
                        JobSpec(sampling=GREEDY), progress=False)
    assert (again.rows, again.skipped) == (10, 90)
    assert sorted(r["id"] for r in read_output(out)) == sorted(local)


def _local(llm, source: Path, out: Path) -> Path:
    run_job(llm, source, out, JobSpec(sampling=GREEDY), progress=False)
    return out


def test_serve_two_replicas_openai_client_and_a_replica_killed(cluster, tiny_dir, tmp_path):
    import socket

    import openai
    from ray import serve

    from minicpmv.batch.ray_serve import ReplicaSpec, deployment
    from minicpmv.serve.config import ServerConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pids = tmp_path / "pids"
    pids.mkdir()
    spec = ReplicaSpec({"model": str(tiny_dir), "dtype": "float32", "device": "cpu", "engine_config": {"max_num_seqs": 4}},
                       ServerConfig(model_name="tiny"), threads=1, pid_dir=str(pids))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(deployment(spec, 2, 4).bind(), name="minicpmv", route_prefix="/", blocking=False)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Hello"}]

        def ask():
            return client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)

        first = ask()
        assert first.choices[0].finish_reason == "length" and first.usage.completion_tokens == 4
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
        assert len(list(pids.iterdir())) == 2
        os.kill(int(sorted(pids.iterdir())[0].stem), signal.SIGKILL)
        time.sleep(1.0)
        for _ in range(6):  # the live replica answers while the dead one is replaced
            assert ask().choices[0].message.content == first.choices[0].message.content
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(list(pids.iterdir())) == 3, "the killed replica was not replaced"
    finally:
        serve.shutdown()
