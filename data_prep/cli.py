"""`solo-data`: prepare SOLO training data (pack, plan, stats, preview). Non-interactive."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

# Only light imports here: the model stack (torch, transformers, megatron-core) loads inside the
# subcommand that needs it, so `--help` and bad arguments answer at once.
from .schema import FORMATS, TEMPLATES

PACK_EPILOG = """\
formats:
  imagenet     class folders ROOT/<synset>/*.JPEG or tar shards, tars of per-synset tars too (keys
               start with the synset, or carry .cls); needs --class-map ("n01440764<TAB>tench",
               JSON, or synset ids + --class-names lemmas)
  caption      webdataset tars (KEY.jpg + KEY.txt/KEY.json), img2dataset files folders, or
               JSONL/parquet rows {"image"|"jpg"|"png"|"webp": path-or-bytes, "caption"|"txt": text}
  interleaved  MMC4 {"text_list", "image_info": [{"image_name", "matched_text_index"}]} or
               OBELICS {"texts", "images"} JSONL/parquet/.jsonl.zip; --missing-images,
               --image-index (img2dataset output: images by URL)
  text         JSONL(.gz/.zst/.lz4)/parquet {"text": ...}; --exclude-subset drops SlimPajama subsets
               (e.g. --exclude-subset RedPajamaCommonCrawl --exclude-subset RedPajamaC4)
  llava        LLaVA JSON/JSONL {"image"|"images", "conversations": [{"from": "human"|"gpt", "value"}]}
  sharegpt     ShareGPT JSON/JSONL {"conversations": [{"from": "human"|"gpt"|"chatgpt"|"system", "value"}]}
  chat         OpenAI-chat JSONL, SOLO's interchange format (base64 data-URL or path images);
               LLaMA-Factory {"messages", "images"} with <image> placeholders

Folders are searched recursively (sorted, dotfiles skipped). Relative image paths resolve against
--image-root (default: the input file's folder). Every dataset's command: docs/data.md,
"Datasets as downloaded".
Run the same command again after an interruption (even kill -9): finished work is reused and the
result is byte-identical to an uninterrupted run. Bad records are rejected with a reason in
OUTPUT/report.json and never stop the run.

example:
  solo-data pack shards/*.tar --format caption --tokenizer ckpt/tokenizer \\
      --seq-length 32768 --output packed/cc3m --workers 8
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solo-data",
        description="Prepare SOLO training data: convert raw sources and pack them into fixed-length "
                    "sequences (pack), plan a mixture (plan), inspect packed data (stats, preview).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pack = commands.add_parser(
        "pack", help="convert and pack raw sources into a packed directory",
        description="Convert raw sources of one format into documents, tokenise them, verify every image, "
                    "split over-long documents at clean points and pack them (best-fit-decreasing over a "
                    "bounded window) into sequences of at most --seq-length tokens.",
        epilog=PACK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    pack.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="input files (.jsonl[.gz|.zst|.lz4], .json, .parquet, .tar[.gz], .jsonl.zip) or "
                           "folders of them; for imagenet also class folders")
    pack.add_argument("--format", required=True, choices=FORMATS, help="source format (see below)")
    pack.add_argument("--tokenizer", required=True, metavar="DIR", help="SOLO tokenizer directory (extended, fast)")
    pack.add_argument("--seq-length", required=True, type=int, metavar="N", help="pack length limit in tokens")
    pack.add_argument("--output", required=True, metavar="DIR", help="output directory (created)")
    pack.add_argument("--workers", type=int, default=1, metavar="K", help="parallel worker processes (default 1)")
    pack.add_argument("--template", choices=TEMPLATES, default="plain",
                      help="plain: messages concatenated without role markers (pretraining, SOLO); "
                           "mistral: Mistral-Instruct [INST] turns (SFT/chat). Default plain")
    pack.add_argument("--loss-on-user", action="store_true", help="train on user-turn text too (default: no loss)")
    pack.add_argument("--resize-mode", default="fit", metavar="MODE",
                      help="image resize rule: fit (aspect-preserving, default) or solo (SOLO-7B's)")
    pack.add_argument("--image-root", metavar="DIR", help="folder that relative image paths resolve against")
    pack.add_argument("--class-map", metavar="FILE",
                      help="imagenet: synset → class name mapping (lines 'SYNSET<TAB>lemmas' or 'SYNSET name', JSON "
                           "{synset: name | [names]} or Keras {index: [synset, name]}, or a synset-id list with "
                           "--class-names)")
    pack.add_argument("--class-names", metavar="FILE",
                      help="imagenet: the lemmas aligned line by line with a --class-map of synset ids "
                           "(BiT's imagenet21k_wordnet_ids.txt + imagenet21k_wordnet_lemmas.txt)")
    pack.add_argument("--missing-images", choices=("drop", "reject"), default="drop",
                      help="interleaved: an image that is not there (missing file, failed download) is dropped "
                           "from its document (default; counted in report.json) or rejects the document")
    pack.add_argument("--image-index", metavar="DIR",
                      help="interleaved: img2dataset output folder where images given by URL are found "
                           "(read from its parquet files and shards)")
    pack.add_argument("--shard", metavar="I/N",
                      help="pack only shard I of N (0-based) of the inputs: whole files when there are at least N, "
                           "else every N-th record; each shard is a complete output of its own")
    pack.add_argument("--exclude-subset", action="append", default=[], metavar="NAME",
                      help="text: drop records of this subset (meta.redpajama_set_name); repeatable")
    pack.add_argument("--max-patches", type=int, default=None, metavar="N",
                      help="visual-token budget of this stage: scale images down (aspect kept, the resize rule "
                           "otherwise unchanged) so that none exceeds N patches (1-1024; default 1024, full size); "
                           "report.json gives the patches before and after")
    pack.add_argument("--max-image-pixels", type=int, default=None, metavar="P",
                      help="reject images that decode to more pixels (default: the image processor's cap, "
                           "64 Mpx = 67108864)")
    pack.add_argument("--max-image-bytes", type=int, default=32 * 1024 * 1024, metavar="B",
                      help="reject image files larger than this (default 32 MiB)")
    pack.add_argument("--max-record-bytes", type=int, default=256 * 1024 * 1024, metavar="B",
                      help="reject a JSONL line or .json list entry longer than this (default 256 MiB)")
    pack.add_argument("--window", type=int, default=16384, metavar="DOCS",
                      help="packing window in document pieces (memory bound; default 16384)")
    pack.add_argument("--chunk-size", type=int, default=256, metavar="RECORDS",
                      help="records per unit of parallel work and of resume (default 256)")
    pack.add_argument("--checkpoint-seconds", type=float, default=30.0, metavar="S",
                      help="how often the packing pass records its position, so that a rerun after a crash "
                           "continues from there (default 30)")
    pack.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    pack.add_argument("--keep-work", action="store_true", help="keep OUTPUT/.work (chunk files) after success")
    pack.add_argument("--no-progress", action="store_true", help="no progress bar")

    plan = commands.add_parser(
        "plan", help="per-source sample counts and iterations of a mixture",
        description="Read a mixture YAML (packed directories with weights) and print, and write as JSON, the "
                    "number of packs drawn from each source and the number of iterations.",
        epilog="mixture YAML (the file training reads too; paths relative to it):\n"
               "  datasets:\n    - {path: packed/imagenet21k, weight: 0.7}\n"
               "    - {path: packed/slimpajama, weight: 0.3}\n"
               "Weights are normalised. The plan also prints each source's natural weight (its share of packs).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("mixture", metavar="MIXTURE", help="mixture YAML file")
    plan.add_argument("--global-batch", required=True, type=int, metavar="B", help="packs per iteration")
    amount = plan.add_mutually_exclusive_group(required=True)
    amount.add_argument("--epochs", type=float, metavar="E",
                        help="train on E × (total packs of all sources) samples")
    amount.add_argument("--tokens", type=float, metavar="T", help="train on about T non-pad tokens")
    plan.add_argument("--output", metavar="FILE", help="plan JSON to write (default: MIXTURE with .plan.json)")

    stats = commands.add_parser("stats", help="length/fill histograms and per-source counts of a packed directory")
    stats.add_argument("directory", metavar="DIR")
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")

    preview = commands.add_parser(
        "preview", help="render one pack as a picture (images as patch grids, text with loss marks)",
        description="Render pack i: each image drawn at its patch grid, the text decoded with the tokens "
                    "that carry loss marked (green), document boundaries shown. FILE ending in .html gives "
                    "a web page; .png a single picture.")
    preview.add_argument("directory", metavar="DIR")
    preview.add_argument("--pack", type=int, default=0, metavar="I", help="pack index (default 0)")
    preview.add_argument("--out", required=True, metavar="FILE", help="output .png or .html")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pack":
            return _pack(args)
        if args.command == "plan":
            from .mixture import plan_mixture, print_plan

            plan = plan_mixture(args.mixture, args.global_batch, epochs=args.epochs, tokens=args.tokens,
                                output=args.output)
            print_plan(plan)
            return 0
        if args.command == "stats":
            from .stats import compute_stats, format_stats

            result = compute_stats(args.directory)
            print(json.dumps(result, indent=2) if args.json else format_stats(result))
            return 0
        if args.command == "preview":
            from .preview import render_preview

            render_preview(args.directory, args.pack, args.out)
            print(f"wrote {args.out}")
            return 0
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"solo-data {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `solo-data stats DIR | head`: the reader has stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # or the flush at exit fails again
        return 1
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        from solo.outputs import no_space_message

        where = getattr(args, "output", None) or getattr(args, "out", None) or error.filename
        print(f"solo-data {args.command}: error: {no_space_message(where)}", file=sys.stderr)
        return 2
    return 1


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` → (I, N), 0 <= I < N."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(count):
        raise ValueError(f"--shard must be I/N with 0 <= I < N (e.g. 0/8), got {text!r}")
    return int(index), int(count)


def _pack(args) -> int:
    if args.workers > 1:
        from .workers import start_worker_server

        start_worker_server()  # its imports overlap with this process's own, below
    from .encode import EncodeOptions
    from .pack import PackConfig, run_pack
    from .sources import SourceOptions, load_class_map

    from solo.hf.image_processing_solo import DEFAULT_MAX_PIXELS, MAX_PATCHES, RESIZE_MODES, check_max_patches

    if args.resize_mode not in RESIZE_MODES:
        raise ValueError(f"--resize-mode must be one of {', '.join(RESIZE_MODES)}, got {args.resize_mode!r}")
    if args.max_image_pixels is None:
        args.max_image_pixels = DEFAULT_MAX_PIXELS
    if args.max_patches is None:
        args.max_patches = MAX_PATCHES
    try:
        check_max_patches(args.max_patches)
    except ValueError:
        raise ValueError(f"--max-patches must be from 1 to {MAX_PATCHES} (patches per image), "
                         f"got {args.max_patches}") from None
    if args.format == "imagenet" and not args.class_map:
        raise ValueError("--format imagenet needs --class-map FILE (synset → class name)")
    if args.class_names and not args.class_map:
        raise ValueError("--class-names needs --class-map (the synset ids its lines are aligned with)")
    if args.image_index and not os.path.isdir(args.image_index):
        raise FileNotFoundError(f"--image-index {args.image_index!r} is not a folder "
                                "(give img2dataset's output folder)")
    source = SourceOptions(
        format=args.format, image_root=args.image_root,
        class_map=load_class_map(args.class_map, args.class_names) if args.class_map else {},
        exclude_subsets=tuple(args.exclude_subset), max_image_bytes=args.max_image_bytes,
        max_record_bytes=args.max_record_bytes, missing_images=args.missing_images, image_index=args.image_index,
        shard=parse_shard(args.shard) if args.shard else None)
    encode = EncodeOptions(seq_length=args.seq_length, template=args.template, loss_on_user=args.loss_on_user,
                           resize_mode=args.resize_mode, max_pixels=args.max_image_pixels,
                           max_patches=args.max_patches)
    if args.seq_length < 8:
        raise ValueError("--seq-length must be at least 8")
    config = PackConfig(inputs=args.inputs, output=args.output, tokenizer=args.tokenizer, source=source,
                        encode=encode, workers=args.workers, chunk_size=args.chunk_size, window_items=args.window,
                        overwrite=args.overwrite, keep_work=args.keep_work, progress=not args.no_progress,
                        checkpoint_seconds=args.checkpoint_seconds)
    run_pack(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
