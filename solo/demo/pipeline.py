"""`solo demo`: the whole pipeline on a generated picture task, small enough for a laptop CPU.

Stages (each one a subprocess of the same entry point a user runs at scale, except the two that
make the demo's own inputs):

    sources       raw sources: PNG files, labels/captions JSONL, LLaVA-style instruction JSON, held-out set
    base          a tiny local base LLM (Mistral layout, no download; solo/tiny.py)
    create        solo create                      -> SOLO checkpoint (HF) with the extended tokenizer
    pack_*        solo-data pack                   -> packed pretraining data and the packed held-out set
    convert_init  solo convert hf-to-mcore         -> megatron-core checkpoint of `create`'s output
    stage1..3     torchrun -m megatron_patch.train -> pretraining stages 1 -> 2 -> 3 (DP=2 on 2 processes)
    eval_pretrain held-out accuracy of the stage-3 megatron-core checkpoint (greedy answers, chat layout)
    export        solo convert mcore-to-hf         -> Hugging Face checkpoint of stage 3
    sft           accelerate launch -m solo.sft    -> instruction-tuned model
    eval          held-out accuracy of the SFT model with HF generate

Every finished stage leaves OUT/done/<stage>.json, so running the same command again continues
with the first unfinished stage. A failing stage stops the run with its name, its log
(OUT/logs/<stage>.log) and how to rerun. At the end (or at a failure) OUT/report.html shows the
loss curves of every stage run so far and held-out pictures with questions and answers.

`--variant native` runs the same pipeline on a native-VLM model (image blocks attended both ways,
2-D rotary positions for patches: `solo.hf.native_vision`), `--max-patches N` packs stage 1's
pictures at a visual-token budget of N patches (the later stages at full size), and `--compare
OTHER_OUT` puts another run's loss curves and held-out accuracy beside this one's in the report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from solo.demo.task import TaskSizes, vocabulary_texts, write_sources
from solo.metrics import METRICS_FILE
from solo.outputs import atomic_output_dir, claim_output_dir, output_lock, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_RECIPE = REPO_ROOT / "megatron_patch" / "recipes" / "demo_cpu.yaml"
SFT_RECIPE = "debug_cpu"  # the SFT engineer's packaged CPU recipe (solo/sft/recipes/)
# --variant: the model's (image_attention, vision_positions); solo is SOLO's, native the native-VLM switches.
VARIANTS = {"solo": ("causal", "sequential"), "native": ("bidirectional", "2d")}
ACCELERATE_CONFIG = REPO_ROOT / "launch" / "accelerate" / "ddp.yaml"


@dataclass(frozen=True)
class TrainStage:
    """One pretraining stage of the demo: its data (a packed source), iterations and peak LR."""

    source: str
    iters: int
    lr: float
    warmup: int


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides what the demo computes (stored in OUT/demo.json; a rerun must match)."""

    sizes: TaskSizes
    stages: tuple[TrainStage, TrainStage, TrainStage]
    seq_length: int = 256
    global_batch: int = 8
    nproc: int = 2  # torchrun / accelerate processes: DP = 2 (the recipe's TP = PP = 1)
    sft_steps: int = 30
    sft_samples_per_step: int = 32
    sft_lr: float = 1e-4
    base_vocab_size: int = 1024  # the tiny base's tokenizer (the model's shape comes from DEMO_RECIPE)
    seed: int = 0
    blank_images: bool = False
    variant: str = "solo"  # a key of VARIANTS
    max_patches: Optional[int] = None  # stage 1's visual-token budget (solo-data pack --max-patches)


FULL = DemoConfig(
    sizes=TaskSizes(pretrain=3000, instructions=6000, heldout=400),
    stages=(TrainStage("labels", 150, 2e-3, 15), TrainStage("captions", 150, 2e-3, 15),
            TrainStage("instructions", 250, 2e-3, 20)),
)
FAST = DemoConfig(
    sizes=TaskSizes(pretrain=64, instructions=128, heldout=32),
    stages=(TrainStage("labels", 3, 2e-3, 1), TrainStage("captions", 3, 2e-3, 1),
            TrainStage("instructions", 3, 2e-3, 1)),
    sft_steps=3,
)


@dataclass
class Stage:
    """A pipeline stage: a command (subprocess) or an in-process function, and what to show of it."""

    name: str
    what: str
    command: Optional[list[str]] = None
    function: Optional[Callable[[], None]] = None
    cpu_env: dict = field(default_factory=dict)  # extra environment when there is no GPU
    # A training stage's metrics.jsonl (pretraining and SFT share the format) and its step count:
    # the console gets one line per step from it.
    metrics: Optional[Path] = None
    steps: Optional[int] = None
    # Output lines echoed to the console (the rest goes to the stage's log only).
    echo: str = r"(^accuracy |^  images/)"


