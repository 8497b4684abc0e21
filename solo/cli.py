"""`solo`: the model-side command line (create a SOLO checkpoint from a base LLM, …)."""

from __future__ import annotations

import argparse
import os
import sys


def _create(args: argparse.Namespace) -> int:
    from solo.create import CreateError, create_solo_checkpoint
    from solo.outputs import OutputError

    try:
        out = create_solo_checkpoint(
            args.base, args.out, seed=args.seed, resize_mode=args.resize_mode, overwrite=args.overwrite
        )
    except (CreateError, OutputError) as error:
        print(f"solo create: error: {error}", file=sys.stderr)
        return 2
    print(f"solo create: wrote SOLO checkpoint to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from solo.eval import EvalDataError
    from solo.eval.runner import run_eval
    from solo.outputs import OutputError

    try:
        results = run_eval(
            args.model, args.benchmark, args.data, args.out, mode=args.mode, batch_size=args.batch_size,
            limit=args.limit, max_new_tokens=args.max_new_tokens, overwrite=args.overwrite,
        )
    except (EvalDataError, OutputError, ValueError) as error:
        print(f"solo eval: error: {error}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":
        return 0  # data parallel: the main process reports
    metrics = results["metrics"]
    headline = (
        f"perception {metrics['perception']:.2f}, cognition {metrics['cognition']:.2f}"
        if args.benchmark == "mme" else f"accuracy {metrics['accuracy']:.2f}%"
    )
    print(f"solo eval: {args.benchmark} ({args.mode}): {headline} on {results['scored']} samples "
          f"({results['bad']} bad); results in {args.out}/results.json")
    return 0


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
    create.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    create.set_defaults(handler=_create)

    from solo.eval.benchmarks import BENCHMARKS  # light: no model code imported

    evaluate = commands.add_parser(
        "eval",
        help="score a SOLO checkpoint on MME, MMStar, ScienceQA, AI2D, SEED-Bench or your own multiple-choice JSONL",
        description=(
            "Evaluate a Hugging Face SOLO checkpoint on a benchmark read from local files, with the benchmark's "
            "prompt and scoring rule. Writes predictions.jsonl (appended per batch) and results.json to --out; "
            "running the same command again resumes. Data parallel: torchrun --nproc-per-node N -m solo.cli eval ..."
        ),
    )
    evaluate.add_argument("--model", required=True, help="SOLO checkpoint directory (Hugging Face format)")
    evaluate.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS), help="which benchmark --data holds")
    evaluate.add_argument(
        "--data", required=True,
        help="the benchmark's local file or folder as distributed (parquet, VLMEvalKit TSV, original JSON/folders; "
        "see the README), or a JSONL for --benchmark mc",
    )
    evaluate.add_argument("--out", required=True, help="output directory for predictions.jsonl and results.json")
    evaluate.add_argument(
        "--mode", choices=("generate", "likelihood"), default="generate",
        help="generate: greedy answer, parsed with the benchmark's rule (default); likelihood: pick the option "
        "whose text the model finds most likely (no parsing; for small or early checkpoints)",
    )
    evaluate.add_argument("--batch-size", type=int, default=8, help="samples per batch on each process (default 8)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    evaluate.add_argument("--max-new-tokens", type=int, default=32, help="generation length limit (default 32)")
    evaluate.add_argument(
        "--overwrite", action="store_true",
        help="start afresh in an --out that an earlier `solo eval` wrote (by default the same command resumes)",
    )
    evaluate.set_defaults(handler=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
