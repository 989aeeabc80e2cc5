"""Corpus jobs (`echoembed embed-corpus`) on real STS-B and SciFact texts with the INT8 SmolLM2
artifact: both engines, resume after SIGKILL, a Ray worker that dies once, bad rows under both
policies, refused and forced reruns, and `--verify` on outputs damaged on purpose.

The Ray tests share ONE local cluster (127.0.0.1 only), started and stopped by a session
fixture; they are skipped with the reason when ``ray[data]`` is not installed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from echoembed.corpus import (
    BadRowError,
    CorpusConfig,
    CorpusJobError,
    embed_corpus,
    read_job,
    verify_corpus,
)
from echoembed.corpus.inputs import find_files, plan_file, read_rows
from echoembed.corpus.job import shard_path
from echoembed.errors import InputError, MissingDependencyError
from echoembed.runtime import Embedder
from tests.helpers import SHARED_DATA, STSB_DEV, STSB_TEST

ROWS_PER_SHARD = 40
REPO = Path(__file__).resolve().parents[1]


def _have_ray() -> bool:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def int8_artifact(smollm2_artifact, tmp_path_factory):
    """SmolLM2 through the dynamic INT8 recipe (SmoothQuant off and 8 calibration texts: the
    recipe's graph at half the quantization time; accuracy is not what these tests check)."""
    from echoembed.calibration import (
        CalibrationConfig,
        Int8DynamicConfig,
        QuantizeOptions,
        quantize,
    )

    opts = QuantizeOptions(calibration=CalibrationConfig(path=STSB_DEV, samples=8, batch_size=8))
    out = tmp_path_factory.mktemp("corpus-int8") / "int8"
    return quantize(smollm2_artifact.path, out, Int8DynamicConfig(smooth_alpha=None), opts)


@pytest.fixture(scope="session")
def embedder(int8_artifact):
    return Embedder.load(int8_artifact.path)


@pytest.fixture(scope="session")
def records():
    """150 real rows: 110 distinct STS-B test sentences and 40 SciFact abstract titles."""
    with open(STSB_TEST, encoding="utf-8", newline="") as f:
        sts = [r[0] for r in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]
    rows = [{"id": f"sts-{i}", "text": t} for i, t in enumerate(dict.fromkeys(sts))][:110]
    with open(SHARED_DATA / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            if len(doc["title"]) < 120:
                rows.append({"id": doc["_id"], "text": doc["title"]})
            if len(rows) == 150:
                break
    return rows


def _write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")  # ASCII: a lone surrogate stays an escape
    return path


@pytest.fixture(scope="session")
def corpus_file(records, tmp_path_factory):
    return _write_jsonl(tmp_path_factory.mktemp("corpus-in") / "main.jsonl", records)


def _expected(embedder, rows, rows_per_shard=ROWS_PER_SHARD, batch_size=32):
    """id -> Embedder.encode of each shard's texts (INT8-dynamic embeddings depend on their
    batch-mates, so the reference batches exactly as the job does)."""
    want = {}
    for s in range(0, len(rows), rows_per_shard):
        part = rows[s : s + rows_per_shard]
        emb = embedder.encode([r["text"] for r in part], batch_size=batch_size)
        want.update({r["id"]: e for r, e in zip(part, emb, strict=True)})
    return want


@pytest.fixture(scope="session")
def expected(embedder, records):
    return _expected(embedder, records)


def _read_output(out: Path) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    got: dict[str, np.ndarray] = {}
    for path in sorted(out.glob("shard-*.parquet")):
        table = pq.read_table(path)
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), 576)
        assert table.schema.field("id").type == pa.string()
        emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 576)
        for rid, e in zip(table.column("id").to_pylist(), emb, strict=True):
            assert rid not in got, f"{rid} doubled"
            got[rid] = e
    return got


def _assert_same_embeddings(got, want):
    assert set(got) == set(want)
    cos = np.array([float(got[k] @ want[k]) for k in want])
    assert cos.min() >= 0.99999, cos.min()


def _config(artifact, inp, out, **kw) -> CorpusConfig:
    kw.setdefault("rows_per_shard", ROWS_PER_SHARD)
    kw.setdefault("progress", False)
    return CorpusConfig(artifact, inp, out, **kw)


