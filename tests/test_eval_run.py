"""`solo eval` end to end on tiny local models: batching, resume, bad samples, output rules, and a
model trained on a generated multiple-choice task scoring far above chance (a random one near it)."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from solo.cli import main as solo_main
from solo.eval import BENCHMARKS, load_samples
from solo.eval.protocols import PROTOCOLS
from solo.eval.runner import run_eval

from helpers import free_port, subprocess_env, write_colour_task

STEPS = 112  # training steps of the tiny model on the colour task


def _training_batch(processor, samples, images, replies):
    """Right-padded inputs and labels on the replies only (the assistant turn " reply</s>")."""
    prompts, texts = [], []
    for prompt, reply in zip(samples, replies):
        user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        prompts.append(processor.apply_chat_template(user))
        texts.append(processor.apply_chat_template(user + [{"role": "assistant", "content": reply}]))
    batch = processor(texts, images=[[image] for image in images], padding_side="right")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        labels[row, : processor(prompt, images=[image])["input_ids"].shape[1]] = -100
    return batch, labels


def _reply_loss(model, batch, labels):
    """Next-token loss on the reply tokens only: the LM head runs just where there is a label (the
    33K-entry head over every position would be most of a step's cost)."""
    hidden = model.model(**batch).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    return torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), targets[keep])


