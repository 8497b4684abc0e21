"""The stage recipes load through the typed config schema and carry the paper's hyperparameters."""

from pathlib import Path

import pytest

from megatron_patch.config import ConfigError, load_config
from megatron_patch.data import read_mixture

RECIPES = Path(__file__).resolve().parents[1] / "megatron_patch" / "recipes"


@pytest.fixture
def solo_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SOLO_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("SOLO_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SOLO_INIT", str(tmp_path / "init"))
    return tmp_path


@pytest.mark.parametrize("stage,iters", [(1, 1525), (2, 3481), (3, 300)])
def test_stage_recipe_matches_the_paper(solo_env, stage, iters):
    from megatron_patch.model import build_transformer_config

    cfg = load_config(RECIPES / f"stage{stage}.yaml")
    assert cfg.training.train_iters == iters
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.warmup_iters) == (5e-5, 5e-6, 200)
    assert cfg.optimizer.decay_style == "cosine" and cfg.optimizer.weight_decay == 0.1
    assert (cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2, cfg.optimizer.adam_eps) == (0.9, 0.999, 1e-8)
    assert cfg.optimizer.clip_grad == 1.0 and cfg.optimizer.use_distributed_optimizer
    assert (cfg.data.global_batch_size, cfg.data.seq_length) == (128, 32768)
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.training.bf16 and cfg.training.recompute == "full"
    assert cfg.model.sliding_window == 4096 and cfg.model.num_query_groups == 8
    assert cfg.checkpoint.save == str(solo_env / "runs" / f"stage{stage}")
    previous = str(solo_env / "init") if stage == 1 else str(solo_env / "runs" / f"stage{stage - 1}")
    assert cfg.checkpoint.init_from == previous
    assert cfg.data.path == str(RECIPES / "mixtures" / f"stage{stage}.yaml")
    paths, weights = read_mixture(cfg.data.path)
    assert abs(sum(weights) - 1.0) < 1e-3
    assert all(p.startswith(str(solo_env / "data" / "packed")) for p in paths)
    # The model section is a valid megatron-core TransformerConfig (7B, TP=2) without building it.
    tc = build_transformer_config(cfg.model, cfg.parallel, cfg.training)
    assert tc.window_size == (4096, 0) and tc.recompute_granularity == "full"  # SOLO-7B: itself + 4096 earlier
    assert tc.calculate_per_token_loss and not tc.add_bias_linear and tc.gated_linear_unit


def test_stage1_mixture_weights(solo_env):
    paths, weights = read_mixture(RECIPES / "mixtures" / "stage1.yaml")
    assert [Path(p).name for p in paths] == ["imagenet21k", "slimpajama"] and weights == [0.7, 0.3]


def test_debug_recipe_and_overrides():
    cfg = load_config(RECIPES / "debug_cpu.yaml", ["parallel.tensor_model_parallel_size=2", "training.train_iters=7"])
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.training.train_iters == 7
    assert cfg.data.path == "synthetic" and not cfg.training.bf16


def test_schema_rejects_bad_recipes(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown key.*training.train_itres"):
        load_config(RECIPES / "debug_cpu.yaml", ["training.train_itres=3"])
    with pytest.raises(ConfigError, match="training.train_iters: expected an integer"):
        load_config(RECIPES / "debug_cpu.yaml", ["training.train_iters=many"])
    with pytest.raises(ConfigError, match="must divide model.num_query_groups"):
        load_config(RECIPES / "debug_cpu.yaml", ["parallel.tensor_model_parallel_size=4"])
    with pytest.raises(ConfigError, match="exactly one of training.train_iters and training.train_tokens"):
        load_config(RECIPES / "debug_cpu.yaml", ["training.train_tokens=1e6"])
    with pytest.raises(ConfigError, match="train_tokens needs packed data"):
        load_config(RECIPES / "debug_cpu.yaml", ["training.train_tokens=1e6", "training.train_iters="])
    monkeypatch.delenv("SOLO_RUNS", raising=False)
    with pytest.raises(ConfigError, match="SOLO_RUNS"):
        load_config(RECIPES / "stage2.yaml")


def test_a_choice_outside_its_list_is_refused_on_load_and_in_code():
    """Choice fields are Literal types: the loader names the key and the choices, and validate() does the
    same for a config changed in code (the list is written once, in the field's type)."""
    from megatron_patch.config import validate

    with pytest.raises(ConfigError, match=r"model.backend must be one of auto, te, flex, local; got 'tpu'"):
        load_config(RECIPES / "debug_cpu.yaml", ["model.backend=tpu"])
    with pytest.raises(ConfigError, match=r"optimizer.decay_style must be one of cosine, linear, constant"):
        load_config(RECIPES / "debug_cpu.yaml", ["optimizer.decay_style=wsd"])
    cfg = load_config(RECIPES / "debug_cpu.yaml", ["training.recompute=selective", "model.backend=local"])
    assert (cfg.training.recompute, cfg.model.backend) == ("selective", "local")
    cfg.training.recompute = "partial"
    with pytest.raises(ConfigError, match=r"training.recompute must be one of none, selective, full; got 'partial'"):
        validate(cfg)


def test_blend_of_packs_made_with_different_tokenizers_is_refused(tmp_path):
    import json

    from data_prep.cli import main as solo_data
    from megatron_patch.train import resolve_tokenizer_fields
    from solo.tiny import make_base_tokenizer
    from solo.tokenizer import extend_tokenizer

    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": f"some words {i}"}) + "\n" for i in range(5)))
    for name, vocab in (("a", 32000), ("b", 1000)):
        extend_tokenizer(make_base_tokenizer(vocab_size=vocab)).save_pretrained(tmp_path / f"tok_{name}")
        assert solo_data(["pack", str(tmp_path / "text.jsonl"), "--format", "text", "--tokenizer",
                          str(tmp_path / f"tok_{name}"), "--seq-length", "64", "--output", str(tmp_path / name),
                          "--no-progress"]) == 0
    same = tmp_path / "same.yaml"
    same.write_text("datasets:\n  - {path: a, weight: 1}\n  - {path: a, weight: 1}\n")
    cfg = load_config(RECIPES / "debug_cpu.yaml", [f"data.path={same}", "data.pad_token_id=", "data.seq_length=64"])
    resolve_tokenizer_fields(cfg)
    assert cfg.model.vocab_size == 33029 and cfg.data.pad_token_id == 0
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("datasets:\n  - {path: a, weight: 1}\n  - {path: b, weight: 1}\n")
    cfg = load_config(RECIPES / "debug_cpu.yaml", [f"data.path={mixed}", "data.pad_token_id=", "data.seq_length=64"])
    with pytest.raises(ConfigError, match="different tokenizers"):
        resolve_tokenizer_fields(cfg)
