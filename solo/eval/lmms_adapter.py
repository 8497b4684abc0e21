"""lmms-eval model adapter: run any lmms-eval task on a SOLO checkpoint.

    pip install -e ".[lmms]"        # lmms-eval 0.7.3 (an optional extra)
    python -m lmms_eval --model solo --model_args pretrained=CKPT --batch_size 8 --tasks TASK [--include_path DIR]

The model is registered with lmms-eval through the ``lmms_eval.models`` entry point (``setup.py``).
It answers with the same code as `solo eval` (``solo.eval.runner``): the checkpoint's chat template
with the images first in the user turn, batched greedy generation with left padding and the KV
cache, and reply log-likelihoods for lmms-eval's ``loglikelihood`` tasks. Data parallel under
``accelerate launch`` / ``torchrun`` like `solo eval` (lmms-eval shards the requests by rank).
Sampling settings (temperature > 0) are not supported: answers are always greedy.
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from solo.eval.protocols import LMMS_MODEL_MAX_NEW_TOKENS, truncate
from solo.eval.runner import distributed_state, generate_answers, load_model, score_replies

class SoloLmms(lmms):
    """A SOLO checkpoint as an lmms-eval "simple" model (``--model solo``)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``pretrained`` from ``--model_args``; ``batch_size`` and ``device`` from lmms-eval's own flags
        (``max_batch_size``, for automatic batch sizes, is not used: the batch size is fixed)."""
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown --model_args for solo: {sorted(kwargs)}; use pretrained=DIR")
        state = distributed_state()
        self._rank, self._world_size = state.process_index, state.num_processes
        self.batch_size = int(batch_size)
        # A device given to a single process is honoured; data-parallel ranks use their own device.
        target = torch.device(device) if device and state.num_processes == 1 else state.device
        self.model, self.processor = load_model(pretrained, target)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        return [visual.convert("RGB") if hasattr(visual, "convert") else visual for visual in visuals or []]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [request.args for request in requests[start : start + self.batch_size]]
            # One generate call per distinct generation setting (lmms-eval may mix tasks in a list).
            by_settings: dict[str, list[int]] = {}
            for index, (_, settings, *_rest) in enumerate(chunk):
                by_settings.setdefault(repr(sorted(settings.items())), []).append(index)
            texts: dict[int, str] = {}
            for indices in by_settings.values():
                settings = chunk[indices[0]][1]
                if float(settings.get("temperature", 0) or 0) > 0 or settings.get("do_sample"):
                    raise ValueError("the SOLO adapter decodes greedily; set temperature 0 / do_sample False")
                prompts = [chunk[i][0] for i in indices]
                visuals = [self._visuals(*chunk[i][2:]) for i in indices]
                limit = int(settings.get("max_new_tokens", LMMS_MODEL_MAX_NEW_TOKENS))
                for i, text in zip(indices, generate_answers(self.model, self.processor, prompts, visuals, limit)):
                    texts[i] = truncate(text, settings.get("until"))
            for index, (context, settings, *_rest) in enumerate(chunk):
                self.cache_hook.add_partial("generate_until", (context, settings), texts[index])
                answers.append(texts[index])
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [request.args for request in requests[start : start + self.batch_size]]
            prompts, visuals, replies = [], [], []
            for context, target, doc_to_visual, doc_id, task, split in chunk:
                prompts.append(context)
                replies.append(target if isinstance(target, str) else target(self.task_dict[task][split][doc_id]))
                visuals.append(self._visuals(doc_to_visual, doc_id, task, split))
            for total, _, greedy in score_replies(self.model, self.processor, prompts, visuals, replies):
                results.append((total, greedy))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the SOLO adapter does not run lmms-eval's multi-round tasks")


def lmms_eval_manifest() -> ModelManifest:
    """The ``lmms_eval.models`` entry point: ``--model solo``."""
    return ModelManifest(model_id="solo", simple_class_path="solo.eval.lmms_adapter.SoloLmms")
