"""Batch jobs in local mode: streaming rows through one LLM, errors per row, resume, exactly once after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minicpmv.batch.job import JobSpec, run_job
from minicpmv.batch.rows import read_rows
from minicpmv.batch.sink import JsonlSink, ParquetSink, read_output
from minicpmv.engine.sampling import SamplingParams
from tests.tiny import image, user

pa = pytest.importorskip("pyarrow", reason="the batch extra (pyarrow) is part of the test extra")
import pyarrow.parquet as pq  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
ROOT = Path(__file__).resolve().parents[1]


def write_images(folder: Path, n: int, size=(40, 30)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i:03d}.png"
        image(*size, seed=i).save(folder / name)
        names.append(name)
    return names


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def by_id(records):
    out = {}
    for r in records:
        assert r["id"] not in out, f"id {r['id']} twice"
        out[r["id"]] = r
    return out


def test_rows_stream_and_results_match_chat(llm, tmp_path):
    names = write_images(tmp_path / "media", 4)
    rows = [{"id": f"r{i}", "image": n, "prompt": "What is this?"} for i, n in enumerate(names)]
    rows.append({"id": "m", "messages": [user({"type": "image_url", "image_url": {"url": "media/" + names[0]}}, "Describe.")],
                 "max_tokens": 3})
    path = write_jsonl(tmp_path / "in.jsonl", [{**r, "image": "media/" + r["image"]} if "image" in r else r for r in rows])
    summary = run_job(llm, path, tmp_path / "out.jsonl", JobSpec(sampling=GREEDY), window=3, progress=False)
    assert (summary.rows, summary.failed) == (5, 0)
    assert 0 < summary.first_output_seconds <= summary.seconds and summary.ready_seconds == 0  # (loaded before)
    assert summary.running_rows_per_second() == summary.rows / summary.seconds
    out = by_id(read_output(tmp_path / "out.jsonl"))
    assert set(out) == {"r0", "r1", "r2", "r3", "m"}
    expected = llm.chat([user(str(tmp_path / "media" / names[1]), "What is this?")], GREEDY)[0]
    assert out["r1"]["text"] == expected.text
    assert out["r1"]["usage"]["image_tokens"] > 0 and out["r1"]["finish_reason"] == "length"
    assert out["m"]["usage"]["completion_tokens"] == 3
    # a rerun finds everything done
    again = run_job(llm, path, tmp_path / "out.jsonl", JobSpec(sampling=GREEDY), progress=False)
    assert (again.rows, again.skipped) == (0, 5)


def test_bad_rows_carry_their_error_and_the_rest_complete(llm, tmp_path):
    names = write_images(tmp_path, 2)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [
        {"id": "ok0", "image": names[0], "prompt": "Hi"},
        {"id": "corrupt", "image": "broken.png", "prompt": "Hi"},
        {"id": "missing", "image": "nope.png", "prompt": "Hi"},
        {"id": "bad-option", "image": names[1], "prompt": "Hi", "max_slice_nums": 999},
        {"id": "bad-mode", "image": names[1], "prompt": "Hi", "downsample_mode": "2x"},
        {"id": "too-long", "prompt": "word " * 3000},
        {"id": "no-prompt", "image": names[1]},
        {"id": "ok1", "image": names[1], "prompt": "Hi", "temperature": 0.5, "max_tokens": 2},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    from minicpmv.cli import main

    out_path = tmp_path / "out.jsonl"
    code = main(["batch", str(llm.name), str(path), str(out_path), "--dtype", "float32", "--max-tokens", "4",
                 "--max-model-len", "2048", "--no-progress"])
    assert code == 1  # some rows failed
    out = by_id(read_output(out_path))
    assert set(out) == {r["id"] for r in rows}
    assert out["ok0"]["error"] is None and out["ok0"]["usage"]["completion_tokens"] == 4
    assert out["ok1"]["error"] is None and out["ok1"]["usage"]["completion_tokens"] == 2
    assert "not a recognised image format" in out["corrupt"]["error"] or "corrupt" in out["corrupt"]["error"]
    assert "not found" in out["missing"]["error"]
    assert "max_slice_nums" in out["bad-option"]["error"]
    assert "downsample_mode" in out["bad-mode"]["error"]
    assert "ContextLengthError" in out["too-long"]["error"] and "2048" in out["too-long"]["error"]
    assert "prompt" in out["no-prompt"]["error"]
    for r in out.values():
        assert (r["error"] is None) == (r["text"] is not None or r["finish_reason"] is not None)


def test_json_schema_flag_and_per_row_response_format(llm, tmp_path):
    import jsonschema

    from minicpmv.cli import main

    colour = {"type": "object", "additionalProperties": False, "required": ["colour"],
              "properties": {"colour": {"enum": ["red", "green", "blue"]}}}
    count = {"type": "object", "additionalProperties": False, "required": ["n"],
             "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    (tmp_path / "schema.json").write_text(json.dumps(colour))
    names = write_images(tmp_path, 1)
    rows = [
        {"id": "flag", "image": names[0], "prompt": "Colour?"},
        {"id": "own", "image": names[0], "prompt": "Count?",
         "response_format": {"type": "json_schema", "json_schema": {"name": "count", "schema": count}}},
        {"id": "free", "image": names[0], "prompt": "Say anything.", "response_format": {"type": "text"}},
        {"id": "bad-type", "prompt": "x", "response_format": {"type": "xml"}},
        {"id": "bad-schema", "prompt": "x", "response_format": json.dumps(
            {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "strin"}}})},
    ]
    out_path = tmp_path / "out.jsonl"
    code = main(["batch", str(llm.name), str(write_jsonl(tmp_path / "in.jsonl", rows)), str(out_path), "--dtype",
                 "float32", "--max-tokens", "40", "--json-schema", str(tmp_path / "schema.json"), "--no-progress"])
    assert code == 1
    out = by_id(read_output(out_path))
    jsonschema.validate(json.loads(out["flag"]["text"]), colour)
    jsonschema.validate(json.loads(out["own"]["text"]), count)
    assert out["flag"]["finish_reason"] == out["own"]["finish_reason"] == "stop"
    assert out["free"]["error"] is None and out["free"]["usage"]["completion_tokens"] == 40  # not constrained
    assert "response_format.type" in out["bad-type"]["error"] and "param: response_format" in out["bad-type"]["error"]
    assert "strin" in out["bad-schema"]["error"]


def test_folder_input_and_parquet_in_and_out(llm, tmp_path):
    media = tmp_path / "photos"
    write_images(media / "a", 2)
    write_images(media / "b", 1)
    (media / "notes.txt").write_text("not media")
    rows = list(read_rows(media, prompt="Caption it."))
    assert [r["id"] for r in rows] == ["a/img000.png", "a/img001.png", "b/img000.png"]
    out = tmp_path / "captions.parquet"
    summary = run_job(llm, media, out, JobSpec(sampling=GREEDY), prompt="Caption it.", progress=False)
    assert (summary.rows, summary.failed) == (3, 0)
    table = pq.read_table(out)  # a folder of parts reads as one table
    assert sorted(table.column("id").to_pylist()) == [r["id"] for r in rows]
    assert table.schema.field("usage").type.num_fields == 6
    # Parquet in (messages as nested data, options as columns), Parquet out
    inp = tmp_path / "in.parquet"
    table_in = pa.Table.from_pylist([
        {"id": f"p{i}", "image": str(media / "a" / f"img00{i}.png"), "prompt": "Hi", "max_tokens": 2 + i} for i in range(2)
    ])
    pq.write_table(table_in, inp)
    out2 = tmp_path / "out2.parquet"
    summary = run_job(llm, inp, out2, JobSpec(sampling=GREEDY), progress=False)
    records = by_id(read_output(out2))
    assert [records[f"p{i}"]["usage"]["completion_tokens"] for i in range(2)] == [2, 3]
    folder_text = by_id(read_output(out))["a/img000.png"]["text"]
    expected = llm.chat([user(str(media / "a" / "img000.png"), "Caption it.")], GREEDY)[0].text
    assert folder_text == expected


def test_csv_input(llm, tmp_path):
    write_images(tmp_path, 1)
    (tmp_path / "in.csv").write_text("id,image,prompt,max_tokens\n1,img000.png,Hi,3\n2,,Hello,2\n")
    run_job(llm, tmp_path / "in.csv", tmp_path / "out.jsonl", JobSpec(sampling=GREEDY), progress=False)
    out = by_id(read_output(tmp_path / "out.jsonl"))
    assert out["1"]["usage"]["completion_tokens"] == 3 and out["1"]["usage"]["image_tokens"] > 0
    assert out["2"]["usage"]["completion_tokens"] == 2


def test_jsonl_resume_discards_a_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a", "text": "x"}\n{"id": "b", "te')
    sink = JsonlSink(path)
    assert sink.done == {"a"}
    sink.write([{"id": "b", "text": "y"}])
    sink.close()
    assert [r["id"] for r in read_output(path)] == ["a", "b"]


def test_parquet_resume_ignores_an_unrenamed_part(tmp_path):
    sink = ParquetSink(tmp_path / "o.parquet", part_rows=2)
    sink.write([{"id": "a"}, {"id": "b"}])
    (tmp_path / "o.parquet" / ".part-000001.parquet.tmp").write_bytes(b"half a part")
    sink = ParquetSink(tmp_path / "o.parquet")
    assert sink.done == {"a", "b"} and not list((tmp_path / "o.parquet").glob(".*.tmp"))


def test_kill_9_then_rerun_leaves_every_id_exactly_once(tiny_dir, tmp_path):
    names = write_images(tmp_path, 3)
    rows = [{"id": f"k{i}", "image": names[i % 3], "prompt": f"Row {i}?"} for i in range(24)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "minicpmv.cli", "batch", str(tiny_dir), str(path), str(out), "--dtype", "float32",
               "--max-tokens", "6", "--temperature", "0", "--max-num-seqs", "4", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = len(read_output(out))
    assert 4 <= first < 24
    done = subprocess.run(command, env=env, capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()
    assert f"{first} already done" in done.stderr.decode()
    records = read_output(out)
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in rows)  # each exactly once
    assert all(r["error"] is None for r in records)


def test_missing_extras_are_named(tmp_path, monkeypatch, capsys):
    from minicpmv.cli import main

    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "hi"}\n')
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert main(["batch", str(tmp_path), str(tmp_path / "in.jsonl"), str(tmp_path / "o.jsonl"), "--ray"]) == 1
    assert "pip install 'minicpmv[ray]'" in capsys.readouterr().err
    assert main(["batch", str(tmp_path), str(tmp_path / "in.jsonl"), str(tmp_path / "o.parquet")]) == 1
    assert "pip install 'minicpmv[batch]'" in capsys.readouterr().err
