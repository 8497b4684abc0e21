"""Determinism (byte-identical output for any worker count) and kill -9 + rerun = uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from data_prep.cli import main as solo_data
from data_prep.encode import EncodeOptions
from data_prep.pack import PackConfig, run_pack
from data_prep.reader import PackedReader
from data_prep.sources import SourceOptions
from data_prep.synthetic import jpeg_bytes, photo_like
from solo.tiny import make_base_tokenizer
from solo.tokenizer import extend_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LENGTH = 1024


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    extend_tokenizer(make_base_tokenizer()).save_pretrained(root / "tokenizer")
    (root / "images").mkdir()
    lines = []
    for index in range(480):
        if index % 5 == 4:
            lines.append(json.dumps({"image": f"images/{index}.jpg", "caption": ""}))  # rejected: empty caption
            continue
        width, height = (480, 360) if index % 2 else (360, 200)
        (root / "images" / f"{index}.jpg").write_bytes(jpeg_bytes(photo_like(width, height, seed=index)))
        lines.append(json.dumps({"image": f"images/{index}.jpg",
                                 "caption": f"photo {index} " + "of a scene " * (index % 40)}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def config(root, output, workers=1, chunk_size=256):
    return PackConfig(inputs=[str(root / "captions.jsonl")], output=str(output), tokenizer=str(root / "tokenizer"),
                      source=SourceOptions(format="caption"), encode=EncodeOptions(seq_length=SEQ_LENGTH),
                      workers=workers, chunk_size=chunk_size, window_items=64, progress=False)


def files_of(directory):
    """Every file of a packed directory (the tokenizer copy included) by relative path, hidden ones aside."""
    files = {}
    for folder, subfolders, names in os.walk(directory):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in (name for name in names if not name.startswith(".")):
            path = os.path.join(folder, name)
            files[os.path.relpath(path, directory)] = open(path, "rb").read()
    return dict(sorted(files.items()))


def command(root, output):
    return [sys.executable, "-m", "data_prep.cli", "pack", str(root / "captions.jsonl"), "--format", "caption",
            "--tokenizer", str(root / "tokenizer"), "--seq-length", str(SEQ_LENGTH), "--output", str(output),
            "--workers", "2", "--chunk-size", "8", "--window", "64", "--checkpoint-seconds", "0", "--no-progress"]


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "out"
    report = run_pack(config(source, output))
    assert report["documents_in"] == 480 and report["documents_rejected"] == 96
    assert report["packs"] > 10  # several windows and packs, so ordering matters
    return output


def test_same_inputs_give_byte_identical_output(source, reference, tmp_path):
    run_pack(config(source, tmp_path / "again", workers=1, chunk_size=7))  # other chunking, same bytes
    assert files_of(tmp_path / "again") == files_of(reference)
    # a finished run is not redone; changed settings on the same output are refused
    run_pack(config(source, tmp_path / "again"))
    assert files_of(tmp_path / "again") == files_of(reference)
    changed = config(source, tmp_path / "again")
    changed.encode = EncodeOptions(seq_length=SEQ_LENGTH, resize_mode="solo")
    with pytest.raises(FileExistsError):
        run_pack(changed)


def _wait_for_chunks(work_dir, count, process, packed_some, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"pack finished (rc {process.returncode}) before it could be killed")
        names = os.listdir(work_dir) if os.path.isdir(work_dir) else []
        if sum(name.startswith("chunk-") and name.endswith(".json") for name in names) >= count and (
                not packed_some or "progress.json" in names):
            return
        time.sleep(0.01)
    pytest.fail("pack made no progress")


@pytest.mark.e2e
def test_kill_9_then_rerun_is_byte_identical(source, reference, tmp_path):
    output = tmp_path / "killed"
    work_dir = output / ".work"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # First kill: early, while chunks are being encoded. Second kill: in the resumed run, after the
    # packing pass has recorded a position and written packs (so the rerun continues from there).
    for kill_after_chunks, packed_some in ((3, False), (20, True)):
        process = subprocess.Popen(command(source, output), cwd=REPO, env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_chunks(work_dir, kill_after_chunks, process, packed_some)
        os.killpg(process.pid, signal.SIGKILL)  # the whole process group: main process and workers
        process.wait()
        assert process.returncode == -signal.SIGKILL
        assert not (output / "metadata.json").exists()
    done_before = sum(name.startswith("chunk-") and name.endswith(".json") for name in os.listdir(work_dir))
    assert os.path.getsize(output / "tokens.bin") > 0  # packs were written before the kill
    assert 20 <= done_before < 60  # 60 chunks in all: the run was really interrupted
    # The same command again, through its entry point in this process (a fresh interpreter would add
    # only its start-up): it resumes from what the killed processes left on disk.
    assert solo_data(command(source, output)[3:]) == 0
    assert not work_dir.exists()
    assert files_of(output) == files_of(reference)  # K=2 after two kills == K=1 uninterrupted
    report = json.load(open(output / "report.json"))
    assert report["documents_in"] == report["documents_packed"] + report["documents_rejected"] == 480
    assert len(PackedReader(output)) == report["packs"]


def test_writer_resumes_from_a_checkpoint_with_later_writes_discarded(tmp_path):
    """Packs written after the last checkpoint (then a crash) are cut off and rewritten exactly once."""
    import numpy as np

    from data_prep.packed_format import PackWriter

    rng = np.random.default_rng(0)
    packs = []
    for index in range(9):
        length = int(rng.integers(5, 50))
        n_images = index % 3
        packs.append((rng.integers(0, 33000, length), rng.integers(0, 2, length).astype(np.uint8),
                      np.array([0, length // 2, length], np.int32), rng.integers(0, 9, (n_images, 3)).astype(np.int32),
                      rng.integers(0, 9, (2, 3)), [rng.bytes(int(rng.integers(1, 300))) for _ in range(n_images)]))

    def write(directory, resume_after=None):
        directory.mkdir()
        side = tmp_path / f"side-{directory.name}"
        side.mkdir()
        writer = PackWriter(str(directory), 33029, str(side))
        state = None
        for number, pack in enumerate(packs):
            writer.add_pack(*pack)
            if number == resume_after:
                state = writer.checkpoint()
            if resume_after is not None and number == resume_after + 3:  # written, then "killed"
                writer.checkpoint()
                writer = PackWriter(str(directory), 33029, str(side), resume=state)
                for again in packs[resume_after + 1:number + 1]:
                    writer.add_pack(*again)
        writer.finalize()
        return files_of(directory)

    straight = write(tmp_path / "straight")
    assert write(tmp_path / "resumed", resume_after=3) == straight


def _children(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
        except FileNotFoundError:
            pass
    return found


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds worker processes through /proc")
def test_a_worker_killed_mid_run_does_not_stop_it(source, reference, tmp_path):
    """A worker dying (OOM killer, decoder crash) is replaced; the run completes, same bytes."""
    output = tmp_path / "worker-killed"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(command(source, output), cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_chunks(output / ".work", 3, process, packed_some=False)
    servers = [pid for pid in _children(process.pid) if b"forkserver" in open(f"/proc/{pid}/cmdline", "rb").read()]
    workers = [pid for server in servers for pid in _children(server)]
    assert workers, "no worker processes found"
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert "a worker process died" in stderr
    assert files_of(output) == files_of(reference)


def test_record_by_record_encoding_writes_the_same_chunk(source, tmp_path):
    """The isolation path (after repeated worker deaths) yields exactly the normal chunk files."""
    from data_prep import pack as pack_module
    from data_prep.sources import expand_inputs, iter_records

    import base64

    lines = []  # images inline (kept in the chunk's blob) and by path (read back from the file)
    for index in range(12):
        path = source / "images" / f"{index if index % 5 != 4 else 0}.jpg"
        url = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode() if index % 2 else str(path)
        lines.append(json.dumps([{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": f"picture {index}"}]}]))
    lines[7] = '{"broken'
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    options = SourceOptions(format="chat")
    records = list(iter_records(expand_inputs([str(tmp_path / "chat.jsonl")], "chat"), options))
    encode = EncodeOptions(seq_length=SEQ_LENGTH)
    normal, isolated = tmp_path / "normal", tmp_path / "isolated"
    normal.mkdir(), isolated.mkdir()
    pack_module._init_worker(str(source / "tokenizer"), options, encode, str(normal))
    pack_module.encode_chunk(0, records)
    workers = pack_module._WorkerPool(1, (str(source / "tokenizer"), options, encode, str(isolated)), str(isolated))
    try:
        workers._encode_isolated(0, records)
    finally:
        workers.shutdown()
    for suffix in (".img", ".json"):
        normal_bytes = (normal / f"chunk-00000000{suffix}").read_bytes()
        assert normal_bytes == (isolated / f"chunk-00000000{suffix}").read_bytes() and len(normal_bytes) > 0
    expected, got = pack_module.read_chunk(str(normal), 0), pack_module.read_chunk(str(isolated), 0)
    assert len(expected) == len(got) == 12
    kinds = [ref[0] for entry in expected if entry[0] == "doc" for ref in entry[4]]
    assert kinds.count("blob") >= 4 and kinds.count("file") >= 4
    for a, b in zip(expected, got):
        assert a[0] == b[0] and a[1:3] == b[1:3]
        if a[0] == "doc":
            assert a[4] == b[4]  # image references: offsets into the chunk's blob, or file regions
            for (ta, la, ia), (tb, lb, ib) in zip(a[3], b[3]):
                assert (ta == tb).all() and (la == lb).all() and ia == ib


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds worker processes through /proc")
def test_workers_exit_when_only_the_main_process_is_killed(source, tmp_path):
    output = tmp_path / "main-killed"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(command(source, output), cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_chunks(output / ".work", 3, process, packed_some=False)
    helpers = _children(process.pid)
    workers = [pid for helper in helpers for pid in _children(helper)]
    assert workers
    process.kill()  # the main process only, as `kill -9 PID` does
    process.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers), "orphaned workers kept running"


def test_image_read_back_from_a_source_file_that_changed_is_refused(tmp_path):
    import hashlib

    from data_prep.pack import InputChangedError, _ImageSource

    image = tmp_path / "a.jpg"
    image.write_bytes(b"0123456789")
    stat = image.stat()
    source = _ImageSource(str(tmp_path))
    ref = ("file", str(image), 2, 5, stat.st_size, stat.st_mtime_ns, hashlib.sha256(b"23456").hexdigest())
    assert source.read(0, ref) == b"23456"
    source.close()
    for changed in (b"0123", b"0123x56789"):  # the source cut short, or changed at the same size
        image.write_bytes(changed)
        with pytest.raises(InputChangedError, match="changed after this pack run read it"):
            _ImageSource(str(tmp_path)).read(0, ref)
    image.write_bytes(b"0123456789")  # put back (a new mtime): its content is what counts
    assert _ImageSource(str(tmp_path)).read(0, ref) == b"23456"