class StageFailed(RuntimeError):
    pass


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _torchrun(nproc: int, *args: str) -> list[str]:
    # --standalone: a free local rendezvous port, so concurrent runs on one machine do not collide.
    return _python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args)


COMMAND = "solo demo"


def _atomic_dir(target: Path, make: Callable[[Path], None]) -> None:
    """Build a directory under a temporary name and rename it into place (a crash leaves no half output);
    it replaces only an earlier output of the demo, never a folder the demo did not write."""
    with atomic_output_dir(target, command=COMMAND, overwrite=True) as staging:
        make(staging)


def build_stages(out: Path, config: DemoConfig) -> list[Stage]:
    """The demo's stage list, in order, with the exact commands."""
    raw, packed, runs = out / "raw", out / "packed", out / "runs"
    init_hf = out / "init_hf"
    image_attention, vision_positions = VARIANTS[config.variant]
    budget = {config.stages[0].source: ["--max-patches", str(config.max_patches)]} if config.max_patches else {}
    stages = [
        Stage("sources", "generate the raw sources (pictures, labels, captions, instructions, held-out set)",
              function=lambda: _atomic_dir(raw, lambda d: write_sources(d, config.sizes, config.seed,
                                                                         config.blank_images))),
        Stage("base", "build a tiny local base LLM (Mistral layout, random weights)",
              function=lambda: _atomic_dir(out / "base", lambda d: _make_base(d, config))),
        Stage("create", "solo create: SOLO checkpoint from the base",
              _python("-m", "solo.cli", "create", "--base", str(out / "base"), "--out", str(init_hf),
                      "--seed", str(config.seed), "--image-attention", image_attention,
                      "--vision-positions", vision_positions, "--overwrite")),
    ]
    # Questions are packed in the Mistral chat layout ([INST] picture question [/INST] answer</s>), the form
    # SFT and HF inference use, so stage 3 (instruction-like data, as SOLO's stage 3) and SFT agree.
    for source, fmt, file, template in (
            ("labels", "caption", "labels.jsonl", "plain"), ("captions", "caption", "captions.jsonl", "plain"),
            ("instructions", "llava", "instructions.json", "mistral"), ("heldout", "llava", "heldout.json", "mistral")):
        stages.append(Stage(
            f"pack_{source}", f"solo-data pack: {file} ({fmt} format, {template} template)",
            _python("-m", "data_prep.cli", "pack", str(raw / file), "--format", fmt, "--template", template,
                    "--tokenizer", str(init_hf), "--seq-length", str(config.seq_length), "--output",
                    str(packed / source), "--workers", "2", "--no-progress", *budget.get(source, []))))
    init_mcore = out / "init_mcore"
    # Stage 1 starts from `solo create`'s weights, converted to megatron-core.
    stages.append(Stage("convert_init", "solo convert hf-to-mcore: the created model for megatron-core",
                        _python("-m", "solo.cli", "convert", "hf-to-mcore", "--hf", str(init_hf),
                                "--out", str(init_mcore))))
    previous = str(init_mcore)
    for number, stage in enumerate(config.stages, start=1):
        save = runs / f"stage{number}"
        stages.append(Stage(
            f"stage{number}", f"pretraining stage {number} on {stage.source} ({stage.iters} steps, megatron-core, "
                              f"{config.nproc} processes)",
            _torchrun(config.nproc, "-m", "megatron_patch.train", "--config", str(DEMO_RECIPE),
                      f"data.path={packed / stage.source}", f"data.seq_length={config.seq_length}",
                      f"data.global_batch_size={config.global_batch}", f"training.train_iters={stage.iters}",
                      f"optimizer.lr={stage.lr}", f"optimizer.min_lr={stage.lr / 10}",
                      f"optimizer.warmup_iters={stage.warmup}", f"training.seed={1234 + config.seed}",
                      f"checkpoint.save={save}", f"checkpoint.init_from={previous}",
                      f"model.image_attention={image_attention}", f"model.vision_positions={vision_positions}"),
            metrics=save / METRICS_FILE, steps=stage.iters))
        previous = str(save)
    stages.append(Stage(
        "eval_pretrain", "held-out accuracy of the stage-3 megatron-core checkpoint",
        _python("-m", "solo.demo.evaluate", "megatron", "--ckpt", previous, "--packed", str(packed / "heldout"),
                "--questions", str(raw / "heldout.json"), "--out", str(out / "eval_pretrain.json"))))
    export_hf = out / "export_hf"
    stages.append(Stage("export", "solo convert mcore-to-hf: stage 3 as a Hugging Face checkpoint",
                        _python("-m", "solo.cli", "convert", "mcore-to-hf", "--ckpt", previous, "--tokenizer",
                                str(init_hf), "--out", str(export_hf))))
    sft_save = runs / "sft"
    # fp32: the demo's model is tiny, and CPUs have no bf16 autocast worth using.
    launch = ["-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
              "--num_processes", str(config.nproc), "--mixed_precision", "no"]
    stages.append(Stage(
        "sft", f"instruction tuning (Accelerate, {config.nproc} processes, {config.sft_steps} steps)",
        _python(*launch, "-m", "solo.sft", "--config", SFT_RECIPE, f"model.path={export_hf}",
                f"data.path={packed / 'instructions'}", f"data.max_length={config.seq_length}", "training.epochs=1",
                f"training.samples_per_step={config.sft_samples_per_step}", f"training.max_steps={config.sft_steps}",
                f"training.lr={config.sft_lr}", f"training.min_lr={config.sft_lr / 10}", "training.warmup_steps=3",
                f"checkpoint.save={sft_save}"),
        metrics=sft_save / METRICS_FILE, steps=config.sft_steps,
        # accelerate runs its multi-process DDP config without CUDA only with this.
        cpu_env={"ACCELERATE_USE_CPU": "1"}))
    stages.append(Stage(
        "eval", "held-out accuracy of the instruction-tuned model (HF generate)",
        _python("-m", "solo.demo.evaluate", "hf", "--model", str(sft_save / "hf"), "--questions",
                str(raw / "heldout.json"), "--out", str(out / "eval.json"))))
    return stages


