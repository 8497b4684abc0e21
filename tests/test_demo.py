"""`solo demo`: the generated task needs the pixels (balanced answers, text-only at chance, pictures
that carry the answer, deterministic by seed), and the pipeline runs, resumes and fails clearly."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from solo.demo.pipeline import FAST, stage_names
from solo.demo.task import (
    ANSWERS,
    BACKGROUND,
    COLOURS,
    COUNT_WORDS,
    POSITIONS,
    QUADRANT,
    QUESTION_TYPES,
    TaskSizes,
    chance_accuracy,
    text_only_accuracy,
    write_sources,
)

from helpers import REPO, subprocess_env

SIZES = TaskSizes(pretrain=16, instructions=128, heldout=64)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    write_sources(root, SIZES, seed=3)
    return root


def _records(root, name):
    with open(root / f"{name}.json", encoding="utf-8") as handle:
        return json.load(handle)


def _answer(record):
    return record["conversations"][1]["value"]


def test_answers_are_balanced_within_every_question_type(sources):
    for name, size in (("instructions", SIZES.instructions), ("heldout", SIZES.heldout)):
        records = _records(sources, name)
        assert len(records) == size
        for question_type in QUESTION_TYPES:
            counts = Counter(_answer(r) for r in records if r["question_type"] == question_type)
            assert set(counts) == set(ANSWERS[question_type])
            assert len(set(counts.values())) == 1, (name, question_type, counts)  # exactly balanced


def test_a_text_only_model_is_at_chance(sources):
    train, heldout = _records(sources, "instructions"), _records(sources, "heldout")
    assert chance_accuracy(heldout) == pytest.approx(0.25)
    # The best answer per question text, learned from the training questions, scores chance.
    assert text_only_accuracy(train, heldout) == pytest.approx(0.25)
    # Each question type is asked in one wording whatever the answer: the text carries no hint.
    for question_type in QUESTION_TYPES:
        assert len({r["conversations"][0]["value"] for r in heldout if r["question_type"] == question_type}) == 1


def _shape_pixels(path):
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int32)
    return np.abs(pixels - np.asarray(BACKGROUND)).sum(-1) > 90  # far from the background: a shape


def test_the_pictures_carry_the_answers(sources):
    for record in _records(sources, "heldout"):
        path = sources / record["image"]
        mask = _shape_pixels(path)
        occupied = [q for q in range(4) if mask[(q // 2) * QUADRANT:(q // 2 + 1) * QUADRANT,
                                                 (q % 2) * QUADRANT:(q % 2 + 1) * QUADRANT].sum() > 40]
        answer, kind = _answer(record), record["question_type"]
        if kind == "count":
            assert COUNT_WORDS[len(occupied) - 1] == answer
        elif kind == "position":
            assert [POSITIONS[q] for q in occupied] == [answer]
        elif kind == "colour":
            mean = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)[mask].mean(0)
            nearest = min(COLOURS, key=lambda c: np.abs(np.asarray(COLOURS[c]) - mean).sum())
            assert nearest == answer


def test_sources_are_deterministic_by_seed_and_blanking_keeps_the_text(tmp_path, sources):
    write_sources(tmp_path / "same", SIZES, seed=3)
    write_sources(tmp_path / "other", SIZES, seed=4)
    write_sources(tmp_path / "blank", SIZES, seed=3, blank_images=True)
    names = sorted(os.listdir(sources / "images"))
    assert names == sorted(os.listdir(tmp_path / "same" / "images"))
    for name in names:
        assert (sources / "images" / name).read_bytes() == (tmp_path / "same" / "images" / name).read_bytes()
    for file in ("labels.jsonl", "captions.jsonl", "instructions.json", "heldout.json"):
        assert (sources / file).read_bytes() == (tmp_path / "same" / file).read_bytes()
        assert (sources / file).read_bytes() == (tmp_path / "blank" / file).read_bytes()
    assert (sources / "heldout.json").read_bytes() != (tmp_path / "other" / "heldout.json").read_bytes()
    blank = {(tmp_path / "blank" / "images" / n).read_bytes() for n in names}
    assert len(blank) == 1 and not _shape_pixels(tmp_path / "blank" / "images" / names[0]).any()


def _demo(out, *args, check=True):
    env = subprocess_env(OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "solo.cli", "demo", "--fast", "--out", str(out), *args],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)  # a hang guard only
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.e2e
@pytest.mark.slow
def test_fast_demo_runs_resumes_and_reports_a_failing_stage(tmp_path):
    out = tmp_path / "demo"
    stages = len(stage_names())
    first = _demo(out)  # the whole pipeline: ... convert_init, stages 1-3, export, SFT, HF eval
    # Progress: one line per stage and per training step; the held-out accuracy next to chance.
    for number in (1, 2, 3):
        assert f"stage{number}: step 3/3 loss" in first.stdout
    assert "sft: step" in first.stdout
    assert f"[{stages}/{stages}] eval: finished" in first.stdout
    line = [ln for ln in first.stdout.splitlines() if ln.startswith("held-out")][-1]
    assert "accuracy" in line and "chance 0.250" in line
    for name in ("eval_pretrain.json", "eval.json"):  # megatron-core checkpoint, then the SFT'd HF export
        result = json.loads((out / name).read_text())
        assert result["total"] == FAST.sizes.heldout and len(result["answers"]) == result["total"]
    report = (out / "report.html").read_text()
    # curves of stages 1-3 and SFT; 12 held-out pictures for each evaluation (pretrained, instruction-tuned)
    assert report.count("<polyline") == 4 and report.count("data:image/png;base64") == 24
    # Three chained pretraining stages on 2 processes, stage 1 from the converted `solo create` output.
    assert f"initialised from {out / 'init_mcore'}" in (out / "logs" / "stage1.log").read_text()
    stage2_log = (out / "logs" / "stage2.log").read_text()
    assert "--nproc_per_node 2" in stage2_log and f"initialised from {out / 'runs' / 'stage1'}" in stage2_log
    assert (out / "runs" / "sft" / "hf" / "config.json").is_file()

    # A rerun reuses every finished stage.
    again = _demo(out)
    assert again.stdout.count("reused") == stages
    stages = stage_names().index("eval_pretrain") + 1  # the checks below stop there

    # Another variant in the same directory is refused, not mixed in.
    mixed = _demo(out, "--until", "eval_pretrain", "--blank-images", check=False)
    assert mixed.returncode != 0 and "other settings" in mixed.stderr

    # A failing stage: its name, its log, how to rerun; the finished stages are kept.
    (out / "done" / "eval_pretrain.json").unlink()
    (out / "raw" / "heldout.json").write_text("{not json")
    failed = _demo(out, "--until", "eval_pretrain", check=False)
    assert failed.returncode == 1
    assert "stage 'eval_pretrain' failed" in failed.stderr
    assert str(out / "logs" / "eval_pretrain.log") in failed.stderr
    assert "cannot read the held-out questions" in failed.stderr
    assert f"--out {out}" in failed.stderr and f"{stages - 1} finished stages are reused" in failed.stderr


def test_native_variant_runs_the_switches_in_every_stage_and_the_budget_in_stage_one():
    """--variant native: the created model and every pretraining stage carry the two switches (the recipe
    check would refuse a mismatch); --max-patches packs stage 1's pictures only."""
    import dataclasses

    from solo.demo.pipeline import build_stages

    stages = {s.name: s.command for s in build_stages(Path("OUT"), dataclasses.replace(
        FAST, variant="native", max_patches=1)) if s.command}
    create = stages["create"]
    assert create[create.index("--image-attention") + 1] == "bidirectional"
    assert create[create.index("--vision-positions") + 1] == "2d"
    for number in (1, 2, 3):
        assert {"model.image_attention=bidirectional", "model.vision_positions=2d"} <= set(stages[f"stage{number}"])
    assert stages["pack_labels"][-2:] == ["--max-patches", "1"]  # stage 1's data
    assert all("--max-patches" not in stages[f"pack_{s}"] for s in ("captions", "instructions", "heldout"))


