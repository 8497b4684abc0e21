"""`solo`: the model-side command line (create a SOLO checkpoint from a base LLM, convert checkpoints,
run the demo, evaluate, …)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _without_deepspeed() -> None:
    """For commands that never use DeepSpeed (create, convert, eval): transformers imports accelerate,
    which imports DeepSpeed when it is installed, and without a GPU DeepSpeed warns that it falls back to
    its CPU accelerator. Naming that same accelerator keeps the warning, which a user cannot act on, away."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _create(args: argparse.Namespace) -> int:
    _without_deepspeed()
    from solo.create import CreateError, create_solo_checkpoint
    from solo.outputs import OutputError

    try:
        out = create_solo_checkpoint(
            args.base, args.out, seed=args.seed, resize_mode=args.resize_mode, overwrite=args.overwrite,
            image_attention=args.image_attention, vision_positions=args.vision_positions,
        )
    except (CreateError, OutputError) as error:
        print(f"solo create: error: {error}", file=sys.stderr)
        return 2
    print(f"solo create: wrote SOLO checkpoint to {out} (new: the patch projection, N(0, 0.02) with seed "
          f"{args.seed}, and the vision-token rows of the embeddings and LM head, the mean of the base rows; "
          "every other weight is the base's)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    _without_deepspeed()
    from solo.checkpoints import CheckpointError
    from solo.outputs import OutputError

    try:
        if args.direction == "hf-to-hf":
            from solo.hf_checkpoint import convert_hf_to_hf

            out = convert_hf_to_hf(args.hf, args.out, layout=args.layout, tokenizer_dir=args.tokenizer,
                                   overwrite=args.overwrite)
        else:
            # megatron-core is imported only here: the HF side works without it.
            from megatron_patch.convert import convert_hf_to_mcore, convert_mcore_to_hf

            if args.direction == "hf-to-mcore":
                out = convert_hf_to_mcore(args.hf, args.out, divisible_by=args.make_vocab_size_divisible_by,
                                          dtype=args.dtype, overwrite=args.overwrite)
            else:
                out = convert_mcore_to_hf(args.ckpt, args.out, iteration=args.iteration, tokenizer_dir=args.tokenizer,
                                          dtype=args.dtype, layout=args.layout, overwrite=args.overwrite)
    except (CheckpointError, OutputError) as error:
        print(f"solo convert {args.direction}: error: {error}", file=sys.stderr)
        return 2
    print(f"solo convert {args.direction}: wrote {out}")
    return 0


def _add_convert(commands) -> None:
    convert = commands.add_parser(
        "convert", help="convert checkpoints: Hugging Face <-> megatron-core, SOLO-7B layout <-> native",
        description="Checkpoint conversion through one declarative mapping "
        "(megatron_patch/model/state_dict_mapping.py). "
        "Outputs appear atomically; a non-empty output directory is refused unless --overwrite.",
    )
    directions = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    dtypes = ("bfloat16", "float16", "float32")

    to_mcore = directions.add_parser(
        "hf-to-mcore", help="Hugging Face SOLO directory -> megatron-core torch_dist checkpoint (checkpoint.init_from)",
        description="Write a megatron-core torch_dist checkpoint (OUT/iter_0000000, the tokenizer in "
        "OUT/tokenizer, the model config inside) that training loads with checkpoint.init_from=OUT at any "
        "TP/PP/DP. Accepts `solo create` output, exports, and the released SOLO-7B layout.",
    )
    to_mcore.add_argument("--hf", required=True, help="Hugging Face SOLO checkpoint directory (safetensors)")
    to_mcore.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    to_mcore.add_argument("--dtype", choices=dtypes, help="cast the weights (default: keep the checkpoint's dtype)")
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                          help="pad embedding rows to a multiple of this (training re-pads for its TP on load)")

    to_hf = directions.add_parser(
        "mcore-to-hf", help="megatron-core checkpoint (any TP/PP) -> Hugging Face directory",
        description="Export sharded safetensors, config, tokenizer, chat template and processor that load with "
        "AutoModelForCausalLM/AutoProcessor (trust_remote_code=True). The tokenizer saved beside the checkpoints is "
        "used unless --tokenizer; the checkpoint's dtype is kept unless --dtype.",
    )
    to_hf.add_argument("--ckpt", required=True,
                       help="a training SAVE_DIR (its newest checkpoint that verifies) or an iter_* directory")
    to_hf.add_argument("--iteration", type=int, help="export this iteration instead of the newest")
    to_hf.add_argument("--out", required=True, help="output directory (written atomically)")
    to_hf.add_argument("--tokenizer", help="tokenizer/processor directory (default: CKPT/tokenizer)")
    to_hf.add_argument("--dtype", choices=dtypes, help="cast the weights (default: keep the checkpoint's dtype)")

    hf_to_hf = directions.add_parser(
        "hf-to-hf", help="re-lay a SOLO Hugging Face directory out (released SOLO-7B -> native, or back)",
        description="Copy the weights unchanged and rewrite config/code/processor files: --layout native makes "
        "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) return the SOLO model; --layout solo7b "
        "writes the released SOLO-7B layout (model_type mistral, no auto_map).",
    )
    hf_to_hf.add_argument("--hf", required=True, help="Hugging Face SOLO checkpoint directory")
    hf_to_hf.add_argument("--out", required=True, help="output directory (written atomically)")
    hf_to_hf.add_argument("--tokenizer", help="tokenizer/processor directory (default: the --hf directory)")
    for parser in (to_hf, hf_to_hf):
        parser.add_argument("--layout", choices=("native", "solo7b"), default="native",
                            help="native (model_type solo + code, default) or solo7b (the released SOLO-7B layout)")
    for parser in (to_mcore, to_hf, hf_to_hf):
        parser.add_argument("--overwrite", action="store_true", help="replace a previous output of the same command")
        parser.set_defaults(handler=_convert)