@pytest.fixture(scope="module")
def trained_model(random_model, tmp_path_factory):
    """The tiny model trained in-process (a few dozen CPU steps) to answer the colour task both ways."""
    from transformers import AutoProcessor

    from solo.hf import SoloForCausalLM
    from solo.hf.image_processing_solo import load_image

    folder = tmp_path_factory.mktemp("eval-trained")
    train = load_samples("mc", write_colour_task(folder / "train", count=32, seed=2))
    processor = AutoProcessor.from_pretrained(random_model, trust_remote_code=True)
    model = SoloForCausalLM.from_pretrained(random_model)
    mc = BENCHMARKS["mc"]
    examples = []
    for sample in train:
        image = load_image(sample.image)
        examples.append((PROTOCOLS["mc"]["official"].prompt(sample), image, sample.answer))  # generation: the letter
        examples.append((mc.cloze_prompt(sample), image, sample.options["ABCD".index(sample.answer)]))  # likelihood
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [_training_batch(processor, *zip(*[examples[i] for i in order[start : start + 16]]))
               for start in range(0, len(order), 16)]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(STEPS):
        loss = _reply_loss(model, *batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.2, f"the tiny model did not learn the colour task (loss {loss.item():.3f})"
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trained_model_scores_far_above_chance_and_random_model_near_chance(
        trained_model, random_model, task, tmp_path):
    scores = {}
    for name, model in (("trained", trained_model), ("random", random_model)):
        for mode in ("generate", "likelihood"):
            out = tmp_path / f"{name}-{mode}"
            code = solo_main(["eval", "--model", str(model), "--benchmark", "mc", "--data", str(task),
                              "--out", str(out), "--mode", mode, "--batch-size", "8", "--max-new-tokens", "4"])
            assert code == 0
            results = json.loads((out / "results.json").read_text())
            assert results["samples"] == results["scored"] == 24 and results["bad"] == 0
            scores[name, mode] = results["metrics"]["accuracy"]
    assert scores["trained", "generate"] >= 90 and scores["trained", "likelihood"] >= 90, scores
    # Chance is 25% (balanced answers); a random model's option preference stays near it.
    assert 5 <= scores["random", "likelihood"] <= 50, scores
    assert scores["random", "generate"] <= 50, scores


def test_batched_predictions_equal_one_by_one(trained_model, task, tmp_path):
    for mode in ("generate", "likelihood"):
        run_eval(trained_model, "mc", task, tmp_path / f"one-{mode}", mode=mode, batch_size=1, max_new_tokens=4,
                 progress=False)
        run_eval(trained_model, "mc", task, tmp_path / f"batch-{mode}", mode=mode, batch_size=7, max_new_tokens=4,
                 progress=False)
        alone = _lines(tmp_path / f"one-{mode}" / "predictions.jsonl")
        batched = _lines(tmp_path / f"batch-{mode}" / "predictions.jsonl")
        assert [r["prediction"] for r in batched] == [r["prediction"] for r in alone]
        if mode == "likelihood":
            for one, many in zip(alone, batched):
                assert one["scores"] == pytest.approx(many["scores"], abs=1e-4)


def _eval_command(model, data, out, *extra):
    return [sys.executable, "-m", "solo.cli", "eval", "--model", str(model), "--benchmark", "mc", "--data", str(data),
            "--out", str(out), "--batch-size", "1", "--max-new-tokens", "8", *extra]


@pytest.mark.e2e
def test_interrupted_run_resumes_to_the_same_results(random_model, task, tmp_path, capsys):
    reference = tmp_path / "reference"
    run_eval(random_model, "mc", task, reference, batch_size=1, max_new_tokens=8, progress=False)

    out = tmp_path / "interrupted"
    env = subprocess_env(OMP_NUM_THREADS="1")
    process = subprocess.Popen(_eval_command(random_model, task, out), env=env, stderr=subprocess.DEVNULL)
    part = out / "predictions.rank-0.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if part.exists() and len(part.read_text().splitlines()) >= 3:
            process.send_signal(signal.SIGKILL)  # no chance to clean up, as with a lost node
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (out / "results.json").exists()
    with open(part, "a") as handle:
        handle.write('{"row": 23, "torn')  # a write cut short by the kill

    # The same command again, through its entry point (`solo.cli.main`) in this process: a fresh
    # interpreter would add its start-up; the run that left the state to resume was a process of its own.
    capsys.readouterr()
    assert solo_main(_eval_command(random_model, task, out)[3:]) == 0
    stderr = capsys.readouterr().err
    done = int(stderr.split("resuming in")[1].split(": ")[1].split(" of ")[0])
    assert 3 <= done < 24
    assert (out / "results.json").read_text() == (reference / "results.json").read_text()
    assert _lines(out / "predictions.jsonl") == _lines(reference / "predictions.jsonl")
    assert not list(out.glob("predictions.rank-*.jsonl"))


def test_bad_samples_are_reported_not_fatal(random_model, task, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(task.parent, data)
    (data / "1.png").write_bytes(b"not an image at all")
    (data / "2.png").unlink()
    with open(data / "task.jsonl", "a") as handle:
        handle.write(json.dumps({"image": "0.png", "question": "No options?", "answer": "A"}) + "\n")
    results = run_eval(random_model, "mc", data / "task.jsonl", tmp_path / "out", mode="likelihood", progress=False)
    assert (results["samples"], results["scored"], results["bad"]) == (25, 22, 3)
    errors = {bad["id"]: bad["error"] for bad in results["bad_samples"]}
    assert "not a readable image" in errors["q1"] and "1.png" in errors["q1"]
    assert "cannot read file" in errors["q2"]
    assert "options must be a list" in errors["24"]
    assert results["metrics"]["n"] == 22


def test_mme_run_reports_subtask_and_totals(random_model, tmp_path):
    root = tmp_path / "MME"
    for subtask in ("color", "code_reasoning"):
        folder = root / subtask
        folder.mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (48, 32), (200, 10 + 100 * index, 10)).save(folder / f"{index}.png")
            (folder / f"{index}.txt").write_text("Is it red? Please answer yes or no.\tYes\n"
                                                 "Is it blue? Please answer yes or no.\tNo\n")
    results = run_eval(random_model, "mme", root, tmp_path / "out", mode="likelihood", progress=False)
    metrics = results["metrics"]
    assert set(metrics["subtasks"]) == {"color", "code_reasoning"}
    color = metrics["subtasks"]["color"]
    assert (color["questions"], color["images"], color["unpaired_images"]) == (4, 2, 0)
    assert metrics["perception"] == color["score"]
    assert metrics["cognition"] == metrics["subtasks"]["code_reasoning"]["score"]
    # A model that always answers the same way gets every image half right: accuracy+ 0.
    records = _lines(tmp_path / "out" / "predictions.jsonl")
    if len({r["parsed"] for r in records}) == 1:
        assert color["accuracy"] == 50.0 and color["accuracy_plus"] == 0.0


def test_output_directory_rules(random_model, task, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["eval", "--model", str(random_model), "--benchmark", "mc", "--data", str(task), "--out", str(out),
            "--limit", "2", "--max-new-tokens", "2"]
    assert solo_main(args) == 0
    assert solo_main(args + ["--mode", "likelihood"]) == 2  # other settings: refuse without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert solo_main(args + ["--mode", "likelihood", "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["mode"] == "likelihood"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("not ours")
    assert solo_main(args[:-6] + ["--out", str(tmp_path / "other"), "--overwrite", "--limit", "2"]) == 2
    assert "not a previous output" in capsys.readouterr().err
    assert (tmp_path / "other" / "keep.txt").exists()
    assert solo_main(args[:-6] + ["--out", str(Path(random_model) / "eval"), "--limit", "2"]) == 2
    assert "inside the input" in capsys.readouterr().err


@pytest.mark.e2e
def test_data_parallel_over_two_processes_gives_the_single_process_predictions(random_model, task, tmp_path):
    single = tmp_path / "single"
    run_eval(random_model, "mc", task, single, mode="likelihood", limit=8, progress=False)
    out = tmp_path / "parallel"
    env = subprocess_env(OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "solo.cli", "eval", "--model", str(random_model),
               "--benchmark", "mc", "--data", str(task), "--out", str(out), "--mode", "likelihood", "--limit", "8"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Two processes really shared the work (a CPU launch can silently run each rank alone).
    assert "rank 0: 4 samples" in done.stderr and "rank 1: 4 samples" in done.stderr
    parallel, alone = _lines(out / "predictions.jsonl"), _lines(single / "predictions.jsonl")
    assert [r["prediction"] for r in parallel] == [r["prediction"] for r in alone]
    for one, other in zip(parallel, alone):  # other batch neighbours: equal up to float rounding
        assert one.pop("scores") == pytest.approx(other.pop("scores"), abs=1e-4) and one == other
    assert (out / "results.json").read_text() == (single / "results.json").read_text()


def test_a_resumed_run_predicts_only_the_samples_left(random_model, task, tmp_path, capsys):
    """The finished predictions of an interrupted run are kept, never predicted again (a resume that
    re-predicted everything would give the same results.json, only slower: this catches it)."""
    args = ["eval", "--model", str(random_model), "--benchmark", "mc", "--data", str(task),
            "--out", str(tmp_path / "out"), "--limit", "6", "--batch-size", "2", "--max-new-tokens", "4"]
    assert solo_main(args) == 0
    reference = _lines(tmp_path / "out" / "predictions.jsonl")
    kept = [dict(record, kept_from_the_first_run=True) for record in reference[:4]]
    (tmp_path / "out" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (tmp_path / "out" / "results.json").unlink()  # as a run killed after 4 of 6 samples leaves it
    capsys.readouterr()
    assert solo_main(args) == 0
    err = capsys.readouterr().err
    assert "4 of 6 samples already predicted" in err and "rank 0: 2 samples in" in err
    final = _lines(tmp_path / "out" / "predictions.jsonl")
    assert final[:4] == kept  # untouched, not re-predicted
    assert final[4:] == reference[4:]