@pytest.fixture(scope="session")
def local_run(int8_artifact, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus-local") / "out"
    summary = embed_corpus(_config(int8_artifact.path, corpus_file, out))
    return out, summary


def test_local_job_embeds_every_row_once(local_run, int8_artifact, corpus_file, expected):
    out, summary = local_run
    assert (summary.shards, summary.shards_run, summary.rows, summary.rows_embedded) == (
        4, 4, 150, 150)  # fmt: skip
    assert summary.complete and summary.bad_rows == 0
    _assert_same_embeddings(_read_output(out), expected)
    job = read_job(out)
    assert job.artifact["files"] == dict(sorted(int8_artifact.manifest.files.items()))
    assert job.template["name"] == "echo" and [s.rows for s in job.shards] == [40, 40, 40, 30]
    assert job.files[0].sha256 and job.files[0].rows == 150
    assert json.loads((out / "summary.json").read_text())["rows_embedded"] == 150
    report = verify_corpus(out, corpus_file)
    assert report.ok and report.output_rows == 150 and report.error_rows == 0
    # a rerun skips every finished shard and rewrites none
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    again = embed_corpus(_config(int8_artifact.path, corpus_file, out))
    assert (again.shards_run, again.shards_skipped, again.complete) == (0, 4, True)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}


