"""`python -m solo.sft --config RECIPE [section.key=value ...]` (under `accelerate launch`)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m solo.sft",
        description=(
            "Instruction-tune a Hugging Face SOLO model with Accelerate (DDP or DeepSpeed ZeRO-2/3). Run it under "
            "`accelerate launch --config_file launch/accelerate/<ddp|zero2|zero3>.yaml`. Running the same command "
            "again resumes from the newest checkpoint in checkpoint.save; the final model is exported to "
            "checkpoint.save/hf."
        ),
    )
    parser.add_argument("--config", required=True,
                        help="recipe YAML, or a packaged recipe name: solo (SOLO's hyperparameters), debug_cpu")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from solo.recipe import ConfigError
    from solo.sft.data import DataError
    from solo.sft.recipe import load_sft_recipe

    try:
        cfg = load_sft_recipe(args.config, args.overrides)
        from solo.sft.train import NonFiniteLossError, train
    except ConfigError as error:
        print(f"solo.sft: error: {error}", file=sys.stderr)
        return 2
    from data_prep.pack import NothingPackedError
    from solo.checkpoints import CheckpointError
    from solo.outputs import OutputError

    try:
        train(cfg)
    except (ConfigError, DataError, NothingPackedError, OutputError, CheckpointError) as error:
        print(f"solo.sft: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"solo.sft: stopped: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