def _make_base(directory: Path, config: DemoConfig) -> None:
    """The tiny base LLM, shaped like the pretraining recipe's model (one source for both)."""
    from megatron_patch.config import Config
    from solo.recipe import load_recipe
    from solo.tiny import make_base_checkpoint

    model = load_recipe(Config, DEMO_RECIPE).model
    make_base_checkpoint(
        directory, hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_key_value_heads=model.num_query_groups,
        intermediate_size=model.ffn_hidden_size, sliding_window=model.sliding_window,
        vocab_size=config.base_vocab_size, seed=config.seed, extra_texts=vocabulary_texts())


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def _run_command(stage: Stage, log_path: Path) -> None:
    import torch

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    if not torch.cuda.is_available():
        env.update(stage.cpu_env)
    # Children import this checkout of the code, wherever the demo is started from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    echo = re.compile(stage.echo)
    follower = _MetricsFollower(stage) if stage.metrics is not None else None
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(stage.command)}\n")
        log.flush()
        process = subprocess.Popen(stage.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                   text=True, errors="replace", cwd=REPO_ROOT)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            log.flush()
            if echo.search(line):
                print(f"  {stage.name}: {line.strip()}", flush=True)
        code = process.wait()
    if follower is not None:
        follower.stop()
    if code != 0:
        raise StageFailed(f"exit code {code}")


class _MetricsFollower:
    """Prints one console line per step record that a training stage appends to its metrics.jsonl."""

    def __init__(self, stage: Stage, interval: float = 0.5):
        import threading

        self.stage, self.interval = stage, interval
        self.last_step, self.offset = 0, 0
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        path = self.stage.metrics
        if path is None or not path.exists():
            return
        if path.stat().st_size < self.offset:  # rewritten on resume (records after the checkpoint dropped)
            self.offset = 0
        with open(path, encoding="utf-8") as handle:
            handle.seek(self.offset)
            for line in handle:
                if not line.endswith("\n"):  # a record still being written
                    break
                self.offset += len(line.encode("utf-8"))
                record = json.loads(line)
                if record["step"] > self.last_step:
                    self.last_step = record["step"]
                    seconds = record.get("step_time_s")
                    print(f"  {self.stage.name}: step {record['step']}/{self.stage.steps} loss {record['loss']:.4f}"
                          + (f" ({seconds:.2f} s/step)" if seconds else ""), flush=True)

    def _follow(self) -> None:
        while not self.finished.wait(self.interval):
            self._poll()

    def stop(self) -> None:
        self.finished.set()
        self.thread.join()
        self._poll()  # the records written since the last poll