def test_formats_directory_and_glob(tmp_path, records, int8_artifact, embedder):
    """tsv, txt, parquet and jsonl read alike; a directory and a glob take every file in
    sorted order; a shard in the middle of a file starts at its recorded byte offset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rows = records[:24]
    _write_jsonl(src / "a.jsonl", [{"id": r["id"], "text": r["text"]} for r in rows[:6]])
    with open(src / "b.tsv", "w", encoding="utf-8") as f:
        f.write("text\tid\textra\n" + "".join(f"{r['text']}\t{r['id']}\tx\n" for r in rows[6:12]))
    (src / "sub" / "c.txt").write_text("".join(r["text"] + "\n" for r in rows[12:18]))
    table = pa.table({"id": [r["id"] for r in rows[18:]], "text": [r["text"] for r in rows[18:]]})
    pq.write_table(table, src / "d.parquet", row_group_size=4)
    (src / "notes.md").write_text("not input")
    from echoembed.corpus.inputs import ShardSpec

    root, rels = find_files(src)
    assert rels == ["a.jsonl", "b.tsv", "d.parquet", "sub/c.txt"]
    assert find_files(str(src / "*.t*"))[1] == ["b.tsv"]
    first_row = {"a.jsonl": 0, "b.tsv": 6, "sub/c.txt": 12, "d.parquet": 18}
    for rel in rels:
        info, cuts = plan_file(root, rel, 4, "id", "text")
        assert info.rows == 6 and [c[1] for c in cuts] == [4, 2]
        second = read_rows(root, ShardSpec(1, rel, *cuts[1]), info.format, "id", "text", True)
        base = first_row[rel] + 4
        assert [r.text for r in second] == [r["text"] for r in rows[base : base + 2]]
        if info.format != "txt":
            assert [r.id for r in second] == [r["id"] for r in rows[base : base + 2]]
    out = src / "embeddings"  # OUT_DIR inside the input directory: its shards are no input
    summary = embed_corpus(_config(int8_artifact.path, src, out, rows_per_shard=4))
    assert summary.shards == 8 and summary.rows_embedded == 24
    got = _read_output(out)
    txt_ids = sorted(k for k in got if k.startswith("sub/c.txt:"))
    assert txt_ids == [f"sub/c.txt:{i}" for i in range(1, 7)]
    assert verify_corpus(out, src).ok
    assert embed_corpus(_config(int8_artifact.path, src, out, rows_per_shard=4)).shards_run == 0


def test_bad_rows_stop_the_job_or_go_to_the_errors_file(tmp_path, records, int8_artifact):
    src = tmp_path / "bad.jsonl"
    good = records[:10]
    bad = [
        {"id": "empty", "text": ""},
        {"id": "blank", "text": " \t "},
        {"id": 7, "text": 42},
        {"id": "null", "text": None},
        {"id": "no-text"},
        {"id": "surrogate", "text": "broken \ud800 bytes"},
    ]
    _write_jsonl(src, good[:4] + bad[:3] + good[4:] + bad[3:])
    out = tmp_path / "out"
    with pytest.raises(BadRowError, match=r"bad\.jsonl:5: the row with id 'empty'.*empty"):
        embed_corpus(_config(int8_artifact.path, src, out, rows_per_shard=8))
    assert not shard_path(out, 0).exists()
    summary = embed_corpus(_config(int8_artifact.path, src, out, rows_per_shard=8,
                                   on_bad_row="skip"))  # fmt: skip
    assert (summary.rows_embedded, summary.bad_rows, summary.complete) == (10, 6, True)
    errors = [json.loads(line) for p in sorted(out.glob("*.errors.jsonl")) for line in
              p.read_text().splitlines()]  # fmt: skip
    assert [e["id"] for e in errors] == ["empty", "blank", "7", "null", "no-text", "surrogate"]
    reasons = dict((e["id"], e["reason"]) for e in errors)
    assert "empty or whitespace-only" in reasons["blank"] and "int" in reasons["7"]
    assert "NoneType" in reasons["null"] and "no 'text' field" in reasons["no-text"]
    assert "not valid UTF-8" in reasons["surrogate"] and errors[0]["where"] == "bad.jsonl:5"
    report = verify_corpus(out, src)
    assert report.ok and (report.output_rows, report.error_rows) == (10, 6)
    # errors-file ids count only for shards written with skip: rewrite shard 0's record as
    # "error" and its three bad rows are no longer accounted for
    import pyarrow.parquet as pq

    from echoembed.corpus.job import META_KEY

    table = pq.read_table(shard_path(out, 0))
    meta = json.loads(table.schema.metadata[META_KEY])
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps({**meta,
                   "on_bad_row": "error"})}), shard_path(out, 0))  # fmt: skip
    report = verify_corpus(out, src)
    assert not report.ok and report.missing == 3
    assert report.unaccounted_error_files == ("shard-00000.errors.jsonl",)


def test_bad_lines_in_text_formats(tmp_path, int8_artifact):
    """A blank .txt line is a bad row (its id is the line number); bytes that are not UTF-8
    become a bad row, not silently altered text; a broken JSON line stops the job."""
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"A cat sits on the mat.\n\nDogs bark.\nbad \xff byte\n")
    out = tmp_path / "out"
    embed_corpus(_config(int8_artifact.path, txt, out, on_bad_row="skip"))
    errors = [json.loads(x) for x in (out / "shard-00000.errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["where"]) for e in errors] == [("2", "t.txt:2"), ("4", "t.txt:4")]
    assert sorted(_read_output(out)) == ["1", "3"] and verify_corpus(out, txt).ok
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    with pytest.raises(InputError, match=r"broken\.jsonl:2 is not valid JSON"):
        embed_corpus(_config(int8_artifact.path, broken, tmp_path / "o2", on_bad_row="skip"))


def test_verify_counts_missing_doubled_unknown_and_foreign(local_run, corpus_file, tmp_path,
                                                           capsys):  # fmt: skip
    from echoembed.cli.main import main

    out = tmp_path / "out"
    shutil.copytree(local_run[0], out)
    shard_path(out, 1).unlink()  # 40 rows missing
    shutil.copy(shard_path(out, 0), out / "shard-00009.parquet")  # shard 0 twice: 40 doubled
    foreign = tmp_path / "foreign.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["x"]}), foreign)
    shutil.copy(foreign, out / "shard-00010.parquet")
    report = verify_corpus(out, corpus_file)
    assert (report.missing, report.doubled, report.unknown) == (40, 40, 0)
    assert report.missing_shards == (1,) and report.foreign_shards == ("shard-00010.parquet",)
    assert not report.ok
    # an id the input does not hold
    table = pq.read_table(shard_path(out, 2))
    ids = table.column("id").to_pylist()
    ids[0] = "not-in-input"
    pq.write_table(table.set_column(0, "id", pa.array(ids)), shard_path(out, 2))
    (tmp_path / "copy").mkdir()
    changed = tmp_path / "copy" / corpus_file.name  # same content, another place: same input
    shutil.copy(corpus_file, changed)
    assert main(["embed-corpus", "--verify", str(out), str(changed)]) == 1
    text = capsys.readouterr().out
    assert "missing 41, doubled 40, unknown 1" in text and "FAILED" in text
    assert main(["embed-corpus", "--verify", str(local_run[0]), str(corpus_file)]) == 0
    assert "OK: every input id appears exactly once" in capsys.readouterr().out
    with open(changed, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "late", "text": "A row added after the job."}) + "\n")
    report = verify_corpus(local_run[0], changed)
    assert report.input_changed == (corpus_file.name,) and report.missing == 1


def test_changed_job_is_refused_unless_forced(tmp_path, records, int8_artifact,
                                              smollm2_artifact, capsys):  # fmt: skip
    from echoembed.cli.main import main

    src = _write_jsonl(tmp_path / "in.jsonl", records[:10])
    out = tmp_path / "out"
    base = ["embed-corpus", str(int8_artifact.path), str(src), str(out), "--rows-per-shard", "5",
            "--no-progress"]  # fmt: skip
    assert main(base) == 0
    assert "2 shards, 10 rows; this run computed 2 shards" in capsys.readouterr().out
    for extra, what in (
        (["--template", "classical"], "the template"),
        (["--rows-per-shard", "4"], "the sharding"),
        (["--batch-size", "8"], "the batching"),
    ):
        assert main(base + extra) == 2
        assert f"({what}" in capsys.readouterr().err
    other = ["embed-corpus", str(smollm2_artifact.path), *base[2:]]
    assert main(other) == 2 and "(the artifact changed)" in capsys.readouterr().err
    _write_jsonl(src, records[:11])
    with pytest.raises(CorpusJobError, match=r"\(the input changed\).*--force"):
        embed_corpus(_config(int8_artifact.path, src, out, rows_per_shard=5))
    _write_jsonl(src, records[:10])
    before = read_job(out).fingerprint
    assert main(other + ["--force"]) == 0  # fp32 now: every shard recomputed
    job = read_job(out)
    assert job.fingerprint != before
    assert job.artifact["files"] == dict(sorted(smollm2_artifact.manifest.files.items()))
    from echoembed.corpus.job import read_shard_metadata

    assert {read_shard_metadata(p)["fingerprint"] for p in out.glob("shard-*.parquet")} == {
        job.fingerprint}  # fmt: skip
    want = _expected(Embedder.load(smollm2_artifact.path), records[:10], rows_per_shard=5)
    _assert_same_embeddings(_read_output(out), want)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "keep.txt").write_text("someone else's file")
    with pytest.raises(CorpusJobError, match="not an embed-corpus output"):
        embed_corpus(_config(int8_artifact.path, src, stray))


def test_config_and_missing_ray_are_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(InputError, match="batch_size must be a whole number >= 1"):
        CorpusConfig("a", "b", "c", batch_size=0)
    with pytest.raises(InputError, match="on_bad_row must be one of"):
        CorpusConfig("a", "b", "c", on_bad_row="ignore")
    with pytest.raises(InputError, match="pass engine='ray'"):
        CorpusConfig("a", "b", "c", address="127.0.0.1:6379")
    with pytest.raises(InputError, match="does not exist"):
        find_files(tmp_path / "nope")
    from echoembed.corpus.ray_engine import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=re.escape("pip install 'echoembed[ray]'")):
        import_ray()
    with pytest.raises(MissingDependencyError):
        embed_corpus(CorpusConfig("a", "b", tmp_path / "out", engine="ray"))
    assert not (tmp_path / "out").exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "echoembed.cli.main", "embed-corpus", *args, "--no-progress"]


def _kill_after(cmd: list[str], out: Path, shards: int, timeout: float = 120.0) -> int:
    """Start ``cmd``, SIGKILL it once ``shards`` shard files exist; returns how many did."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while len(list(out.glob("shard-*.parquet"))) < shards:
            if proc.poll() is not None:
                raise AssertionError(f"finished before the kill: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no shard appeared in time")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return len(list(out.glob("shard-*.parquet")))