def _headline(benchmark: str, results: dict) -> str:
    metrics = results["metrics"]
    if benchmark == "mme":
        headline = f"perception {metrics['perception']:.2f}, cognition {metrics['cognition']:.2f}"
    else:
        headline = f"accuracy {metrics['accuracy']:.2f}%"
    return (f"{benchmark} ({results['mode']}, protocol {results['protocol']}): {headline} on {results['scored']} "
            f"samples ({results['bad']} bad)")


def _eval(args: argparse.Namespace) -> int:
    _without_deepspeed()
    from solo.eval import EvalDataError
    from solo.eval.runner import run_eval
    from solo.outputs import OutputError

    try:
        results = run_eval(
            args.model, args.benchmark, args.data, args.out, mode=args.mode, batch_size=args.batch_size,
            limit=args.limit, max_new_tokens=args.max_new_tokens, protocol=args.protocol,
            extractor_url=args.extractor_url, overwrite=args.overwrite,
        )
    except (EvalDataError, OutputError, ValueError) as error:
        print(f"solo eval: error: {error}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":
        return 0  # data parallel: the main process reports
    print(f"solo eval: {_headline(args.benchmark, results)}; results in {args.out}/results.json")
    return 0


def _eval_score(args: argparse.Namespace) -> int:
    from solo.eval import EvalDataError
    from solo.eval.score import score_predictions
    from solo.outputs import OutputError

    try:
        results = score_predictions(args.benchmark, args.data, args.predictions, args.out, protocol=args.protocol,
                                    extractor_url=args.extractor_url, overwrite=args.overwrite)
    except (EvalDataError, OutputError, ValueError) as error:
        print(f"solo eval score: error: {error}", file=sys.stderr)
        return 2
    unused = len(results["unused_predictions"])
    print(f"solo eval score: {_headline(args.benchmark, results)}"
          + (f"; {unused} prediction lines unused (listed in results.json)" if unused else "")
          + f"; results in {args.out}/results.json")
    return 0


def _add_scoring_arguments(parser: argparse.ArgumentParser, benchmarks) -> None:
    from solo.eval.protocols import PROTOCOL_NAMES

    parser.add_argument("--benchmark", required=True, choices=sorted(benchmarks), help="which benchmark --data holds")
    parser.add_argument(
        "--data", required=True,
        help="the benchmark's local file or folder as distributed (parquet, VLMEvalKit TSV, original JSON/folders; "
        "see docs/evaluation.md), or a JSONL for --benchmark mc",
    )
    parser.add_argument(
        "--protocol", choices=PROTOCOL_NAMES, default=None,
        help="whose prompt, generation length, answer parsing and aggregation to reproduce: official (the benchmark "
        "authors' scorer; LLaVA's for ScienceQA; the default), lmms-eval (0.7.3) or vlmevalkit (rule-based, no LLM "
        "judge). AI2D has no official scorer (default vlmevalkit); SEED-Bench's is likelihood ranking "
        "(default in generate mode: lmms-eval)",
    )
    parser.add_argument(
        "--extractor-url", default=None,
        help="MathVista: an OpenAI-compatible chat completions endpoint (http://host:port/v1) that extracts the "
        "answer as MathVista's GPT-4 step does, for answers the rules cannot read; model name and key from "
        "SOLO_EXTRACTOR_MODEL / SOLO_EXTRACTOR_API_KEY",
    )
    parser.add_argument("--out", required=True, help="output directory for predictions.jsonl and results.json")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="start afresh in an --out that an earlier run of the same command wrote (solo eval otherwise resumes "
        "the same run)",
    )


