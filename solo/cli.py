"""`solo`: the model-side command line (create a SOLO checkpoint from a base LLM, …)."""

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
    print(f"solo create: wrote SOLO checkpoint to {out} (new: the patch projection, N(0, 0.02) with seed "
          f"{args.seed}, and the vision-token rows of the embeddings and LM head, the mean of the base rows; "
          "every other weight is the base's)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
