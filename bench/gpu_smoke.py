"""The GPU check's first step (bench/gpu_check.sh): does the toolchain work at all? About ten seconds.

    python bench/gpu_smoke.py --out smoke.json [--dry-run]

Three steps, each timed: a bf16 matrix product on the GPU (against fp32), ``torch.compile`` of a
tiny function (Inductor and Triton), and one forward and backward of the project's compiled flex
attention under a document + sliding-window block mask (``document_mask_params``), against the
same attention computed densely. The first step that fails ends the smoke with ONE line naming
it and the error (exit 3), so that a broken toolchain is not met again as a cascade of failing
tests. ``--dry-run`` (no GPU): the steps are reported skipped once the modules they use import.
The JSON (``--out``) is written in every case.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul() -> str:
    import torch

    a, b = (torch.randn(2048, 2048, device="cuda") for _ in range(2))
    got = (a.bfloat16() @ b.bfloat16()).float()
    error = ((got - a @ b).norm() / (a @ b).norm()).item()
    if not error < 1e-2:
        raise RuntimeError(f"bf16 product off by {error:.2e} (relative) from fp32")
    return f"relative error {error:.1e}"


def compile_tiny() -> str:
    import torch

    fn = torch.compile(lambda x: torch.nn.functional.silu(x) * x + 1.0)
    x = torch.randn(4096, device="cuda")
    if not torch.allclose(fn(x), torch.nn.functional.silu(x) * x + 1.0, atol=1e-5):
        raise RuntimeError("the compiled function computes something else than eager")
    return "ok"


def flex() -> str:
    import torch

    from megatron_patch.model.attention import _flex_attention, document_mask_params

    lengths, window, heads, groups, dim = [300, 100, 112], 128, 4, 2, 64  # one document past the window
    total = sum(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    params = document_mask_params(cu, total, window)
    q, k, v = (torch.randn(1, h, total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, groups, groups))
    out = _flex_attention()(q, k, v, block_mask=params.block_mask, enable_gqa=True)
    out.float().square().sum().backward()
    # The same attention, dense, in fp32.
    pos = torch.arange(total, device="cuda")
    doc = torch.repeat_interleave(torch.arange(3, device="cuda"), torch.tensor(lengths, device="cuda"))
    delta = pos[:, None] - pos[None, :]
    allowed = (doc[:, None] == doc[None, :]) & (delta >= 0) & (delta <= window)
    kk, vv = (x.detach().float().repeat_interleave(heads // groups, dim=1) for x in (k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(q.detach().float(), kk, vv, attn_mask=allowed)
    error = ((out.float() - expected).norm() / expected.norm()).item()
    if not error < 2e-2 or not torch.isfinite(q.grad).all():
        raise RuntimeError(f"flex attention off by {error:.2e} (relative) or its gradient is not finite")
    return f"relative error {error:.1e}"


def imports() -> str:
    import torch.nn.attention.flex_attention  # noqa: F401

    import megatron_patch.model.layer_specs  # noqa: F401

    return "flex attention and the model's layer specs import"


STEPS = {"matmul": matmul, "compile": compile_tiny, "flex": flex}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON with each step's status, seconds and detail")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: import what the steps use, run none")
    args = ap.parse_args()
    report = {"ok": True, "steps": {}}
    code = 0
    for name, step in ({"imports": imports} if args.dry_run else STEPS).items():
        start = time.perf_counter()
        try:
            detail = step()
        except Exception as exc:  # any failure here is the one line this step exists to print
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            report["steps"][name] = {"status": "failed", "seconds": time.perf_counter() - start,
                                     "error": f"{type(exc).__name__}: {first}"}
            report["ok"] = False
            print(f"gpu_check: smoke step '{name}' failed: {type(exc).__name__}: {first}", flush=True)
            code = 3
            break
        report["steps"][name] = {"status": "ok", "seconds": round(time.perf_counter() - start, 2), "detail": detail}
        print(f"gpu_check: smoke {name}: {detail} ({report['steps'][name]['seconds']} s)", flush=True)
    if args.dry_run and code == 0:
        report["steps"].update({name: {"status": "skipped", "detail": "no CUDA (dry run)"} for name in STEPS})
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())
