"""SoloGPTModel: megatron-core's GPTModel plus SOLO's patch projection, by composition.

Reading order: the config builder (Mistral/Llama choices), then the model. The model owns a
``GPTModel`` (``language_model``) and, on the FIRST pipeline stage only, the 3072 -> hidden patch
projection. It computes the input embeddings itself (token embedding, plus ``W . normalise(patch)``
at every ``<vpatch>`` position) and hands them to ``GPTModel`` as ``decoder_input``, the way
Megatron-LM's LLaVA model composes GPTModel.

Parameter names and the HF names they map to: ``state_dict_mapping.MAPPINGS`` (the one table).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from solo.hf.image_processing_solo import PATCH_DIM, normalize_patches
from solo.hf.native_vision import check_switches, image_block_ids, is_native, rope_section_positions

from megatron_patch.model.attention import DocumentRotaryEmbedding, _window_left, document_mask_params
from megatron_patch.model.layer_specs import resolve_backend, uses_flex_attention, uses_packed_attention

if TYPE_CHECKING:
    from megatron_patch.config import ModelConfig, ParallelConfig, TrainingConfig


def have_wgrad_accumulation_kernel() -> bool:
    """Whether apex's fused weight-gradient accumulation kernel is installed: megatron-core's own
    linears (patch projection, output layer, all of the flex/local spec) need it for
    ``gradient_accumulation_fusion``; without it the flag would make them raise."""
    import importlib.util

    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def build_transformer_config(
    model: "ModelConfig", parallel: "ParallelConfig", training: "TrainingConfig"
) -> TransformerConfig:
    """Mistral/Llama architecture on megatron-core: RMSNorm, SwiGLU, GQA, RoPE, no biases."""
    on_gpu = torch.cuda.is_available()
    backend = resolve_backend(model.backend)
    # Fused RoPE matters most: megatron's unfused THD RoPE splits by cu_seqlens on the host in
    # every layer. It needs TE's THD kernel, so only the TE backend uses it (flex applies per-token
    # frequencies instead). The SwiGLU fusion is megatron's own jit kernel: any GPU.
    dtype = torch.bfloat16 if training.bf16 else torch.float32
    recompute = {}  # "none" (training.recompute is one of its Literal choices: the loader checks)
    if training.recompute == "full":
        recompute = dict(
            recompute_granularity="full",
            recompute_method=training.recompute_method,
            recompute_num_layers=training.recompute_num_layers,
        )
    elif training.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    window = None
    if model.sliding_window is not None:
        # SOLO-7B's semantics (its Megatron run passed flash-attn window_size=(W, W) under a causal
        # mask): a query sees itself and W earlier tokens. TE's convention: (left, right) keys.
        window = (model.sliding_window, 0)
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        window_size=window,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=training.bf16,
        calculate_per_token_loss=True,
        # CPU: no fused kernels (they need TE/apex/CUDA); TP shards seed-identical to TP=1.
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=on_gpu and have_wgrad_accumulation_kernel(),
        masked_softmax_fusion=False,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=False,
        apply_rope_fusion=on_gpu and backend == "te",
        persist_layer_norm=False,
        # megatron-core's vocab-parallel fused cross-entropy ("native": its own jit kernel), in bf16
        # runs only: it rounds the logits' gradient to bf16, ~1e-3 off in an fp32 run.
        cross_entropy_loss_fusion=on_gpu and training.bf16,
        batch_p2p_comm=True,
        batch_p2p_sync=on_gpu,
        **recompute,
    )


class SoloGPTModel(MegatronModule):
    """Decoder-only SOLO model: GPTModel + a patch projection on the first pipeline stage.

    forward() takes one packed row per call (``[1, t]`` tensors, THD ``packed_seq_params``), the
    ``patches`` referenced by that row (uint8 ``[N, 3072]``) and ``vision_patch_indices`` (``[1, t]``,
    -1 where the token is not a patch, else the row into ``patches``).

    ``image_attention`` / ``vision_positions`` are the native-VLM switches (``solo.hf.native_vision``;
    SOLO's ``causal`` / ``sequential`` by default). Non-default, forward() also takes the row's
    ``image_layout`` (int64 ``[n_images, 3]``: offset of ``<vision>``, rows, cols, as the packer
    records them) and runs on the flex or local backend (Transformer Engine cannot express them).
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        vocab_size: int,
        max_sequence_length: int,
        rotary_base: float,
        pre_process: bool = True,
        post_process: bool = True,
        patch_dim: int = PATCH_DIM,
        real_vocab_size: Optional[int] = None,
        image_attention: str = "causal",
        vision_positions: str = "sequential",
    ):
        super().__init__(config=config)
        check_switches(image_attention, vision_positions, where="model.")
        self.image_attention, self.vision_positions = image_attention, vision_positions
        self.native = is_native(image_attention, vision_positions)
        self.pre_process = pre_process
        self.post_process = post_process
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False
        self.language_model = GPTModel(
            config=config,
            transformer_layer_spec=transformer_layer_spec,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            # A float, as given: megatron-core's RotaryEmbedding computes base ** (2i / dim) in float32
            # either way, and int() would turn a theta of 100.9 into 100 (HF keeps 100.9).
            rotary_base=float(rotary_base),
            # Patches are added to the full-sequence embeddings first, then scattered (below).
            scatter_embedding_sequence_parallel=False,
        )
        # flex backend (and the native switches): RoPE positions per token, restarting per document.
        self.flex_attention = uses_flex_attention(transformer_layer_spec)
        if self.native and not (self.flex_attention or uses_packed_attention(transformer_layer_spec)):
            from megatron_patch.config import native_backend_message

            raise ValueError(native_backend_message(image_attention, vision_positions))
        if self.flex_attention or self.native:
            self.language_model.rotary_pos_emb = DocumentRotaryEmbedding(self.language_model.rotary_pos_emb)
            self.window_left = _window_left(config)
        if post_process and real_vocab_size is not None and real_vocab_size < vocab_size:
            self._mask_padded_vocabulary(real_vocab_size)
        if pre_process:
            # Split along the output (hidden) dim under TP, gathered before the add: each rank
            # holds a 3072 x hidden/TP shard, like SOLO's Megatron layer.
            self.vision_patch_projection = tensor_parallel.ColumnParallelLinear(
                patch_dim,
                config.hidden_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=True,
                skip_bias_add=True,
            )
            # Its input is the micro-batch's patches, not a sequence-sharded activation.
            self.vision_patch_projection.sequence_parallel = False

    def _mask_padded_vocabulary(self, real_vocab_size: int) -> None:
        """Keep the TP padding rows of the LM head out of the loss's softmax.

        Padding rows exist only so TP shards are equal; no token has their id. Left in the softmax
        they would change the loss (a zero row still gives logit 0) and be trained, so the model
        would compute a different function from the exported (trimmed) HF model.
        """
        lm = self.language_model
        local = lm.output_layer.weight.shape[0]  # this TP rank's vocabulary columns
        first = parallel_state.get_tensor_model_parallel_rank() * local
        padded_from = max(real_vocab_size - first, 0)
        if padded_from >= local:
            return
        compute_loss = lm.compute_language_model_loss

        def masked_loss(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            # In place: the output layer's backward needs its input and weight, not its output.
            logits[..., padded_from:].fill_(torch.finfo(logits.dtype).min)
            return compute_loss(labels, logits)

        lm.compute_language_model_loss = masked_loss

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages > 0 receive their input through this hook (schedules call it)."""
        self.language_model.set_input_tensor(input_tensor)

    def embed(
        self,
        input_ids: torch.Tensor,
        patches: Optional[torch.Tensor],
        vision_patch_indices: Optional[torch.Tensor],
        patch_positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """[b, s] ids -> [s, b, h] embeddings; E[<vpatch>] + W . normalise(patch) at patch positions
        (sequence-parallel: scattered along s after the patches are in).

        The projection runs on every micro-batch, with zero rows when it has no image: under
        overlapped gradient reduction a parameter that skips a micro-batch leaves its DDP bucket
        unreduced, and text-only packs are common."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        embeddings = self._add_patches(embeddings, input_ids, patches, vision_patch_indices, patch_positions)
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def _add_patches(self, embeddings, input_ids, patches, vision_patch_indices, patch_positions) -> torch.Tensor:
        weight = self.vision_patch_projection.weight
        if patches is None:
            patches = torch.zeros(0, weight.shape[1], dtype=torch.uint8, device=weight.device)
        pixels = normalize_patches(patches, dtype=weight.dtype)
        projected, _ = self.vision_patch_projection(pixels)  # [N, h]
        if patches.shape[0] == 0:
            # Nothing to place; adding 0 x output keeps the projection in the graph (zero gradient).
            return embeddings + projected.sum() * 0
        if vision_patch_indices is None or vision_patch_indices.shape != input_ids.shape:
            raise ValueError("vision_patch_indices must be given with the shape of input_ids")
        index = vision_patch_indices.transpose(0, 1)  # [s, b], like the embeddings
        if patch_positions is not None:
            # Flat [b*s]-major positions from the data loader: no torch.nonzero (host sync) here.
            batch_pos, seq_pos = patch_positions // input_ids.shape[1], patch_positions % input_ids.shape[1]
        else:
            seq_pos, batch_pos = torch.nonzero(index >= 0, as_tuple=True)
        rows = index[seq_pos, batch_pos]  # in range: make_training_sample checks it on the host
        return embeddings.index_put(
            (seq_pos, batch_pos), projected[rows].to(embeddings.dtype), accumulate=True
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        patches: Optional[torch.Tensor] = None,
        vision_patch_indices: Optional[torch.Tensor] = None,
        patch_positions: Optional[torch.Tensor] = None,
        image_layout: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-token losses [b, s] when ``labels`` are given (last stage), else logits/hidden.

        ``patch_positions`` (optional): flat indices into ``input_ids.view(-1)`` of the patch tokens,
        computed by the data loader (``collate_packed``); without it they are found on the device.
        ``image_layout``: the row's images (class doc), needed by the native-VLM switches."""
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, patches, vision_patch_indices, patch_positions)
        if self.flex_attention or self.native:
            packed_seq_params = self._document_mask(input_ids, packed_seq_params, image_layout)
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
        )

    def _document_mask(self, input_ids: torch.Tensor, packed_seq_params: Optional[PackedSeqParams],
                       image_layout: Optional[torch.Tensor]):
        """flex backend, native switches: the micro-batch's (block) mask and per-document RoPE
        positions, built once here for all layers (and kept for their recompute, which reuses them)."""
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd" or input_ids.shape[0] != 1:
            raise ValueError("the flex backend and the native-VLM switches take one packed row per call: input_ids "
                             "[1, t] and THD packed_seq_params (as megatron_patch.data.collate_packed makes them)")
        if self.native and image_layout is None:
            raise ValueError("model.image_attention / model.vision_positions need the row's image_layout "
                             "(megatron_patch.data.collate_packed gives it)")
        cu = packed_seq_params.cu_seqlens_q
        if packed_seq_params.cu_seqlens_q_padded is not None:
            cu = packed_seq_params.cu_seqlens_q_padded
        total = input_ids.shape[1]
        blocks = image_block_ids(image_layout, total) if self.image_attention == "bidirectional" else None
        params = document_mask_params(cu, total, self.window_left, blocks, block_mask=self.flex_attention)
        positions = params.position_ids
        if self.vision_positions == "2d":
            positions = rope_section_positions(positions, image_layout)
        self.language_model.rotary_pos_emb.position_ids = positions
        return params

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Reshardable (TP/PP) checkpoint layout; the projection is sharded like SOLO's."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded = self.language_model.sharded_state_dict(
            prefix=f"{prefix}language_model.", sharded_offsets=sharded_offsets, metadata=metadata
        )
        if self.pre_process:
            sharded.update(
                self.vision_patch_projection.sharded_state_dict(
                    prefix=f"{prefix}vision_patch_projection.",
                    sharded_offsets=sharded_offsets,
                    metadata=metadata,
                )
            )
        return sharded
