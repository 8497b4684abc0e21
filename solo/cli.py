"""`solo`: the model-side command line (create a SOLO checkpoint from a base LLM, run the demo, …)."""

from __future__ import annotations

import argparse
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


def _demo(args: argparse.Namespace) -> int:
    from solo.demo.pipeline import FAST, FULL, run_demo

    config = FAST if args.fast else FULL
    if args.blank_images:
        import dataclasses

        config = dataclasses.replace(config, blank_images=True)
    out = args.out or ("runs/demo" + ("-fast" if args.fast else "") + ("-blank" if args.blank_images else ""))
    return run_demo(out, config, until=args.until)


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

    from solo.demo.pipeline import stage_names

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
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
