"""The lmms-eval adapter (`--model solo`, the optional `lmms` extra) on a tiny local task.

Skipped where lmms-eval is not installed (it is not in the project's default environment; see the
README's `solo eval` section for the environment it runs in).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from helpers import subprocess_env  # noqa: E402

from solo.eval import BENCHMARKS, load_samples  # noqa: E402
from solo.eval.runner import run_eval, score_replies  # noqa: E402

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.{doc_to_text}
{target}
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
"""


def _write_tasks(folder: Path, data: Path) -> None:
    folder.mkdir()
    (folder / "utils.py").write_text(textwrap.dedent(f"""
        import os
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open(os.path.join({str(data.parent)!r}, doc["image"])).convert("RGB")]

        def doc_to_letters(doc):
            lines = "\\n".join(f"{{l}}. {{o}}" for l, o in zip("ABCDEFGH", doc["options"]))
            return f"{{doc['question']}}\\n{{lines}}\\nAnswer with the option's letter from the given choices directly."

        def doc_to_question(doc):
            return doc["question"]

        def doc_to_choice(doc):
            return doc["options"]

        def doc_to_index(doc):
            return "ABCD".index(doc["answer"])
    """))
    (folder / "solo_tiny_letters.yaml").write_text(TASK_YAML.format(
        name="solo_tiny_letters", data=data, output_type="generate_until", doc_to_text="doc_to_letters",
        target="doc_to_target: answer", metric="exact_match"))
    (folder / "solo_tiny_choice.yaml").write_text(TASK_YAML.format(
        name="solo_tiny_choice", data=data, output_type="multiple_choice", doc_to_text="doc_to_question",
        target="doc_to_choice: !function utils.doc_to_choice\ndoc_to_target: !function utils.doc_to_index",
        metric="acc"))


@pytest.mark.e2e
def test_lmms_eval_runs_solo_with_the_answers_solo_eval_gives(random_model, task, tmp_path):  # noqa: F811
    tasks = tmp_path / "tasks"
    _write_tasks(tasks, task)
    env = subprocess_env(OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    command = [sys.executable, "-m", "lmms_eval", "--model", "solo", "--model_args", f"pretrained={random_model}",
               "--batch_size", "4", "--device", "cpu", "--tasks", "solo_tiny_letters",
               "--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "Error during evaluation" not in done.stdout, done.stdout[-3000:]
    (path,) = (tmp_path / "out").rglob("*_samples_solo_tiny_letters.jsonl")
    logged = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["doc_id"])

    # lmms-eval's answers are the ones `solo eval` gives with the same prompt and length.
    ours = tmp_path / "ours"
    run_eval(random_model, "mc", task, ours, max_new_tokens=4, progress=False)
    expected = [json.loads(line)["prediction"] for line in (ours / "predictions.jsonl").read_text().splitlines()]
    assert [r["filtered_resps"].strip() for r in logged] == expected


def test_adapter_loglikelihood_is_the_summed_reply_log_probability(random_model, task):  # noqa: F811
    """Called with lmms-eval's own request objects: lmms-eval 0.7.3's evaluator turns every
    loglikelihood answer into a string (`unwrap_generation_output`), so its multiple-choice tasks
    fail for every model and cannot drive this path end to end."""
    from lmms_eval.api.instance import Instance

    from solo.eval.lmms_adapter import SoloLmms
    from solo.hf.image_processing_solo import load_image

    adapter = SoloLmms(pretrained=str(random_model), batch_size=3, device="cpu")
    samples = load_samples("mc", task)[:2]
    adapter.task_dict = {"tiny": {"test": {index: sample for index, sample in enumerate(samples)}}}
    visual = lambda sample: [load_image(sample.image)]  # noqa: E731
    cloze = BENCHMARKS["mc"].cloze_prompt
    requests = [
        Instance("loglikelihood", (cloze(sample), f" {option}", visual, index, "tiny", "test"), idx=0,
                 metadata={"task": "tiny", "doc_id": index, "repeats": 1})
        for index, sample in enumerate(samples) for option in sample.options
    ]
    got = adapter.loglikelihood(requests)
    for index, sample in enumerate(samples):
        image = load_image(sample.image)
        direct = score_replies(adapter.model, adapter.processor, [cloze(sample)] * 4, [image] * 4, sample.options)
        mine = got[4 * index : 4 * index + 4]
        assert [total for total, _ in mine] == pytest.approx([total for total, _, _ in direct], abs=1e-4)
        assert [greedy for _, greedy in mine] == [greedy for _, _, greedy in direct]