def build_eval_score_parser() -> argparse.ArgumentParser:
    from solo.eval.benchmarks import BENCHMARKS

    parser = argparse.ArgumentParser(
        prog="solo eval score",
        description=(
            "Score answers made elsewhere (vLLM, an API model) or rescore a finished `solo eval` run under another "
            "protocol, without a model: --predictions is a JSONL of {\"id\", \"prediction\"} lines, ids as solo "
            "eval writes them (its predictions.jsonl can be passed as it is). Same scoring and results.json as "
            "solo eval."
        ),
    )
    _add_scoring_arguments(parser, BENCHMARKS)
    parser.add_argument("--predictions", required=True, help="JSONL of {\"id\", \"prediction\"} lines")
    parser.set_defaults(handler=_eval_score)
    return parser


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    from solo.demo.pipeline import FAST, FULL, run_demo

    from solo.hf.image_processing_solo import check_max_patches

    try:
        if args.max_patches is not None:
            check_max_patches(args.max_patches)
    except ValueError as error:
        print(f"solo demo: error: --{str(error).replace('max_patches', 'max-patches', 1)}", file=sys.stderr)
        return 2
    if args.compare is not None and not (Path(args.compare) / "demo.json").is_file():
        print(f"solo demo: error: --compare {args.compare} is not a demo output directory (no demo.json)",
              file=sys.stderr)
        return 2
    config = dataclasses.replace(FAST if args.fast else FULL, blank_images=args.blank_images, variant=args.variant,
                                 max_patches=args.max_patches)
    out = args.out or ("runs/demo" + ("-fast" if args.fast else "") + ("-blank" if args.blank_images else "")
                       + ("" if args.variant == "solo" else f"-{args.variant}")
                       + (f"-patches{args.max_patches}" if args.max_patches else ""))
    from solo.outputs import OutputError

    try:
        return run_demo(out, config, until=args.until, compare=args.compare)
    except OutputError as error:
        print(f"solo demo: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="solo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    create = commands.add_parser(
        "create",
        help="turn a local Hugging Face Mistral/Llama checkpoint into a SOLO checkpoint",
        description=(
            "Extend the tokenizer with the vision tokens (SOLO-7B ids for a 32,000-entry base), grow the "
            "embeddings and LM head (new rows = mean of the old rows), add the 3072->hidden patch projection "
            "(N(0, 0.02), seeded) and save model, tokenizer and processor so that "
            "AutoModelForCausalLM/AutoProcessor.from_pretrained(OUT, trust_remote_code=True) load it."
        ),
    )
    create.add_argument("--base", required=True, help="local Hugging Face Mistral or Llama checkpoint directory")
    create.add_argument("--out", required=True, help="output directory (written atomically)")
    create.add_argument("--seed", type=int, default=0, help="seed of the patch projection's initialisation")
    create.add_argument(
        "--resize-mode", choices=("fit", "solo"), default="fit",
        help="image resize rule stored in the processor: 'fit' keeps the aspect ratio (default), "
        "'solo' reproduces SOLO-7B's sizes",
    )
    create.add_argument("--image-attention", default="causal", metavar="MODE",
                        help="causal (SOLO, default) or bidirectional: an image block's tokens see each other")
    create.add_argument("--vision-positions", default="sequential", metavar="MODE",
                        help="sequential (SOLO, default) or 2d: rotary row/column sections for patches")
    create.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    create.set_defaults(handler=_create)
    _add_convert(commands)

    from solo.eval.benchmarks import BENCHMARKS  # light: no model code imported

    evaluate = commands.add_parser(
        "eval",
        help="score a SOLO checkpoint on MME, MMStar, ScienceQA, AI2D, SEED-Bench, MathVista or your own "
        "multiple-choice JSONL ('solo eval score': score answers without a model)",
        description=(
            "Evaluate a Hugging Face SOLO checkpoint on a benchmark read from local files, with the protocol's "
            "prompt and scoring rule. Writes predictions.jsonl (appended per batch) and results.json to --out; "
            "running the same command again resumes. Data parallel: torchrun --nproc-per-node N -m solo.cli eval ... "
            "To score answers without a model: solo eval score --help"
        ),
    )
    evaluate.add_argument("--model", required=True, help="SOLO checkpoint directory (Hugging Face format)")
    _add_scoring_arguments(evaluate, BENCHMARKS)
    evaluate.add_argument(
        "--mode", choices=("generate", "likelihood"), default="generate",
        help="generate: greedy answer, parsed with the protocol's rule (default); likelihood: pick the option "
        "whose text the model finds most likely (no parsing; for small or early checkpoints)",
    )
    evaluate.add_argument("--batch-size", type=int, default=8, help="samples per batch on each process (default 8)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help="generation length limit (default: the protocol's, e.g. lmms-eval's 16 for MME)")
    evaluate.set_defaults(handler=_eval)

    from solo.demo.pipeline import VARIANTS, stage_names

    demo = commands.add_parser(
        "demo",
        help="run the whole pipeline on a generated picture task (CPU, minutes)",
        description=(
            "Generate a picture question-answering task (shapes, colours, counts, positions), then run the real "
            "pipeline on it: solo create from a tiny local base, solo-data pack, megatron-core pretraining stages "
            "1 -> 2 -> 3 (torchrun, 2 processes), export, instruction tuning, and print the held-out accuracy next "
            "to chance. Running the same command again continues after the last finished stage. OUT/report.html "
            "shows the loss curves and held-out answers; OUT/logs/ holds each stage's log."
        ),
    )
    demo.add_argument("--out", help="output directory (default runs/demo, runs/demo-fast with --fast)")
    demo.add_argument("--fast", action="store_true",
                      help="a tiny variant (a few steps per stage) that checks the pipeline runs, not that it learns")
    demo.add_argument("--until", metavar="STAGE",
                      help="stop after this stage; one of: " + ", ".join(stage_names()))
    demo.add_argument("--blank-images", action="store_true",
                      help="the control: every picture blanked (questions and answers unchanged), so the model "
                      "can only use the text and should stay near chance")
    demo.add_argument("--variant", choices=tuple(VARIANTS), default="solo",
                      help="solo: SOLO's model (default); native: image blocks attended both ways and 2-D rotary "
                      "positions for patches (model.image_attention=bidirectional, model.vision_positions=2d)")
    demo.add_argument("--max-patches", type=int, metavar="N",
                      help="stage 1's visual-token budget: pack its pictures at most N patches each "
                      "(solo-data pack --max-patches; the later stages at full size)")
    demo.add_argument("--compare", metavar="OTHER_OUT",
                      help="another demo run's output directory: the report shows its loss curves and held-out "
                      "accuracy beside this run's (e.g. --variant native --compare runs/demo)")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["eval", "score"]:  # `solo eval score`: scoring without a model, its own arguments
        args = build_eval_score_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