def test_report_sets_two_runs_side_by_side(tmp_path):
    """--compare: each stage's two loss curves on shared axes, and both runs' accuracies in one table."""
    from solo.demo.report import write_report

    def fake_run(name, variant, losses, accuracy):
        out = tmp_path / name
        (out / "runs").mkdir(parents=True)
        (out / "demo.json").write_text(json.dumps({"variant": variant, "max_patches": None}))
        for stage in ("stage1", "sft"):
            (out / "runs" / stage).mkdir()
            (out / "runs" / stage / "metrics.jsonl").write_text(
                "".join(json.dumps({"step": i + 1, "loss": loss}) + "\n" for i, loss in enumerate(losses)))
        correct = int(accuracy * 400)
        (out / "eval.json").write_text(json.dumps({
            "accuracy": accuracy, "correct": correct, "total": 400, "chance": 0.25, "per_type": {}, "answers": []}))
        return out

    solo = fake_run("solo", "solo", [3.0, 2.0, 1.5], 0.9)
    native = fake_run("native", "native", [3.1, 1.8, 1.2], 0.95)
    page = write_report(native, compare=solo).read_text()
    side = page[page.index("Side by side"):page.index("Training loss")]
    assert side.count("<polyline") == 4  # stage1 and sft, two runs each
    assert "native (native)" in side and "solo (solo)" in side
    assert "0.950 (380/400)" in side and "0.900 (360/400)" in side
    assert "1.2000" in side and "1.5000" in side  # last losses
