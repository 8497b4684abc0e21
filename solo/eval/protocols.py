"""Evaluation protocols: for each benchmark, the prompt, generation length, answer parsing and
aggregation of one reference, so that a number can be put next to the ones that reference publishes.

Each protocol reproduces:

``official``
    the benchmark authors' scorer: MME's ``eval_tool/calculation.py`` (MME's release), MMStar's
    ``eval/vlmeval/evaluate/mmstar.py`` (MMStar-Benchmark/MMStar 79e6d1cb), LLaVA's
    ``llava/eval/eval_science_qa.py`` (haotian-liu/LLaVA c121f043) for ScienceQA, MathVista's
    ``evaluation/`` (lupantech/MathVista 53d52587), and SEED-Bench's likelihood ranking
    (``--mode likelihood`` only)
``lmms-eval``
    lmms-eval 0.7.3's task folders (``lmms_eval/tasks/<task>/``): prompts, ``max_new_tokens`` and
    ``until``, ``process_results`` and aggregation
``vlmevalkit``
    VLMEvalKit at commit e8e78f05 (2026-08-18): ``ImageMCQDataset``/``ImageYORNDataset.build_prompt``,
    the ``exact_matching`` path of ``evaluate`` (``can_infer``, ``YOrN_Extraction``; no LLM judge),
    ``report_acc`` and ``MME_rating``; generation length of its LLaVA wrappers (``max_new_tokens=2048``)

A protocol a benchmark has no reference for is refused by name (AI2D has no authors' scorer for
generated answers; SEED-Bench's authors rank options by likelihood; MathVista's toolkit ports need
an LLM judge). ``mc`` (your own questions) has no authors either: its ``official`` protocol is this
project's default, the LLaVA-style prompt with VLMEvalKit's matching rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

from solo.eval import mathvista, scoring
from solo.eval.benchmarks import BENCHMARKS, question_without_options
from solo.eval.samples import EvalDataError, Sample

PROTOCOL_NAMES = ("official", "lmms-eval", "vlmevalkit")
LMMS_EVAL = "lmms-eval 0.7.3"
VLMEVALKIT = "VLMEvalKit e8e78f05f3080fe28154f2130321f17951c3be94, exact_matching (no LLM judge)"
# lmms-eval tasks that set no max_new_tokens leave it to the model: the SOLO adapter's default.
LMMS_MODEL_MAX_NEW_TOKENS = 128
LMMS_UNTIL = ("\n\n",)  # lmms-eval's default `until` (the few-shot delimiter) when a task names none
VLMEVAL_MAX_NEW_TOKENS = 2048  # VLMEvalKit's LLaVA wrappers (vlmeval/vlm/llava/llava.py)
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Protocol:
    """How one reference asks a benchmark's questions and scores the answers."""

    name: str
    reference: str  # what it reproduces, with the version
    prompt: Callable[[Sample], str] | None  # None: no generation rule (likelihood only)
    parse: Callable[[str, Sample], str | None] | None  # model text → the answer label, or None
    score: Callable[[list[dict]], dict]  # prediction records → metrics
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()  # the answer is cut at the first of these (lmms-eval's `until`)

    def finish(self, text: str) -> str:
        """A generated answer as the reference reads it: cut at the first stop string."""
        return truncate(text, self.stop)


def truncate(text: str, stops: Sequence[str] | str | None) -> str:
    """Cut ``text`` at the first of the ``stops`` strings (lmms-eval's ``until``), in their order."""
    for stop in [stops] if isinstance(stops, str) else stops or ():
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


# --- prompts -------------------------------------------------------------------------------------

