"""`solo eval` against hostile data: a resume never reuses predictions made on other questions or
images, data files are read only if regular and capped, a question with too many options is one bad
sample, and likelihood ranking scores options of different token lengths per token."""

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from solo.eval import EvalDataError, load_samples
from solo.eval import samples as eval_samples
from solo.eval.runner import _chat, rank_candidates, run_eval
from solo.outputs import OutputError
from solo.tiny import make_base_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from solo.create import create_solo_checkpoint

    root = tmp_path_factory.mktemp("hardening-eval")
    return create_solo_checkpoint(make_base_checkpoint(root / "base"), root / "solo", seed=0)


def write_task(folder: Path, questions: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, colour in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200)]):
        Image.new("RGB", (32 * (index + 1), 32), colour).save(folder / f"{index}.png")
    with open(folder / "task.jsonl", "w", encoding="utf-8") as handle:
        for index, question in enumerate(questions):
            record = {"id": f"q{index}", "image": f"{index % 3}.png", "question": "What colour is it?",
                      "options": ["red", "green", "blue"], "answer": "A", **question}
            handle.write(json.dumps(record) + "\n")
    return folder / "task.jsonl"


@pytest.mark.parametrize("change", ["question", "options", "image"])
def test_resume_refuses_predictions_made_on_other_data(model_dir, tmp_path, change):
    task = write_task(tmp_path / "data", [{}, {}])
    out = tmp_path / "out"
    run_eval(model_dir, "mc", task, out, mode="likelihood", progress=False)
    # The same rows, ids and answers; only what the model is asked (or shown) differs.
    if change == "image":
        Image.new("RGB", (32, 32), (250, 250, 250)).save(task.parent / "0.png")
    else:
        records = [json.loads(line) for line in task.read_text().splitlines()]
        records[0].update({"question": "Which colour is the square?"} if change == "question"
                          else {"options": ["crimson", "lime", "navy"]})
        task.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(OutputError, match="--overwrite"):
        run_eval(model_dir, "mc", task, out, mode="likelihood", progress=False)
    results = run_eval(model_dir, "mc", task, out, mode="likelihood", progress=False, overwrite=True)
    fresh = run_eval(model_dir, "mc", task, tmp_path / "fresh", mode="likelihood", progress=False)
    assert results == {**fresh, "data": results["data"]}
    assert [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()] == \
        [json.loads(line) for line in (tmp_path / "fresh" / "predictions.jsonl").read_text().splitlines()]


def test_data_that_is_not_a_regular_file_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "task.jsonl"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            load_samples("mc", fifo)
        except EvalDataError as error:
            outcome.append(str(error))

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked on the FIFO: give it an end of file so the thread finishes
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
        pytest.fail("solo eval waited on a FIFO given as --data")
    assert outcome and "not a regular file" in outcome[0] and str(fifo) in outcome[0]


def test_data_and_images_are_read_capped(model_dir, tmp_path, monkeypatch):
    task = write_task(tmp_path / "data", [{}] * 40)
    monkeypatch.setattr(eval_samples, "MAX_DATA_FILE_BYTES", task.stat().st_size - 1)
    with pytest.raises(EvalDataError, match=r"task.jsonl is larger than .* bytes; shrink or split it"):
        load_samples("mc", task)
    # An image that is a link to a device is one bad sample with its reason, not an endless read.
    task = write_task(tmp_path / "small", [{}, {"image": "zero.png"}])
    os.symlink("/dev/zero", task.parent / "zero.png")
    results = run_eval(model_dir, "mc", task, tmp_path / "out", mode="likelihood", progress=False)
    assert (results["scored"], results["bad"]) == (1, 1)
    assert "zero.png is not a regular file" in results["bad_samples"][0]["error"]


def test_a_question_with_more_options_than_letters_is_one_bad_sample(model_dir, tmp_path):
    many = [f"shade {i}" for i in range(27)]
    task = write_task(tmp_path / "data", [{}, {"options": many, "answer": 26}, {"options": many[:26], "answer": "Z"}])
    results = run_eval(model_dir, "mc", task, tmp_path / "out", mode="likelihood", progress=False)
    assert (results["samples"], results["scored"], results["bad"]) == (3, 2, 1)
    assert results["bad_samples"][0]["id"] == "q1" and "27 options" in results["bad_samples"][0]["error"]
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(records[2]["scores"]) == 26  # every option of a question is ranked, none dropped


@torch.no_grad()
def test_likelihood_ranks_options_by_mean_log_probability_per_token(model_dir):
    """Options of very different token lengths: the score is the mean over each option's tokens,
    recomputed here by one plain forward per option (no padding, all logits)."""
    from transformers import AutoProcessor

    from solo.hf import SoloForCausalLM

    model = SoloForCausalLM.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    image = Image.new("RGB", (64, 32), (200, 20, 20))
    options = ["red", "a deep red like the colour of ripe cherries in summer", "no"]
    tokenizer = processor.tokenizer
    lengths = [len(tokenizer(" " + option, add_special_tokens=False)["input_ids"]) for option in options]
    assert len(set(lengths)) == len(options)  # the point of the test: unequal lengths
    (scores,) = rank_candidates(model, processor, ["What colour is it?"], [image], [options])
    prompt = processor(_chat(processor, "What colour is it?"), images=[[image]])
    for option, score in zip(options, scores):
        reply = torch.tensor(tokenizer(" " + option, add_special_tokens=False)["input_ids"])
        ids = torch.cat([prompt["input_ids"][0], reply])[None]
        where = torch.cat([prompt["vision_patch_indices"][0], torch.full((len(reply),), -1)])[None]
        logits = model(input_ids=ids, vision_patches=prompt["vision_patches"], vision_patch_indices=where).logits[0]
        log_probs = torch.log_softmax(logits.float(), -1)[-len(reply) - 1 : -1]
        expected = log_probs.gather(-1, reply[:, None]).mean().item()
        assert score == pytest.approx(expected, abs=1e-4)


def test_a_capped_read_costs_the_file_not_the_cap(tmp_path):
    """read(n) allocates n bytes up front: a 1 GiB cap must not mean a 1 GiB buffer per small file."""
    import tracemalloc

    path = tmp_path / "task.jsonl"
    path.write_text('{"question": "Q?"}\n')
    tracemalloc.start()
    try:
        assert eval_samples.read_data_file(path, limit=1 << 30) == path.read_bytes()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024**2, f"reading a {path.stat().st_size}-byte file peaked at {peak:,} bytes"
