"""Held-out accuracy of the demo task: greedy answers of a trained model, scored by exact match.

    python -m solo.demo.evaluate megatron --ckpt SAVE_DIR --packed PACKED_HELDOUT --questions heldout.json --out R.json
    python -m solo.demo.evaluate hf --model HF_DIR --questions heldout.json --out R.json

``megatron`` reads a megatron-core pretraining checkpoint (any TP/PP it was saved at; evaluated on
one process) and the held-out set as `solo-data pack` laid it out (any template; the demo packs it
in the chat layout): the prompt of a question is its document up to the first token with loss
(picture block and question), and the answer is generated greedily until EOS by
``megatron_patch.generate`` (all prompts share one packed row per decoding step). ``hf`` runs a
Hugging Face SOLO checkpoint with ``model.generate`` on the chat template (the instruction-tuned model).

Both write R.json (accuracy, chance, per question type, every answer) and print one line
``accuracy A (n/N)  chance C`` plus a few examples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

from solo.demo.task import chance_accuracy
from solo.outputs import write_json_atomic

MAX_ANSWER_TOKENS = 8


def score(records: list[dict], predictions: dict[str, str]) -> dict:
    """Exact-match accuracy (whitespace-trimmed, case-insensitive) overall and per question type."""
    per_type: dict[str, list[int]] = defaultdict(list)
    answers = []
    for record in records:
        expected = record["conversations"][1]["value"]
        predicted = predictions.get(record["id"], "")
        correct = int(predicted.strip().lower() == expected.strip().lower())
        per_type[record["question_type"]].append(correct)
        answers.append(dict(id=record["id"], image=record["image"], question_type=record["question_type"],
                            question=record["conversations"][0]["value"].replace("<image>\n", ""),
                            expected=expected, predicted=predicted, correct=bool(correct)))
    hits = sum(a["correct"] for a in answers)
    return dict(
        accuracy=hits / max(len(answers), 1),
        correct=hits,
        total=len(answers),
        chance=chance_accuracy(records),
        per_type={t: sum(v) / len(v) for t, v in sorted(per_type.items())},
        answers=answers,
    )


def accuracy_line(result: dict) -> str:
    """The demo's headline: held-out accuracy next to chance."""
    per_type = ", ".join(f"{t} {a:.2f}" for t, a in result["per_type"].items())
    return (f"accuracy {result['accuracy']:.3f} ({result['correct']}/{result['total']})  "
            f"chance {result['chance']:.3f}  [{per_type}]")


def _load_questions(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"evaluate: cannot read the held-out questions {path}: {error}") from None
    if not isinstance(records, list) or not all("question_type" in r and "id" in r for r in records):
        raise SystemExit(f"evaluate: {path} is not a demo question set (a list of records with id, "
                         "question_type, image and conversations); regenerate it with `solo demo`")
    return records


# ----------------------------------------------------------------------------------------------
# megatron-core checkpoint
# ----------------------------------------------------------------------------------------------


def evaluate_megatron(ckpt: str, packed: str, records: list[dict]) -> dict:
    """Accuracy of the checkpoint on the packed held-out set (documents mapped back to `records`)."""
    from data_prep.reader import PackedReader
    from megatron_patch.generate import document_prompt, greedy_generate, load_model

    model, cfg = load_model(ckpt)
    reader = PackedReader(packed)
    tokenizer = reader.load_tokenizer()
    prompts, ids = [], []
    for pack_index in range(len(reader)):
        pack = reader[pack_index]
        for doc, (_, record_number, _) in enumerate(reader.doc_origin(pack_index).tolist()):
            prompts.append(document_prompt(pack, doc))
            ids.append(records[record_number]["id"])
    generated = greedy_generate(model, prompts, tokenizer.eos_token_id, cfg.model.vocab_size, MAX_ANSWER_TOKENS)
    predictions = {i: tokenizer.decode(g, skip_special_tokens=True) for i, g in zip(ids, generated)}
    return score(records, predictions)


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoint
# ----------------------------------------------------------------------------------------------


def evaluate_hf(model_dir: str, records: list[dict], image_root: str, batch_size: int = 32) -> dict:
    """Accuracy of a Hugging Face SOLO checkpoint answering with `generate` on the chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    model.eval()
    predictions = {}
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        texts = [processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": r["conversations"][0]["value"].replace("<image>\n", "")}]}])
            for r in batch]
        images = [[os.path.join(image_root, r["image"])] for r in batch]
        inputs = processor(texts, images=images, padding_side="left")  # generation continues on the right
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        for record, tokens in zip(batch, new_tokens):
            predictions[record["id"]] = processor.decode(tokens, skip_special_tokens=True)
    return score(records, predictions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m solo.demo.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True)
    mcore = kinds.add_parser("megatron", help="a megatron-core pretraining checkpoint")
    mcore.add_argument("--ckpt", required=True, help="SAVE_DIR of a pretraining stage (or one iter_* directory)")
    mcore.add_argument("--packed", required=True,
                       help="the held-out questions packed by `solo-data pack --format llava`")
    hf = kinds.add_parser("hf", help="a Hugging Face SOLO checkpoint (generate)")
    hf.add_argument("--model", required=True, help="Hugging Face SOLO checkpoint directory")
    for sub in (mcore, hf):
        sub.add_argument("--questions", required=True, help="held-out question set (heldout.json of `solo demo`)")
        sub.add_argument("--out", required=True, help="results JSON to write")
        sub.add_argument("--examples", type=int, default=4, help="held-out answers to print (default 4)")
    args = parser.parse_args(argv)
    records = _load_questions(args.questions)
    if args.kind == "megatron":
        result = evaluate_megatron(args.ckpt, args.packed, records)
    else:
        result = evaluate_hf(args.model, records, os.path.dirname(os.path.abspath(args.questions)))
    write_json_atomic(args.out, result)
    for answer in result["answers"][:args.examples]:
        print(f"  {answer['image']}: {answer['question']} -> {answer['predicted']!r} "
              f"(expected {answer['expected']!r})")
    print(accuracy_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