def test_local_job_killed_between_shards_resumes(tmp_path, records, int8_artifact, embedder):
    src = _write_jsonl(tmp_path / "in.jsonl", records[:120])
    out = tmp_path / "out"
    done = _kill_after(_cli(str(int8_artifact.path), str(src), str(out), "--rows-per-shard",
                            "10"), out, shards=2)  # fmt: skip
    assert 2 <= done < 12
    summary = embed_corpus(_config(int8_artifact.path, src, out, rows_per_shard=10))
    assert summary.shards_run == 12 - done and summary.shards_skipped == done
    assert summary.complete and verify_corpus(out, src).ok
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    _assert_same_embeddings(_read_output(out), _expected(embedder, records[:120], 10))


# --- Ray Data engine (one local loopback cluster for all of them) ---


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster on 127.0.0.1 with 3 CPUs (2 actors + one for Ray Data's tasks)."""
    if not _have_ray():
        pytest.skip("ray[data] is not installed: pip install 'echoembed[ray]'")
    from echoembed.corpus.ray_engine import init_local_ray

    ray = init_local_ray(num_cpus=3)
    yield ray
    ray.shutdown()


def _descendants(pid: int) -> set[int]:
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def _listeners(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of every TCP listening socket of ``pids`` (``ss -tlnp``)."""
    lines = subprocess.run(["ss", "-tlnpH"], capture_output=True, text=True,
                           check=True).stdout.splitlines()  # fmt: skip
    found = []
    for line in lines:
        local = line.split()[3]
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((local, pid))
    return found


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_ray_job_equals_local_and_listens_on_loopback_only(
    local_run, int8_artifact, corpus_file, expected, tmp_path
):
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.extend(_listeners(_descendants(os.getpid())))
            time.sleep(0.3)

    sampler = threading.Thread(target=sample, daemon=True)
    if shutil.which("ss"):
        sampler.start()
    out = tmp_path / "out"
    try:
        summary = embed_corpus(_config(int8_artifact.path, corpus_file, out, engine="ray",
                                       concurrency=2))  # fmt: skip
    finally:
        stop.set()
    if sampler.is_alive():
        sampler.join()
        assert seen, "found no listening socket of the cluster"
        wild = [(a, p) for a, p in seen if not re.match(r"(\[::ffff:)?127\.", a)]
        assert not wild, f"Ray listens beyond the loopback: {wild}"
    assert summary.complete and summary.shards_run == 4
    assert summary.engine_info["actors"] == 2 and len(summary.engine_info["actor_load_s"]) == 2
    got = _read_output(out)
    _assert_same_embeddings(got, expected)
    _assert_same_embeddings(got, _read_output(local_run[0]))
    assert verify_corpus(out, corpus_file).ok


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_ray_actor_that_dies_once_is_retried(monkeypatch, tmp_path, records, int8_artifact,
                                             embedder):  # fmt: skip
    from echoembed.corpus.ray_engine import TEST_KILL_ONCE_ENV

    src = _write_jsonl(tmp_path / "in.jsonl", records[:90])
    marker = tmp_path / "killed-once"
    monkeypatch.setenv(TEST_KILL_ONCE_ENV, str(marker))
    out = tmp_path / "out"
    summary = embed_corpus(_config(int8_artifact.path, src, out, engine="ray", concurrency=2,
                                   rows_per_shard=30))  # fmt: skip
    assert int(marker.read_text()) > 0  # the pid of the actor that exited after its shard
    assert summary.complete and summary.shards_run == 3 and summary.rows_embedded == 90
    report = verify_corpus(out, src)
    assert report.ok and (report.missing, report.doubled) == (0, 0)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    _assert_same_embeddings(_read_output(out), _expected(embedder, records[:90], 30))


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_ray_bad_rows_follow_the_policy(tmp_path, records, int8_artifact):
    src = _write_jsonl(tmp_path / "in.jsonl", records[:12] + [{"id": "hole", "text": "  "}])
    out = tmp_path / "out"
    with pytest.raises(BadRowError, match=r"in\.jsonl:13: the row with id 'hole'"):
        embed_corpus(_config(int8_artifact.path, src, out, engine="ray", rows_per_shard=5))
    embed_corpus(_config(int8_artifact.path, src, out, engine="ray", rows_per_shard=5,
                         on_bad_row="skip"))  # fmt: skip
    errors = (out / "shard-00002.errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["id"] for e in errors] == ["hole"]
    report = verify_corpus(out, src)
    assert report.ok and (report.output_rows, report.error_rows) == (12, 1)
    # an artifact that no longer matches the job when an actor loads it: the actor's user
    # error comes back with its own type, not as a Ray ActorDiedError
    import dataclasses

    from echoembed.corpus.ray_engine import run_ray

    job = read_job(out)
    stale = dataclasses.replace(
        job, artifact={**job.artifact, "files": {k: "0" * 64 for k in job.artifact["files"]}}
    )
    config = _config(int8_artifact.path, src, out, engine="ray", rows_per_shard=5)
    with pytest.raises(CorpusJobError, match="changed after the job started"):
        run_ray(stale, stale.shards[:1], config, lambda r: None)


@pytest.mark.ray
@pytest.mark.usefixtures("ray_cluster")
def test_ray_driver_killed_between_shards_resumes(tmp_path, records, int8_artifact, embedder):
    """A driver joined to the cluster by address is SIGKILLed mid-job; rerunning resumes."""
    import ray

    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    src = _write_jsonl(tmp_path / "in.jsonl", records[:120])
    out = tmp_path / "out"
    cmd = _cli(str(int8_artifact.path), str(src), str(out), "--rows-per-shard", "10",
               "--engine", "ray", "--address", address)  # fmt: skip
    done = _kill_after(cmd, out, shards=2)
    assert 2 <= done < 12
    summary = embed_corpus(_config(int8_artifact.path, src, out, engine="ray",
                                   rows_per_shard=10))  # fmt: skip
    assert summary.shards_skipped >= done and summary.complete
    assert verify_corpus(out, src).ok
    _assert_same_embeddings(_read_output(out), _expected(embedder, records[:120], 10))
