"""`solo eval`: score a SOLO checkpoint on MME, MMStar, ScienceQA (image), AI2D, SEED-Bench (image)
or a user's own multiple-choice JSONL, from local files, with each benchmark's scoring rule.

Modules: `samples` (the sample record, generic file readers), `benchmarks` (per-benchmark readers,
prompts and rules), `scoring` (answer parsing and metrics), `runner` (generation / likelihood,
data parallel, resume, outputs).
"""

from solo.eval.benchmarks import BENCHMARKS, load_samples
from solo.eval.samples import EvalDataError, Sample

# The runner (torch, transformers) is imported from solo.eval.runner where it is used, so that
# reading benchmarks and `solo --help` stay light.
__all__ = ["BENCHMARKS", "EvalDataError", "Sample", "load_samples"]
