"""Conversion benchmark: peak resident memory and throughput of `solo convert`, both directions.

Writes a random SOLO model of a few hundred MB (bf16 by default) in Hugging Face layout, then runs
`hf-to-mcore` and `mcore-to-hf` each in a fresh process and prints, per direction:

* peak RSS / model bytes, where peak RSS is the conversion's growth over the process's RSS after
  its imports (torch + transformers + megatron-core alone take several hundred MB, which do not
  grow with the model). Goal <= 1.3; holding two full copies of the model would be 2.0. The peak
  of the largest helper process (megatron-core's checkpoint writer) is printed too;
* MB/s of model bytes converted (wall clock, imports excluded).

The round trip is also checked bitwise.

    python bench/bench_convert.py [--hidden 1024 --layers 8 --ffn 2816 --dtype bfloat16]
    python bench/bench_convert.py --hidden 4096 --layers 32 --ffn 14336   # the real 7B shape (~14.5 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time
import torch
from megatron_patch.convert import convert_hf_to_mcore, convert_mcore_to_hf

def rss_bytes():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

direction, src, out = sys.argv[1:4]
# Warm the lazily imported modules so that the baseline includes them.
import megatron.core.dist_checkpointing, torch.distributed.checkpoint, transformers, safetensors.torch  # noqa
from solo.hf import SoloForCausalLM  # noqa
baseline = rss_bytes()
start = time.perf_counter()
if direction == "hf-to-mcore":
    convert_hf_to_mcore(src, out)
else:
    convert_mcore_to_hf(src, out)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
helpers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # dist-ckpt writer processes
print(json.dumps({"baseline": baseline, "peak": peak, "helpers": helpers, "seconds": seconds}))
"""


def write_model(directory: str, hidden: int, layers: int, ffn: int, dtype: str) -> int:
    """A random SOLO checkpoint (config, tokenizer, processor, sharded safetensors); returns its bytes."""
    import torch

    from solo.hf import SoloConfig
    from solo.hf_checkpoint import ShardWriter, write_config, write_processor
    from solo.tiny import make_base_tokenizer
    from solo.tokenizer import extend_tokenizer

    os.makedirs(directory)
    tokenizer_dir = os.path.join(directory, "tok")
    extend_tokenizer(make_base_tokenizer()).save_pretrained(tokenizer_dir)
    vocab = len(write_processor(tokenizer_dir, directory, "native"))
    heads, groups = hidden // 128, max(1, hidden // 512)
    config = SoloConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=groups, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype=dtype)
    write_config(config.to_dict(), directory, "native")
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(0)
    writer = ShardWriter(directory, max_bytes=128 * 1024**2)
    head_dim = hidden // heads

    def add(name, *shape):
        writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(torch_dtype))

    add("model.embed_tokens.weight", vocab, hidden)
    add("model.embed_vision_patch.weight", hidden, 3072)
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", hidden)
        add(p + "post_attention_layernorm.weight", hidden)
        add(p + "self_attn.q_proj.weight", hidden, hidden)
        add(p + "self_attn.k_proj.weight", groups * head_dim, hidden)
        add(p + "self_attn.v_proj.weight", groups * head_dim, hidden)
        add(p + "self_attn.o_proj.weight", hidden, hidden)
        add(p + "mlp.gate_proj.weight", ffn, hidden)
        add(p + "mlp.up_proj.weight", ffn, hidden)
        add(p + "mlp.down_proj.weight", hidden, ffn)
    add("model.norm.weight", hidden)
    add("lm_head.weight", vocab, hidden)
    writer.finish()
    return writer.total_bytes


def run_child(direction: str, src: str, out: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", CHILD, direction, src, out], env=env, cwd=repo,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{direction} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        hf = os.path.join(root, "hf")
        model_bytes = write_model(hf, args.hidden, args.layers, args.ffn, args.dtype)
        print(f"model: {model_bytes / 1e6:.0f} MB ({args.dtype}, hidden {args.hidden}, {args.layers} layers)")
        results = {}
        for direction, src, out in (("hf-to-mcore", hf, os.path.join(root, "mcore")),
                                    ("mcore-to-hf", os.path.join(root, "mcore"), os.path.join(root, "back"))):
            r = run_child(direction, src, out)
            ratio = (r["peak"] - r["baseline"]) / model_bytes
            results[direction] = ratio
            print(f"{direction}: peak RSS / model bytes = {ratio:.2f} (goal <= 1.3; baseline after imports "
                  f"{r['baseline'] / 1e6:.0f} MB, peak {r['peak'] / 1e6:.0f} MB; largest helper process "
                  f"{r['helpers'] / 1e6:.0f} MB), "
                  f"{model_bytes / 1e6 / r['seconds']:.0f} MB/s ({r['seconds']:.1f} s)")
        from safetensors import safe_open

        def locations(directory):  # tensor name -> its shard (tensors are compared one at a time:
            names = {}              # two copies of a 7B model would not fit in memory)
            for name in sorted(os.listdir(directory)):
                if name.endswith(".safetensors"):
                    with safe_open(os.path.join(directory, name), "pt") as fh:
                        names.update({key: os.path.join(directory, name) for key in fh.keys()})
            return names

        def tensor(path, key):
            with safe_open(path, "pt") as fh:
                return fh.get_tensor(key)

        a, b = locations(hf), locations(os.path.join(root, "back"))
        same = a.keys() == b.keys()
        for key in sorted(a) if same else []:
            x, y = tensor(a[key], key), tensor(b[key], key)
            same = x.dtype == y.dtype and x.shape == y.shape and bool((x == y).all())
            if not same:
                break
        print(f"round trip bitwise identical: {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - start:.0f} s")
