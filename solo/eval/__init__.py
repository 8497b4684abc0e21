"""`solo eval`: score a SOLO checkpoint on MME, MMStar, ScienceQA (image), AI2D, SEED-Bench (image),
MathVista (testmini) or a user's own multiple-choice JSONL, from local files, under the protocol of
a chosen reference (`official`, `lmms-eval`, `vlmevalkit`); `solo eval score` scores answers made
elsewhere with the same code.

Modules: `samples` (the sample record, generic file readers), `benchmarks` (per-benchmark readers,
likelihood-mode questions), `mathvista` (its reader, answer extraction and normalisation),
`scoring` (answer parsing and aggregation rules), `protocols` (which prompt, length, rule and
aggregation each reference uses), `score` (answers → records → results.json; `solo eval score`),
`runner` (generation / likelihood, data parallel, resume, outputs).
"""

from solo.eval.benchmarks import BENCHMARKS, load_samples
from solo.eval.samples import EvalDataError, Sample

# The runner (torch, transformers) is imported from solo.eval.runner where it is used, so that
# reading benchmarks and `solo --help` stay light.
__all__ = ["BENCHMARKS", "EvalDataError", "Sample", "load_samples"]
