"""The final export: the fine-tuned model in the foundation's Hugging Face layout (safetensors
weights, config, tokenizer, processor with the chat template, `trust_remote_code` files), loadable
by `AutoModelForCausalLM` / `AutoProcessor` and ready for `generate`. ZeRO-3 parameters are
gathered for it. The directory (`SAVE/hf`) appears atomically.
"""

from __future__ import annotations

import os

from solo.outputs import atomic_output_dir

EXPORT_DIR = "hf"
COMMAND = "python -m solo.sft"


def export_hf(accelerator, model, cfg) -> str:
    """Write `checkpoint.save/hf` (every rank must call it: ZeRO-3 gathers the weights collectively)."""
    from transformers import AutoTokenizer

    from solo.hf import SoloImageProcessor, SoloProcessor

    state_dict = accelerator.get_state_dict(model)  # gathered on the main process under ZeRO-3
    out = os.path.join(cfg.checkpoint.save, EXPORT_DIR)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True  # ready for generation
        with atomic_output_dir(out, command=COMMAND, inputs=[cfg.model.path], overwrite=True) as staging:
            unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
            # This package's processor classes (not the base checkpoint's remote-code copies), with its settings.
            processor = SoloProcessor(SoloImageProcessor.from_pretrained(cfg.model.path),
                                      AutoTokenizer.from_pretrained(cfg.model.path))
            processor.save_pretrained(staging)
    accelerator.wait_for_everyone()
    return out