def _lettered(options: Sequence[str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in zip(scoring.LETTERS, options))


def llava_prompt(sample: Sample) -> str:
    """LLaVA's and lmms-eval's form: ``[Context: <hint>\\n]<question>\\nA. …\\nB. …\\n<instruction>``;
    MMStar's questions list their options already and get only the instruction."""
    context = f"Context: {sample.hint}\n" if sample.hint else ""
    if sample.question != question_without_options(sample.question):
        return f"{context}{sample.question}\n{LETTER_INSTRUCTION}"
    return f"{context}{sample.question}\n{_lettered(sample.options)}\n{LETTER_INSTRUCTION}"


def vlmeval_prompt(sample: Sample) -> str:
    """VLMEvalKit's ``ImageMCQDataset.build_prompt``."""
    hint = f"Hint: {sample.hint}\n" if sample.hint else ""
    return (f"{hint}Question: {question_without_options(sample.question)}\nOptions:\n{_lettered(sample.options)}\n"
            "Please select the correct answer from the options above. \n")


def _as_released(sample: Sample) -> str:
    return sample.question


_MME_INSTRUCTION = " Please answer yes or no."


def _mme_lmms_prompt(sample: Sample) -> str:
    """lmms-eval's MME: the released instruction replaced by its post_prompt."""
    question = sample.question.strip().replace(_MME_INSTRUCTION, "")
    return question + "\nAnswer the question using a single word or phrase."


def _mmstar_lmms_prompt(sample: Sample) -> str:
    return sample.question.strip() + "\nAnswer with the option's letter from the given choices directly"  # no period


# --- parsing and scores --------------------------------------------------------------------------

def _on_options(rule: Callable[[str, Sequence[str]], str | None]) -> Callable[[str, Sample], str | None]:
    return lambda text, sample: rule(text, sample.options)


def _on_text(rule: Callable[[str], str | None]) -> Callable[[str, Sample], str | None]:
    return lambda text, sample: rule(text)


def _mme(per_image_average: bool = False) -> Callable[[list[dict]], dict]:
    def score(records: list[dict]) -> dict:
        for record in records:
            record.setdefault("subtask", (record.get("groups") or {}).get("subtask"))
        return scoring.mme_scores(records, per_image_average=per_image_average)
    return score


def _mc(name: str, reference: str, prompt, rule, max_new_tokens: int, stop=(), score=scoring.multiple_choice_scores):
    return Protocol(name, reference, prompt, _on_options(rule), score, max_new_tokens, tuple(stop))


def _vlmeval_mc() -> Protocol:
    return _mc("vlmevalkit", VLMEVALKIT, vlmeval_prompt, scoring.parse_letter_vlmevalkit, VLMEVAL_MAX_NEW_TOKENS)


PROTOCOLS: dict[str, dict[str, Protocol]] = {
    "mme": {
        "official": Protocol("official", "MME eval_tool calculation.py", _as_released,
                             _on_text(scoring.parse_yes_no), _mme()),
        "lmms-eval": Protocol("lmms-eval", LMMS_EVAL, _mme_lmms_prompt, _on_text(scoring.parse_yes_no_lmms),
                              _mme(per_image_average=True), 16, LMMS_UNTIL),
        "vlmevalkit": Protocol("vlmevalkit", VLMEVALKIT, _as_released, _on_text(scoring.parse_yes_no_vlmevalkit),
                               _mme(), VLMEVAL_MAX_NEW_TOKENS),
    },
    "mmstar": {
        "official": _mc("official", "MMStar eval/vlmeval/evaluate/mmstar.py (MMStar-Benchmark/MMStar 79e6d1cb)",
                        llava_prompt, scoring.parse_letter_mmstar, 32),
        "lmms-eval": _mc("lmms-eval", LMMS_EVAL, _mmstar_lmms_prompt, scoring.parse_letter_lmms_mcq,
                         LMMS_MODEL_MAX_NEW_TOKENS, LMMS_UNTIL, scoring.mmstar_l2_average_scores),
        "vlmevalkit": _vlmeval_mc(),
    },
    "scienceqa": {
        "official": _mc("official", "LLaVA llava/eval/eval_science_qa.py (haotian-liu/LLaVA c121f043)",
                        llava_prompt, scoring.parse_letter_llava_sqa, 1024),
        "lmms-eval": _mc("lmms-eval", LMMS_EVAL, llava_prompt, scoring.parse_letter_sqa_lmms, 16, LMMS_UNTIL),
        "vlmevalkit": _vlmeval_mc(),
    },
    "ai2d": {  # no authors' scorer: VLMEvalKit's first, the default
        "vlmevalkit": _vlmeval_mc(),
        "lmms-eval": _mc("lmms-eval", LMMS_EVAL, llava_prompt, scoring.parse_letter_ai2d_lmms, 16, LMMS_UNTIL),
    },
    "seedbench": {
        "official": Protocol("official", "SEED-Bench's answer ranking by likelihood", None, None,
                             scoring.multiple_choice_scores),
        "lmms-eval": _mc("lmms-eval", LMMS_EVAL, llava_prompt, scoring.parse_letter_first_char,
                         LMMS_MODEL_MAX_NEW_TOKENS, ("ASSISTANT:",)),
        "vlmevalkit": _vlmeval_mc(),
    },
    "mathvista": {
        "official": Protocol("official", "MathVista evaluation/ (lupantech/MathVista 53d52587), rule-based extraction",
                             _as_released, mathvista.parse_rule(), scoring.multiple_choice_scores,
                             mathvista.MAX_NEW_TOKENS),
    },
    "mc": {
        "official": _mc("official", "solo: LLaVA-style prompt, VLMEvalKit's exact matching", llava_prompt,
                        scoring.parse_letter_vlmevalkit, 32),
        "vlmevalkit": _vlmeval_mc(),
    },
}

_NO_REFERENCE = {
    ("ai2d", "official"): "AI2D's authors publish no scorer for generated answers",
    ("mc", "lmms-eval"): "lmms-eval has no task for your own multiple-choice file",
    ("mathvista", "lmms-eval"): "lmms-eval 0.7.3 extracts MathVista answers with a GPT judge only",
    ("mathvista", "vlmevalkit"): "VLMEvalKit extracts MathVista answers with an LLM judge",
}


def default_protocol(benchmark: str, mode: str = "generate") -> str:
    """``official`` where the benchmark has it for ``mode``; else the first reference that does."""
    for name, protocol in PROTOCOLS[benchmark].items():
        if mode == "likelihood" or protocol.parse is not None:
            return name
    raise AssertionError(f"{benchmark} has no protocol for {mode}")


def resolve_protocol(benchmark: str, name: str | None, mode: str = "generate",
                     extractor_url: str | None = None) -> Protocol:
    """The protocol ``name`` of ``benchmark`` (None: its default); EvalDataError naming the ones it has.
    ``extractor_url`` (MathVista only): an OpenAI-compatible endpoint that extracts the answers."""
    if benchmark not in PROTOCOLS:
        raise EvalDataError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if mode == "likelihood" and not BENCHMARKS[benchmark].likelihood:
        raise EvalDataError(f"{benchmark} has free-form answers: there are no options to rank; use --mode generate")
    name = name or default_protocol(benchmark, mode)
    protocols = PROTOCOLS[benchmark]
    usable = [n for n, p in protocols.items() if mode == "likelihood" or p.parse is not None]
    protocol = protocols.get(name)
    if protocol is None or name not in usable:
        why = _NO_REFERENCE.get((benchmark, name))
        if protocol is not None:
            why = f"{protocol.reference}: no rule reads generated answers; `solo eval --mode likelihood` ranks them"
        elif name not in PROTOCOL_NAMES:
            why = "unknown protocol"
        raise EvalDataError(f"--protocol {name} is not available for {benchmark} in {mode} mode ({why}); "
                            f"choose one of: {', '.join(usable)}")
    if extractor_url:
        if benchmark != "mathvista":
            raise EvalDataError(f"--extractor-url is for MathVista's answer extraction, not {benchmark}")
        protocol = replace(protocol, parse=mathvista.parse_rule(mathvista.Extractor(extractor_url)),
                           reference=protocol.reference.replace("rule-based", f"extracted by {extractor_url}"))
    return protocol