def _cpu_seconds() -> float:
    """CPU time used by this process and its finished children: unlike wall time, it does not grow
    when other jobs share the machine (on an otherwise idle machine, wall ~ CPU / busy cores)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


def _check_settings(out: Path, config: DemoConfig) -> None:
    """A rerun continues only the same demo: other settings in the same OUT would mix results."""
    path = out / "demo.json"
    wanted = json.loads(json.dumps(asdict(config)))
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != wanted:
            differing = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise SystemExit(
                f"solo demo: {out} holds a demo run with other settings ({', '.join(differing)} differ, e.g. "
                "--fast or --blank-images); use another --out, or delete that directory to start over")
    else:
        write_json_atomic(path, wanted)


def stage_names(config: DemoConfig = FULL) -> list[str]:
    return [stage.name for stage in build_stages(Path("OUT"), config)]


def run_demo(out: str | os.PathLike, config: DemoConfig, until: Optional[str] = None,
             compare: Optional[str | os.PathLike] = None) -> int:
    """Run (or continue) the demo in `out` up to and including stage `until` (default: all); the
    report sets the demo run in `compare` (another OUT) beside it."""
    out = Path(out).resolve()
    stages = build_stages(out, config)
    names = [stage.name for stage in stages]
    if until is not None and until not in names:
        raise SystemExit(f"solo demo: unknown stage {until!r} for --until; stages: {', '.join(names)}")
    if until is not None:
        stages = stages[:names.index(until) + 1]
    with output_lock(out, COMMAND):  # the whole run: a second demo on the same OUT is refused
        claim_output_dir(out, COMMAND)  # a new or empty OUT, or an earlier demo's: never another folder
        return _run_stages(out, stages, names, config, until, compare)


def _run_stages(out: Path, stages: list[Stage], names: list[str], config: DemoConfig, until: Optional[str],
                compare: Optional[str | os.PathLike]) -> int:
    from solo.demo.report import write_report

    _check_settings(out, config)
    for sub in ("logs", "done"):
        (out / sub).mkdir(exist_ok=True)
    rerun = f"{Path(sys.executable).name} -m solo.cli demo --out {out}" + (f" --until {until}" if until else "")
    start = time.perf_counter()
    code = 0
    try:
        for number, stage in enumerate(stages, start=1):
            marker = out / "done" / f"{stage.name}.json"
            prefix = f"[{number}/{len(stages)}] {stage.name}"
            if marker.exists():
                seconds = json.loads(marker.read_text(encoding="utf-8"))["seconds"]
                print(f"{prefix}: done earlier ({seconds:.0f} s), reused", flush=True)
                continue
            print(f"{prefix}: {stage.what}", flush=True)
            log_path = out / "logs" / f"{stage.name}.log"
            began, cpu_before = time.perf_counter(), _cpu_seconds()
            try:
                if stage.command is not None:
                    _run_command(stage, log_path)
                else:
                    stage.function()
            except Exception as error:  # any failure (StageFailed included): name the stage and how to go on
                print(f"\nsolo demo: stage '{stage.name}' failed ({error}).", file=sys.stderr)
                if stage.command is not None:
                    print(f"--- last lines of {log_path} ---\n{_tail(log_path)}---\n"
                          f"Full log: {log_path}", file=sys.stderr)
                print(f"Fix the cause and run the same command again ({rerun}): the {number - 1} finished "
                      "stages are reused.", file=sys.stderr)
                code = 1
                break
            seconds, cpu = time.perf_counter() - began, _cpu_seconds() - cpu_before
            write_json_atomic(marker, dict(stage=stage.name, seconds=seconds, cpu_seconds=cpu, command=stage.command))
            print(f"{prefix}: finished in {seconds:.0f} s ({cpu:.0f} CPU s)", flush=True)
    finally:
        report = write_report(out, compare)
        if report:
            print(f"report: {report}")
    timings = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in (out / "done").glob("*.json")}
    print("stage times, wall s (CPU s): " + ", ".join(
        f"{n} {timings[n]['seconds']:.0f} ({timings[n].get('cpu_seconds', 0):.0f})" for n in names if n in timings)
        + f"; this run {time.perf_counter() - start:.0f} s wall")
    results = [out / "eval.json", out / "eval_pretrain.json"]
    final = next((p for p in results if p.exists()), None)
    if final is not None and code == 0:
        from solo.demo.evaluate import accuracy_line

        result = json.loads(final.read_text(encoding="utf-8"))
        model = "instruction-tuned HF model" if final.name == "eval.json" else "pretrained megatron-core"
        print(f"held-out ({model}): {accuracy_line(result)}")
    return code
