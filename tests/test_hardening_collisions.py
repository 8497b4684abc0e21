"""Nothing lost when runs collide or inputs change: one output lock taken before
anything is touched (pack, demo, SFT, atomic outputs), inputs and images checked by content on
resume, stale staging folders cleaned, checkpoints verified by checksum with fallback."""

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from data_prep.cli import main as solo_data
from data_prep.encode import EncodeOptions
from data_prep.pack import COMMAND as PACK, InputChangedError, PackConfig, run_pack
from data_prep.reader import PackedReader
from data_prep.sources import SourceOptions
from data_prep.synthetic import jpeg_bytes, photo_like
from solo.outputs import MARKER_FILE, OutputError, atomic_output_dir, output_lock, write_marker


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("collide")
    lines = []
    for index in range(16):
        (root / f"{index}.jpg").write_bytes(jpeg_bytes(photo_like(64, 32 + 8 * (index % 3), seed=index)))
        lines.append(json.dumps({"image": f"{index}.jpg", "caption": f"picture number {index} " + "word " * index}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def config(source, tokenizer_dir, output, **changes):
    settings = dict(inputs=[str(source / "captions.jsonl")], output=str(output), tokenizer=str(tokenizer_dir),
                    source=SourceOptions(format="caption"), encode=EncodeOptions(seq_length=256),
                    chunk_size=4, window_items=8, progress=False)
    return PackConfig(**{**settings, **changes})


def unfinished(source, tokenizer_dir, output):
    """An output as a run killed after encoding every chunk and before its first position checkpoint
    leaves it: marker, state, chunks in .work; no metadata.json, no progress.json."""
    run_pack(config(source, tokenizer_dir, output, keep_work=True))
    (output / "metadata.json").unlink()
    (output / ".work" / "progress.json").unlink(missing_ok=True)
    return output


@pytest.fixture
def copy_of_source(source, tmp_path):
    shutil.copytree(source, tmp_path / "src")
    return tmp_path / "src"


@pytest.mark.parametrize("second", ["another --chunk-size", "--overwrite"])
def test_a_second_pack_on_a_running_packs_output_is_refused_before_it_touches_anything(
        second, source, tokenizer_dir, tmp_path):
    output = unfinished(source, tokenizer_dir, tmp_path / "out")
    before = snapshot(output)
    changes = {"chunk_size": 3} if "chunk" in second else {"overwrite": True}
    with output_lock(output, PACK):  # what the running pack holds for its whole run
        with pytest.raises(OutputError, match="is in use by a running"):
            run_pack(config(source, tokenizer_dir, output, **changes))
        assert snapshot(output) == before  # not one work file deleted
    report = run_pack(config(source, tokenizer_dir, output, **changes))  # once it is free, the run goes ahead
    assert report["documents_packed"] == 16 and len(PackedReader(output)) == report["packs"]


def test_a_resumed_pack_refuses_an_input_reordered_at_the_same_size(copy_of_source, tokenizer_dir, tmp_path):
    """`shuf` between a kill and the rerun keeps the size; the finished chunks no longer match."""
    output = unfinished(copy_of_source, tokenizer_dir, tmp_path / "out")
    captions = copy_of_source / "captions.jsonl"
    original = captions.read_bytes()
    lines = original.decode().splitlines(keepends=True)
    random.Random(0).shuffle(lines)
    captions.write_text("".join(lines))
    assert captions.stat().st_size == len(original) and captions.read_bytes() != original
    with pytest.raises(InputChangedError, match="the inputs changed since the interrupted run"):
        run_pack(config(copy_of_source, tokenizer_dir, output))
    assert not (output / "metadata.json").exists()
    captions.write_bytes(original)  # the original back: the finished work is reused, nothing mixed
    report = run_pack(config(copy_of_source, tokenizer_dir, output))
    assert report["documents_in"] == report["documents_packed"] == 16
    reader = PackedReader(output)
    origins = sorted(tuple(o) for i in range(len(reader)) for o in reader.doc_origin(i).tolist())
    assert [o[1] for o in origins if o[2] == 0] == list(range(16))  # every record exactly once


def test_an_image_changed_mid_run_is_named_and_the_advice_keeps_the_finished_work(
        copy_of_source, tokenizer_dir, tmp_path, capsys):
    """An image changed at the same size: a clear error (exit 2), and putting the file back (a plain copy: new
    mtime) lets the same command finish from the work already done."""
    output = unfinished(copy_of_source, tokenizer_dir, tmp_path / "out")
    image = copy_of_source / "5.jpg"
    original = image.read_bytes()
    image.write_bytes(original[:-4] + bytes(4))  # same size, other content
    args = ["pack", str(copy_of_source / "captions.jsonl"), "--format", "caption", "--tokenizer", str(tokenizer_dir),
            "--seq-length", "256", "--chunk-size", "4", "--window", "8", "--output", str(output), "--no-progress"]
    assert solo_data(args) == 2
    err = capsys.readouterr().err
    assert f"{image} changed after this pack run read it" in err and "Put the original file back" in err
    assert "Traceback" not in err and "--overwrite (" not in err
    chunks = {name for name in os.listdir(output / ".work") if name.startswith("chunk-")}
    image.write_bytes(original)
    assert solo_data(args) == 0
    reference = tmp_path / "reference"
    run_pack(config(copy_of_source, tokenizer_dir, reference))
    assert (output / "tokens.bin").read_bytes() == (reference / "tokens.bin").read_bytes()
    assert chunks  # the rerun reused the encoded chunks (it never re-encoded from scratch)


def test_atomic_outputs_take_the_lock_and_clean_only_their_own_stale_staging(tmp_path):
    """The one rule for create, convert and exports: a second writer is refused; what killed runs
    left beside the output is removed (or put back), what the user keeps there is not."""
    out = tmp_path / "model"
    killed = tmp_path / ".model.tmp-k1ll3d"  # as a kill -9 leaves atomic_output_dir's staging folder
    killed.mkdir()
    write_marker(killed, "solo create")
    (killed / "model.safetensors").write_bytes(b"\0" * 100)
    other_command = tmp_path / ".model.tmp-other"
    other_command.mkdir()
    write_marker(other_command, "solo convert hf-to-hf")
    users = tmp_path / ".model.tmp-mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    with output_lock(out, "solo create"):
        with pytest.raises(OutputError, match="in use by a running"):
            with atomic_output_dir(out, command="solo create"):
                pass
    assert killed.exists()  # the refused run touched nothing
    with atomic_output_dir(out, command="solo create") as staging:
        (staging / "config.json").write_text("{}")
    assert not killed.exists() and other_command.exists() and (users / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(out)) == [MARKER_FILE, "config.json"]
    assert not (tmp_path / ".model.lock").exists()  # the lock file goes with its holder
    # Killed between the two renames: the previous output is parked, OUT is missing. It is put back.
    parked = tmp_path / ".model.old-x"
    parked.mkdir()
    os.replace(out, parked / "model")
    with pytest.raises(OutputError, match="exists and is not empty"):
        with atomic_output_dir(out, command="solo create"):
            pass
    assert (out / "config.json").exists() and not parked.exists()


def test_demo_refuses_a_folder_it_did_not_create_and_a_second_run(tmp_path, capsys):
    """`solo demo --out ~` must not touch the user's files (raw/ and base/ included)."""
    from solo.cli import main as solo_main

    home = tmp_path / "home"
    (home / "raw").mkdir(parents=True)
    (home / "raw" / "thesis.tex").write_text("years of work")
    (home / "base").mkdir()
    (home / "base" / "weights.bin").write_bytes(b"1")
    before = snapshot(home)
    assert solo_main(["demo", "--fast", "--out", str(home), "--until", "sources"]) == 2
    assert "is not empty and is not an output of `solo demo`" in capsys.readouterr().err
    assert snapshot(home) == before
    demo = tmp_path / "demo"
    with output_lock(demo, "solo demo"):
        assert solo_main(["demo", "--fast", "--out", str(demo), "--until", "sources"]) == 2
    assert "in use by a running" in capsys.readouterr().err and not demo.exists()
    assert solo_main(["demo", "--fast", "--out", str(demo), "--until", "sources"]) == 0
    assert (demo / "raw" / "heldout.json").exists()
    assert solo_main(["demo", "--fast", "--out", str(demo), "--until", "sources"]) == 0  # its own OUT: continued


def test_disk_full_during_hf_to_mcore_says_so(small_disk, base_dir, tmp_path, capsys):
    """megatron-core's checkpoint writer reports a worker's ENOSPC as "Worker failure"; the user
    gets the same no-space message as every other command, and nothing half-written stays."""
    from solo.cli import main as solo_main
    from solo.create import create_solo_checkpoint

    solo = create_solo_checkpoint(base_dir, tmp_path / "solo")
    # 400 KiB free, the tiny model needs more
    (small_disk / "filler").write_bytes(b"\0" * (3 * 1024 * 1024 - 400 * 1024))
    assert solo_main(["convert", "hf-to-mcore", "--hf", str(solo), "--out", str(small_disk / "mcore")]) == 2
    err = capsys.readouterr().err
    assert f"no space left on {small_disk}; free space and run the same command again" in err
    assert not (small_disk / "mcore").exists() and os.listdir(small_disk) == ["filler"]
