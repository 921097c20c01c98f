"""Reliability (issue 7): each promise of the classify job, and a test that tries to break it.

    bad rows          one output row each: labeled (long text truncated, flagged), or `error` set, `label` null
    bad inputs        exit 2 with one `error: ...` line saying what is wrong and what to do, before Ray starts
    crashed actors    replaced by Ray, their blocks run again, every row written once
    interrupted runs  the same command resumes: finished rows are kept, each id is in the output once
    untrusted files   no code runs from a policy or a model folder unless asked; nothing lands outside --output
    load              100,000+ rows stream through with bounded memory

Most tests run the job in this process on the session's test cluster (ray_connected); the bad-input
cases run its main() with Ray out of reach. Two run `python jobs/classify.py` as a user does: the
killed-and-resumed run and the load test, each starting its own local Ray, as a user's run does, in
its own temp folder.
"""

import contextlib
import glob
import io as io_module
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adainfer_ray import io
from adainfer_ray.job import JobConfig, run_classify
from adainfer_ray.policy import find_policy
from adainfer_ray.resume import ResumeError, done_ids, drop_done
from adainfer_ray.schema import OUTPUT_SCHEMA, SIDECAR_NAME
from conftest import review_texts, save_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_cli():
    """jobs/classify.py as a module, for tests that call its main() in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("classify_cli", os.path.join(ROOT, "jobs", "classify.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


classify_cli = _load_cli()


def read_output(folder) -> pa.Table:
    files = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else OUTPUT_SCHEMA.empty_table()


def written_rows(folder) -> int:
    """Rows in the complete (readable) Parquet files of an output folder, reading footers only."""
    n = 0
    for f in glob.glob(os.path.join(folder, "*.parquet")):
        try:
            n += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # noqa: BLE001 - a file being written has no footer yet
            pass
    return n


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def job(tiny_model_dir, tmp_path, input, **kw) -> tuple[dict, list[str]]:
    """Run the job in this process on the test cluster; returns its run record and what it logged."""
    logged = []
    cfg = dict(input=str(input), output=str(tmp_path / "out"), model=str(tiny_model_dir), policy="full",
               batch_size=16, audit_fraction=0.0)
    run = run_classify(JobConfig(**{**cfg, **kw}), log=lambda *a: logged.append(" ".join(map(str, a))))
    return run, logged


# -- bad rows ----------------------------------------------------------------------------------------


def test_every_bad_row_gets_exactly_one_output_row(ray_connected, tiny_model_dir, tmp_path):
    huge = "an endless review, " * 55_000  # about 1 MB
    lines = [  # (id, the raw JSON line, what the row must get: a label, or an error containing this)
        ("ok", json.dumps({"id": "ok", "text": "a lovely film"}).encode(), "label"),
        ("null", b'{"id": "null", "text": null}', "text is null"),
        ("missing", b'{"id": "missing", "body": "no text field"}', "text is null"),
        ("empty", b'{"id": "empty", "text": ""}', "text is empty"),
        ("blank", b'{"id": "blank", "text": " \\n\\t  "}', "text is empty"),
        ("int", b'{"id": "int", "text": 42}', "text is int"),
        ("list", b'{"id": "list", "text": ["a", "b"]}', "text is list"),
        ("dict", b'{"id": "dict", "text": {"a": 1}}', "text is dict"),
        ("bool", b'{"id": "bool", "text": true}', "text is bool"),
        ("nan", b'{"id": "nan", "text": NaN}', "text is float"),
        ("bad_utf8", b'{"id": "bad_utf8", "text": "caf\xe9 \xff\xfe great"}', "label"),
        ("surrogate", b'{"id": "surrogate", "text": "lonely \\ud800 half"}', "label"),
        ("control", json.dumps({"id": "control", "text": "a\x00b\x07c\x1b[31m red \x7f"}).encode(), "label"),
        ("scripts", json.dumps({"id": "scripts", "text": "とても良い映画 фильм отличный رائع 🙂"}).encode(), "label"),
        ("huge", json.dumps({"id": "huge", "text": huge}).encode(), "label"),
        (7, b'{"id": 7, "text": "a numeric id"}', "label"),
        ("in.jsonl:16", b'{"id": "not json', "invalid JSON line"),
        ("in.jsonl:17", b"[1, 2, 3]", "must be an object"),
    ]
    with open(tmp_path / "in.jsonl", "wb") as f:
        f.write(b"\n".join(raw for _, raw, _ in lines) + b"\n\n")  # a trailing blank line is no row

    run, _ = job(tiny_model_dir, tmp_path, tmp_path / "in.jsonl", batch_size=4)

    out = read_output(tmp_path / "out")
    ids = out.column("id").to_pylist()
    assert sorted(ids) == sorted(str(i) for i, _, _ in lines) and len(set(ids)) == len(ids)  # rows in = rows out
    rows = {r["id"]: r for r in out.to_pylist()}
    for i, _, expect in lines:
        r = rows[str(i)]
        if expect == "label":
            assert r["error"] is None and r["label"] in ("negative", "positive"), r
        else:
            assert expect in r["error"] and r["label"] is None and r["exit_layer"] is None, r
    assert rows["huge"]["truncated"] and rows["huge"]["num_tokens"] <= 2048
    assert not rows["ok"]["truncated"]
    assert run["rows"] == len(lines) and run["errors"] == sum(e != "label" for _, _, e in lines)


def test_a_row_that_breaks_the_engine_becomes_one_error_row(tiny_model_dir):
    from adainfer_ray.job.actor import Classifier

    clf = Classifier.from_config(JobConfig(model=str(tiny_model_dir), policy="full"), threads=1)
    poison = clf.encoder.encode(["poison pill"]).item_ids[0]
    classify = clf.engine.classify

    def fragile(items, audit):  # the engine fails on any batch that holds the poison row
        if any(list(item) == poison for item in items):
            raise RuntimeError("boom")
        return classify(items, audit)

    clf.engine.classify = fragile
    texts = ["a fine film", "poison pill", "awful food"]
    out = clf({"id": np.array(["a", "b", "c"], dtype=object), "text": np.array(texts, dtype=object),
               "gold_label": np.array([None] * 3, dtype=object), "input_error": np.array([None] * 3, dtype=object)})
    rows = {r["id"]: r for r in out.to_pylist()}
    assert rows["b"]["error"] == "labeling failed: RuntimeError: boom" and rows["b"]["label"] is None
    assert rows["a"]["label"] and rows["c"]["label"] and rows["a"]["error"] is None and rows["c"]["error"] is None


def test_readers_keep_every_row_of_bad_csv_and_parquet(tmp_path):
    """CSV and Parquet cannot mix types in a column like JSON can; what they can hold, they hold."""
    (tmp_path / "in.csv").write_bytes(b'id,text\na,"caf\xe9 \xff bytes"\nb,\nc,"line one\nline two"\nd,fine\n')
    rows = [r for t in io.read_rows(str(tmp_path / "in.csv"), "csv", "text", "id") for r in t.to_pylist()]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[0]["text"] == "caf\ufffd \ufffd bytes" and rows[0]["input_error"] is None  # replaced, labeled
    assert rows[1]["text"] is None  # an empty CSV field is null: an error row later, not a lost row

    pq.write_table(pa.table({"id": ["x", "y", "z"], "text": pa.array([b"ok", b"\xff\xfe", None], pa.binary())}),
                   tmp_path / "bin.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "int.parquet")
    rows = [r for f in ("bin", "int") for t in io.read_rows(str(tmp_path / f"{f}.parquet"), "parquet", "text", "id")
            for r in t.to_pylist()]
    assert [r["id"] for r in rows] == ["x", "y", "z", "int.parquet:0", "int.parquet:1"]
    assert rows[1]["text"] == "\ufffd\ufffd" and rows[3]["input_error"] == "text is int, not a string"


def test_truncation_keeps_the_template_and_the_end_of_the_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    from adainfer_ray.prompts import SENTIMENT, PromptEncoder

    enc = PromptEncoder(SENTIMENT, AutoTokenizer.from_pretrained(tiny_model_dir), max_tokens=2048)
    batch = enc.encode(["word " * 300_000, "short one"])
    long, short = batch.item_ids
    assert batch.truncated == [True, False]
    assert len(batch.prefix_ids) + len(long) <= 2048  # fits the context, shared prefix included
    for item in (long, short):  # "Review: " ... "\nSentiment:" survive whole: the model answers after the tail
        assert item[: len(enc.head_ids)] == enc.head_ids and item[-len(enc.tail_ids):] == enc.tail_ids


def test_outer_whitespace_never_reaches_the_model(tiny_model_dir):
    """A trailing space or newline from the file format must not become a token before the answer."""
    from transformers import AutoTokenizer

    from adainfer_ray.prompts import SENTIMENT, PromptEncoder

    enc = PromptEncoder(SENTIMENT, AutoTokenizer.from_pretrained(tiny_model_dir), max_tokens=2048)
    plain, padded, inner = enc.encode(["a charming journey .", "  a charming journey . \n", "a  charming journey ."]).item_ids
    assert padded == plain
    assert inner != plain  # only the outer whitespace goes: the text itself is the user's


# -- zero rows ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["empty jsonl files", "zero-row parquet"])
def test_an_input_with_zero_rows_finishes_with_an_empty_output(ray_connected, tiny_model_dir, tmp_path, capsys, kind):
    folder = tmp_path / "in"
    folder.mkdir()
    if kind == "empty jsonl files":
        (folder / "a.jsonl").write_bytes(b"")
        (folder / "b.jsonl").write_text("\n  \n")
    else:
        pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                       folder / "a.parquet")
    out = tmp_path / "out"
    code = classify_cli.main(["--input", str(folder), "--output", str(out), "--model", str(tiny_model_dir),
                              "--policy", "full"])
    assert code == 0
    assert "the input holds no rows" in capsys.readouterr().out
    table = read_output(out)
    assert table.num_rows == 0 and table.schema == OUTPUT_SCHEMA  # an empty table any reader can open
    side = json.loads((out / SIDECAR_NAME).read_text())
    assert side["rows"] == 0 and side["errors"] == 0


# -- bad inputs: one clear line, exit 2, before any actor starts -----------------------------------


class Bomb:
    """Unpickling this creates a file: proof that a pickle was (or, in these tests, was not) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def bad_inputs(tiny_model_dir, tiny_policy_dir, tmp_path_factory):
    """Every bad-input case, each jobs/classify.py's main() in this process with Ray out of reach:
    reaching it raises. (As 14 `python jobs/classify.py` processes they took 42 s, mostly importing
    torch; test_pipeline and test_dryrun run the same preflight as a process, exit code and all.)"""
    d = tmp_path_factory.mktemp("bad-inputs")
    good = d / "good.jsonl"
    write_jsonl(good, [{"id": f"g{i}", "text": t} for i, t in enumerate(review_texts(5))])
    marker = str(d / "code-ran")

    pq.write_table(pa.table({"id": [f"p{i}" for i in range(500)], "text": review_texts(500)}), d / "whole.parquet")
    blob = (d / "whole.parquet").read_bytes()
    (d / "cut.parquet").write_bytes(blob[: len(blob) // 2])  # a copy cut short: no footer
    pq.write_table(pa.table({"review": ["hi"], "stars": [5]}), d / "columns.parquet")

    def policy_copy(name):
        folder = d / name
        shutil.copytree(tiny_policy_dir, folder)
        return folder

    (policy_copy("garbled-policy") / "policy.json").write_text("{not json")
    (policy_copy("pickled-policy") / "arrays.safetensors").write_bytes(pickle.dumps(Bomb(marker)))

    def model_copy(name, **config_changes):
        folder = d / name
        shutil.copytree(tiny_model_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
        return folder

    other_model = model_copy("other-model", rms_norm_eps=1e-5)  # other weights, as far as a policy knows
    remote = model_copy("remote-code-model", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilLM"})
    (remote / "modeling_evil.py").write_text(f"open({marker!r}, 'w')\n")
    remote_tok = model_copy("remote-tokenizer-model")
    tok = json.loads((remote_tok / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (remote_tok / "tokenizer_config.json").write_text(json.dumps(tok))
    (d / "bert").mkdir()
    (d / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    (d / "a-file").write_text("a regular file, not a folder")

    cases = {  # name: (flags over the good defaults, what the error line must say)
        "missing input": (["--input", str(d / "nope.jsonl")], ["does not exist", "check --input"]),
        "corrupt parquet": (["--input", str(d / "cut.parquet")], ["cannot read", "fix or remove that file"]),
        "wrong text column": (["--input", str(d / "columns.parquet")], ["no column 'text'", "review, stars"]),
        "garbled policy": (["--policy", str(d / "garbled-policy")],
                           ["cannot read exit policy", "jobs/calibrate.py"]),
        "pickled policy": (["--policy", str(d / "pickled-policy")],
                           ["cannot read exit policy", "jobs/calibrate.py"]),
        "missing policy": (["--policy", str(d / "no-policy")], ["cannot read exit policy", "jobs/calibrate.py"]),
        "policy of another model": (["--policy", str(tiny_policy_dir), "--model", str(other_model)],
                                    ["calibrated for model", "recalibrate with --calibrate N"]),
        "policy of another template": (["--policy", str(tiny_policy_dir), "--template", r"Text: {text}\nMood:"],
                                       ["another prompt template", "recalibrate with --calibrate N"]),
        "template without {text}": (["--template", "no placeholder"], ["{text}"]),
        "unsupported architecture": (["--model", str(d / "bert")], ["'bert' is not supported", "llama"]),
        "missing model": (["--model", str(d / "no-model")], ["no config.json", "Hugging Face model folder"]),
        "remote code model": (["--model", str(remote)], ["own Python code", "--trust-remote-code"]),
        "remote code tokenizer": (["--model", str(remote_tok)], ["own Python code", "--trust-remote-code"]),
        "unwritable output": (["--output", str(d / "a-file" / "out")], ["cannot write to output", "--output"]),
    }

    def reached_ray():
        raise AssertionError("a bad input reached Ray")

    def run(name):
        flags, _ = cases[name]
        base = {"--input": str(good), "--model": str(tiny_model_dir), "--policy": "full",
                "--output": str(d / name.replace(" ", "-") / "out")}
        args = [a for k, v in base.items() if k not in flags for a in (k, v)] + flags
        stderr = io_module.StringIO()
        # RAY_ADDRESS set: the job runs its preflight before joining Ray, as under `ray job submit`.
        with mock.patch.dict(os.environ, {"RAY_ADDRESS": "127.0.0.1:1"}), \
                mock.patch("adainfer_ray.job.cluster.init_ray", reached_ray), contextlib.redirect_stderr(stderr):
            try:
                returncode = classify_cli.main(args)
            except Exception:  # noqa: BLE001 - reported by the case's own test, with its traceback
                traceback.print_exc()
                returncode = 1
        return subprocess.CompletedProcess(args, returncode, "", stderr.getvalue())

    results = {name: run(name) for name in cases}
    return {"cases": cases, "results": results, "marker": marker, "dir": d}


BAD_INPUTS = ["missing input", "corrupt parquet", "wrong text column", "garbled policy", "pickled policy",
              "missing policy", "policy of another model", "policy of another template", "template without {text}",
              "unsupported architecture", "missing model", "remote code model", "remote code tokenizer",
              "unwritable output"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_with_one_clear_line_before_ray(bad_inputs, case):
    r, (_, must_say) = bad_inputs["results"][case], bad_inputs["cases"][case]
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-3000:]
    for words in must_say:
        assert words in last, last
    assert not os.path.exists(bad_inputs["marker"])  # no pickle was loaded, no model code imported
    assert not glob.glob(str(bad_inputs["dir"] / case.replace(" ", "-") / "out" / "*"))  # nothing written


def test_bad_inputs_cover_every_case(bad_inputs):
    assert sorted(BAD_INPUTS) == sorted(bad_inputs["cases"])


def test_a_file_found_corrupt_mid_run_stops_with_one_line(ray_connected, tiny_model_dir, tmp_path, capsys):
    """Its footer is fine, so the pre-flight check passes; a damaged page fails its read task."""
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(2000)], "text": review_texts(2000)}),
                   tmp_path / "in.parquet", row_group_size=500)
    blob = bytearray((tmp_path / "in.parquet").read_bytes())
    page = pq.ParquetFile(tmp_path / "in.parquet").metadata.row_group(2).column(1).data_page_offset
    blob[page + 40: page + 240] = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    (tmp_path / "in.parquet").write_bytes(bytes(blob))
    code = classify_cli.main(["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
                              "--model", str(tiny_model_dir), "--policy", "full"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot read") and "in.parquet" in last
    assert "fix or remove that file and run the same command again" in last  # the reader's words, not preflight's


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    """Only errors in what the user gave become one line; a bug must stay debuggable."""
    import adainfer_ray.job as job

    def boom(cfg, **_):  # run_classify(cfg, started_at=...)
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(job, "run_classify", boom)
    with pytest.raises(ValueError, match="a bug"):
        classify_cli.main(["--policy", "full"])


def test_a_loss_ray_cannot_recover_from_ends_with_one_line_that_says_the_same_command_resumes(capsys):
    from ray.exceptions import RaySystemError

    from adainfer_ray.cli import run_main
    from adainfer_ray.job.run import _stop_if_ray_gave_up

    def lost_cluster():
        try:
            raise RaySystemError("the node holding this object died")
        except RaySystemError as inner:
            error = RuntimeError("Ray Data gave up")  # as the streaming executor wraps it
            error.__cause__ = inner
        _stop_if_ray_gave_up(error, log=lambda *a: None)
        raise error

    assert run_main(lost_cluster) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "RaySystemError" in err and "run the same command again to resume" in err
    assert _stop_if_ray_gave_up(ValueError("a bug"), log=print) is None  # a bug is no lost node: raised as it is


def test_user_errors_raised_inside_ray_tasks_still_print_one_line(monkeypatch, capsys):
    import ray.exceptions

    import adainfer_ray.job as job

    def fails_in_a_task(cfg, **_):
        cause = io.InputError("cannot read x.parquet as parquet: Corrupt snappy\ncompressed data")
        wrapped = ray.exceptions.RayTaskError("read", "Traceback (most recent call last):\n  ...", cause)
        raise wrapped.as_instanceof_cause()

    monkeypatch.setattr(job, "run_classify", fails_in_a_task)
    assert classify_cli.main(["--policy", "full"]) == 2
    assert capsys.readouterr().err == "error: cannot read x.parquet as parquet: Corrupt snappy compressed data\n"


# -- crashed actors ----------------------------------------------------------------------------------


def test_a_crashed_actor_is_replaced_and_its_block_run_again(ray_connected, tiny_model_dir, tmp_path, monkeypatch):
    from ray.util.state import list_actors

    # Three files -> three blocks of two batches. The actor exits during its third call (the first
    # batch of block 2); its replacement reruns block 2, then exits in block 3; the third finishes.
    for k in range(3):
        write_jsonl(tmp_path / f"part{k}.jsonl", [{"id": f"f{k}-{i}", "text": t}
                                                 for i, t in enumerate(review_texts(32, seed=k))])
    monkeypatch.setenv("ADAINFER_CRASH_AFTER_BATCHES", "2")  # job.cluster hands ADAINFER_* to the actors
    run, _ = job(tiny_model_dir, tmp_path, tmp_path / "*.jsonl", batch_size=16)

    ids = read_output(tmp_path / "out").column("id").to_pylist()
    assert sorted(ids) == sorted(f"f{k}-{i}" for k in range(3) for i in range(32))  # each row exactly once
    assert run["errors"] == 0
    ours = [a for a in list_actors(detail=True, limit=10_000)
            if "ADAINFER_CRASH_AFTER_BATCHES" in (a.serialized_runtime_env or "")]
    assert sum(a.num_restarts for a in ours) >= 1  # the drill really killed an actor


def test_a_row_that_kills_its_actor_every_time_ends_as_one_error_row(ray_connected, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    from adainfer_ray.runstate import ROW_KILL_LIMIT

    texts = review_texts(40, seed=5)
    texts[13] = "lovely film POISON-ROW lovely"  # os._exit()s whichever actor labels it, on every attempt
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)])
    monkeypatch.setenv("ADAINFER_CRASH_ON_TEXT", "POISON-ROW")
    run, _ = job(tiny_model_dir, tmp_path, tmp_path / "in.jsonl", batch_size=16)

    table = read_output(tmp_path / "out")
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(f"r{i}" for i in range(40))  # the job finished, each row once
    assert rows["r13"]["label"] is None
    assert f"killed the model actor {ROW_KILL_LIMIT} times" in rows["r13"]["error"]
    others = [r for i, r in rows.items() if i != "r13"]
    assert all(r["error"] is None and r["label"] in ("negative", "positive") for r in others)  # its block too
    assert run["errors"] == 1


# -- interrupted runs --------------------------------------------------------------------------------


def start_cli(args, ray_tmp, **popen):
    """`python jobs/classify.py ...` starting its own local Ray in `ray_tmp`, as a user's run does (with
    the token file, not the exports of cluster/local.sh env: Ray turns token auth on by itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    return subprocess.Popen([sys.executable, "jobs/classify.py", *args], cwd=ROOT,
                            env={**env, "RAY_TMPDIR": ray_tmp}, **popen)


def descendants(proc, seen: dict) -> dict:
    """Add the processes `proc` has started so far (Ray's head, raylet, workers) to `seen`, by pid."""
    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            seen.setdefault(p.pid, p)
    except psutil.NoSuchProcess:
        pass
    return seen


def reap(seen: dict, wait_s: float = 5) -> list:
    """Wait for the processes a run started to exit; kill (by pid) and return those still alive."""
    _, alive = psutil.wait_procs(list(seen.values()), timeout=wait_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    return alive


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(tiny_model_dir, tmp_path):
    n = 2000
    for k in range(4):  # four files: four blocks, written as they finish
        write_jsonl(tmp_path / f"part{k}.jsonl", [{"id": f"r{k}-{i}", "text": t}
                                                 for i, t in enumerate(review_texts(n // 4, seed=k))])
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "*.jsonl"), "--output", str(out), "--model", str(tiny_model_dir),
            "--policy", "full", "--batch-size", "25", "--audit-fraction", "0"]
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        first, seen = start_cli(args, ray_tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), {}
        while not written_rows(out) and first.poll() is None:  # until the first complete file
            descendants(first, seen)
            time.sleep(0.05)
        descendants(first, seen)
        first.send_signal(signal.SIGKILL)  # as the OOM killer or a lost node would: no cleanup at all
        first.wait()
        reap(seen)  # its Ray dies with it (raylet and workers at once; Ray's agents would take a minute)

        kept = {}  # the complete files; one being written when the kill came is cut short, unreadable
        for f in glob.glob(str(out / "*.parquet")):
            try:
                pq.ParquetFile(f)
                kept[f] = Path(f).read_bytes()
            except Exception:  # noqa: BLE001
                pass
        before = written_rows(out)
        assert 0 < before < n, "the kill came too late to test a resume"
        killed = json.loads((out / SIDECAR_NAME).read_text())  # written as the run started: who writes here
        assert killed["runs"][-1]["end_time"] is None and killed["model_hash"]

        second = start_cli(args, ray_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = second.communicate(timeout=600)
        assert second.returncode == 0, stderr[-3000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert f"resuming: {before} rows already in" in stdout
    ids = read_output(out).column("id").to_pylist()
    assert len(ids) == n and len(set(ids)) == n  # the union holds each id exactly once
    for f, blob in kept.items():  # the first run's complete files are untouched: not labeled again
        assert Path(f).read_bytes() == blob
    side = json.loads((out / SIDECAR_NAME).read_text())
    assert side["resumed_rows"] == before and side["rows_this_run"] == n - before and side["rows"] == n
    assert len(side["runs"]) == 2 and side["runs"][0].get("wall_s") is None  # the killed run: no time to count
    assert side["runs"][1]["rows_this_run"] == n - before and side["runs"][1]["wall_s"] == side["wall_s"]


def test_resume_drops_a_file_cut_short_and_keeps_complete_ones(ray_connected, tiny_model_dir, tmp_path):
    """What a crash leaves behind, made by hand: one complete file and one cut mid-write."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(review_texts(120))])
    out = tmp_path / "out"
    out.mkdir()

    def earlier_rows(ids):  # rows an earlier run wrote, with a label no model would give
        n = len(ids)
        return pa.table({f.name: pa.nulls(n, f.type) for f in OUTPUT_SCHEMA}).set_column(
            0, "id", pa.array(ids)).set_column(1, "label", pa.array(["from-run-1"] * n))

    pq.write_table(earlier_rows([f"r{i}" for i in range(40)]), out / "complete.parquet")
    pq.write_table(earlier_rows([f"r{i}" for i in range(40, 80)]), out / "cut.parquet")
    blob = (out / "cut.parquet").read_bytes()
    (out / "cut.parquet").write_bytes(blob[: len(blob) - 30])  # the footer never got written

    run, logged = job(tiny_model_dir, tmp_path, tmp_path / "in.jsonl")

    assert any("resuming: 40 rows" in line for line in logged)
    assert not (out / "cut.parquet").exists()
    table = read_output(out)
    labels = dict(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
    assert table.num_rows == 120 and sorted(labels) == sorted(f"r{i}" for i in range(120))
    assert all(labels[f"r{i}"] == "from-run-1" for i in range(40))  # kept, not labeled again
    assert all(labels[f"r{i}"] in ("negative", "positive") for i in range(40, 120))  # the cut file's rows redone
    assert run["resumed_rows"] == 40 and run["rows_this_run"] == 80 and run["rows"] == 120

    files = {f: Path(f).read_bytes() for f in glob.glob(str(out / "*.parquet"))}
    run, logged = job(tiny_model_dir, tmp_path, tmp_path / "in.jsonl")  # once more: nothing is left to do
    assert any("nothing left to label" in line for line in logged)
    assert {f: Path(f).read_bytes() for f in glob.glob(str(out / "*.parquet"))} == files
    assert run["rows_this_run"] == 0 and run["rows"] == 120
    assert [r["rows_this_run"] for r in run["runs"]] == [80, 0]  # the history of runs, each its own rows


def test_same_file_names_in_different_folders_get_different_ids(ray_connected, tiny_model_dir, tmp_path):
    for d in ("a", "b/c"):
        (tmp_path / "in" / d).mkdir(parents=True)
        write_jsonl(tmp_path / "in" / d / "part-0.jsonl", [{"text": t} for t in review_texts(30, seed=len(d))])
    fs, files, roots = io.list_files(str(tmp_path / "in"))
    ids = [i for f, r in zip(files, roots) for t in io.read_rows(f, "jsonl", "text", root=r) for i in t["id"].to_pylist()]
    assert ids[0] == "a/part-0.jsonl:0" and ids[-1] == "b/c/part-0.jsonl:29" and len(set(ids)) == 60
    assert io.list_files(str(tmp_path / "in" / "*" / "part-0.jsonl"))[2] == [str(tmp_path / "in")]
    assert io.relative_name(files[0], io.list_files(files[0])[2][0]) == "part-0.jsonl"  # one file: its name

    # An earlier run wrote 30 of the rows: a resume labels exactly the other 30 (with ids from base
    # names, the rows of one file would pass for those of the other and be skipped).
    run, _ = job(tiny_model_dir, tmp_path, tmp_path / "in", limit=30)
    assert run["rows"] == 30
    run, logged = job(tiny_model_dir, tmp_path, tmp_path / "in")
    assert run["resumed_rows"] == 30 and run["rows_this_run"] == 30
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == sorted(ids)


def earlier_output(folder, ids):
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({f.name: pa.nulls(len(ids), f.type) for f in OUTPUT_SCHEMA}).set_column(0, "id", pa.array(ids))
    pq.write_table(table, folder / "part.parquet")
    return (folder / "part.parquet").read_bytes()


def test_an_unreadable_output_file_is_set_aside_or_stops_the_run_never_silently_deleted(tmp_path):
    import fsspec

    blob = earlier_output(tmp_path / "out", ["x", "y"])
    # Ends like Parquet ('PAR1') but damaged inside: not a cut-short write, so moved aside, not deleted.
    (tmp_path / "out" / "part.parquet").write_bytes(blob[:8] + b"\0" * (len(blob) - 12) + blob[-4:])
    logged = []
    assert len(done_ids(str(tmp_path / "out"), log=logged.append)) == 0
    assert (tmp_path / "out" / "_quarantine" / "part.parquet").exists() and "moved" in logged[0]
    assert io.output_files(str(tmp_path / "out")) == []  # set aside: no longer read as output

    # On other storage an unreadable file may be a throttle or a lost credential: stop, touch nothing.
    mem = fsspec.filesystem("memory")
    mem.pipe("/resume-test/out/part.parquet", blob[:-30])
    with pytest.raises(ResumeError, match="cannot read .*part.parquet.*nothing was changed"):
        done_ids("memory://resume-test/out")
    assert mem.cat("/resume-test/out/part.parquet") == blob[:-30]
    mem.rm("/resume-test", recursive=True)


def test_a_rerun_with_another_policy_refuses_unless_overwrite(ray_connected, tiny_model_dir, tiny_policy_dir,
                                                               tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(review_texts(40))])
    first, _ = job(tiny_model_dir, tmp_path, tmp_path / "in.jsonl", limit=20)
    with pytest.raises(ResumeError, match=f"policy_fingerprint '{first['policy_fingerprint']}' there, '[0-9a-f]+' now"):
        job(tiny_model_dir, tmp_path, tmp_path / "in.jsonl", policy=str(tiny_policy_dir))
    assert read_output(tmp_path / "out").num_rows == 20  # nothing was touched

    # The same refusal from the command: one line, before Ray (RAY_ADDRESS leads nowhere).
    r = subprocess.run([sys.executable, "jobs/classify.py", "--input", str(tmp_path / "in.jsonl"), "--output",
                        str(tmp_path / "out"), "--model", str(tiny_model_dir), "--policy", str(tiny_policy_dir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: --output") and "pass --overwrite" in last, r.stderr[-2000:]

    run, logged = job(tiny_model_dir, tmp_path, tmp_path / "in.jsonl", policy=str(tiny_policy_dir), overwrite=True)
    assert any("--overwrite: deleted" in line for line in logged)
    assert run["resumed_rows"] == 0 and run["rows"] == 40 and len(run["runs"]) == 1
    assert run["policy_fingerprint"] != first["policy_fingerprint"]


def test_a_rerun_that_would_handle_texts_otherwise_refuses(ray_connected, tiny_model_dir, tmp_path):
    """An output written before texts were stripped of outer whitespace records no text handling:
    continuing it now would label half its rows from other prompts, so the rerun is refused."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": t + " "} for i, t in enumerate(review_texts(30))])
    first, _ = job(tiny_model_dir, tmp_path, tmp_path / "in.jsonl", limit=10)
    assert first["text_handling"] == "strip"
    side = tmp_path / "out" / SIDECAR_NAME
    side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != "text_handling"}))
    with pytest.raises(ResumeError, match="text_handling 'as-is' there, 'strip' now"):
        job(tiny_model_dir, tmp_path, tmp_path / "in.jsonl")
    assert read_output(tmp_path / "out").num_rows == 10  # nothing was touched


def test_throughput_counts_each_run_with_its_own_rows_and_time():
    from adainfer_ray.report import summarize_throughput

    side = {"rows": 300, "wall_s": 20.0, "device": "cpu", "rows_this_run": 200,
            "runs": [{"rows_this_run": 100, "wall_s": 80.0, "device": "cpu"},
                     {"rows_this_run": 0, "wall_s": None, "device": "cpu"},  # killed: its time is unknown
                     {"rows_this_run": 200, "wall_s": 20.0, "device": "cpu"}]}
    t = summarize_throughput(["out"], [side])
    assert t["wall_s"] == 100.0 and t["rows_per_s"] == pytest.approx(3.0) and t["sidecar_rows"] == 300


def test_the_done_filter_is_exact_and_refuses_foreign_files(ray_connected, tmp_path):
    import ray

    ids = ["", "a", "ab", "a/b", "../../x", "🙂", "r1", "r10", "r100"] + [f"id{i}" for i in range(5000)]
    done = ids[::2]
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({f.name: pa.nulls(len(done), f.type) for f in OUTPUT_SCHEMA}).set_column(
        0, "id", pa.array(done)), out / "part.parquet")
    keys = done_ids(str(out))
    assert len(keys) == len(done)
    left = drop_done(pa.table({"id": ids}), ray.put(keys)).column("id").to_pylist()
    assert left == ids[1::2]

    pq.write_table(pa.table({"id": ["x"], "text": ["not our output"]}), out / "someone-elses.parquet")
    with pytest.raises(ResumeError, match="not this job's output"):
        done_ids(str(out))
    assert (out / "someone-elses.parquet").exists()  # never deleted: only files cut short are
    (out / "someone-elses.parquet").unlink()

    older = [f for f in OUTPUT_SCHEMA if f.name not in ("label_probs", "after_drift")]  # before those columns
    pq.write_table(pa.table({f.name: pa.nulls(1, f.type) for f in older}), out / "older.parquet")
    with pytest.raises(ResumeError, match="older version of this job .*label_probs, after_drift"):
        done_ids(str(out))


# -- untrusted files ---------------------------------------------------------------------------------


def test_policy_artifacts_load_without_unpickling_anything(tiny_policy_dir, monkeypatch):
    import torch

    from adainfer_ray.prompts import SENTIMENT

    def refuse(*a, **k):
        raise AssertionError("a policy load tried to unpickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    policy = find_policy(str(tiny_policy_dir), "tiny", SENTIMENT.name)
    assert policy.metadata["task"] == "sentiment" and policy.decision_function(np.zeros((1, 3))).shape == (1,)


def test_ids_never_steer_where_files_are_written(ray_connected, tiny_model_dir, tmp_path):
    escape = tmp_path / "escaped.parquet"
    ids = ["../../evil", "../evil.parquet", str(escape), "/etc/passwd", "a/b/c", "..", ".", "", "~", "x\x00y",
           "..\\..\\win", "%2e%2e%2fup", "_run.json", "CON"]
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": "a fine film"} for i in ids])

    def everything():  # every path under tmp_path, hidden ones included
        return {os.path.join(d, n) for d, dirs, files in os.walk(tmp_path) for n in dirs + files}

    before = everything()
    job(tiny_model_dir, tmp_path, tmp_path / "in.jsonl")
    new = everything() - before
    assert new and all(p.startswith(str(tmp_path / "out")) for p in new), sorted(new)
    assert not escape.exists()
    assert sorted(read_output(tmp_path / "out").column("id").to_pylist()) == sorted(ids)  # ids kept verbatim


# -- load --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tinier_model_dir(tmp_path_factory):
    """Two layers, 32 wide, with the real tokenizer: the load test measures the pipeline, not the model."""
    return save_tiny_llama(tmp_path_factory.mktemp("tinier-llama"), hidden=32, layers=2, heads=2)


def rss_mb(procs) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


@pytest.mark.slow
def test_memory_stays_bounded_while_100k_rows_stream_through(tinier_model_dir, tmp_path):
    n, files = 120_000, 24
    rng = np.random.default_rng(0)
    words = np.array(["good", "bad", "film", "food", "slow", "great", "never", "again", "fine", "cold"])
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(files):
        texts = [" ".join(rng.choice(words, 6)) for _ in range(n // files)]
        pq.write_table(pa.table({"id": [f"{k}-{i}" for i in range(len(texts))], "text": texts}),
                       folder / f"part-{k:02d}.parquet")
    out = tmp_path / "out"
    args = ["--input", str(folder), "--output", str(out), "--model", str(tinier_model_dir), "--policy", "full",
            "--labels", "bad,good", "--batch-size", "1000", "--audit-fraction", "0"]
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    samples = []  # (rows written so far, MB held by the driver and every process of its Ray)
    try:
        proc, seen = start_cli(args, ray_tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), {}
        while proc.poll() is None:
            descendants(proc, seen)
            samples.append((written_rows(out), rss_mb([psutil.Process(proc.pid), *seen.values()])))
            time.sleep(0.5)
        log = proc.stdout.read()
        reap(seen)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, log[-3000:]
    assert json.loads((out / SIDECAR_NAME).read_text())["rows"] == n

    # Warm-up ends when the first rows are written; after that, memory must not follow the row count.
    # Measured here: +15 to +25 MB from the first quarter to the end, on about 3.4 GB that the driver
    # and a local Ray with its dashboard hold; a leak of 1 KB per row would add about 90 MB, holding
    # the output on the driver far more.
    streaming = [(r, mb) for r, mb in samples if 0 < r < n]
    early = max(mb for r, mb in streaming if r <= n // 4)
    late = max(mb for r, mb in streaming if r >= n // 2)
    print(f"\nload test: {n} rows, {len(samples)} samples; peak RSS of the driver and its Ray: {early:.0f} MB "
          f"while the first quarter was written, {late:.0f} MB after half, {max(mb for _, mb in samples):.0f} MB "
          f"overall (including start and shutdown)")
    assert late - early < 80, f"memory grew by {late - early:.0f} MB from the first quarter of the rows to the end"


def test_a_preflight_that_fails_beside_a_starting_ray_prints_one_line_and_leaves_no_ray(tiny_model_dir, tmp_path):
    """Without RAY_ADDRESS the job starts its own Ray while the preflight runs (job.cluster.preflight_and_init_ray):
    a setting found wrong there still ends in one line, and the Ray started alongside is shut down."""
    ray_tmp = tempfile.mkdtemp(prefix="rf-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    write_jsonl(tmp_path / "in.jsonl", [{"id": "r0", "text": "a fine film"}])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "jobs/classify.py", "--input", str(tmp_path / "in.jsonl"), "--model",
                        str(tiny_model_dir), "--policy", str(tmp_path / "no-policy"), "--output", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**env, "RAY_TMPDIR": ray_tmp})
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot read exit policy") and "Traceback" not in r.stderr
    assert os.listdir(ray_tmp)  # a Ray did start, beside the preflight

    def ray_processes():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found += [pid] if ray_tmp.encode() in f.read() else []
            except OSError:  # gone meanwhile
                pass
        return found

    for _ in range(20):  # shut down before the error was raised; allow the kernel a moment to reap
        if not ray_processes():
            break
        time.sleep(0.5)
    assert not ray_processes()
    shutil.rmtree(ray_tmp, ignore_errors=True)
