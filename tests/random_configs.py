"""Random small but valid model configurations: every switch of ModelConfig in some combination."""

from __future__ import annotations

import random

from dsv3 import ModelConfig, preset


def random_config(seed: int) -> ModelConfig:
    r = random.Random(seed)
    heads = r.choice([1, 2, 4])
    n_group = r.choice([1, 2, 4])
    per_group = r.choice([2, 3, 4])
    topk_group = r.randint(1, n_group)
    method = r.choice(["noaux_tc", "greedy", "group_limited_greedy"]) if n_group > 1 else r.choice(
        ["noaux_tc", "greedy"])
    choosable = per_group * (n_group if method == "greedy" else topk_group)
    layers = r.randint(1, 4)
    yarn = {"type": "yarn", "factor": r.choice([2, 4, 40]), "original_max_position_embeddings": 32,
            "beta_fast": 32, "beta_slow": 1, "mscale": r.choice([0.707, 1.0]), "mscale_all_dim": r.choice([0.707, 1.0])}
    return preset("tiny").replace(
        vocab_size=r.randint(64, 300),
        hidden_size=r.choice([16, 32, 48]),
        intermediate_size=r.choice([24, 64]),
        moe_intermediate_size=r.choice([8, 16, 24]),
        num_hidden_layers=layers,
        first_k_dense_replace=r.randint(0, layers),
        num_attention_heads=heads,
        q_lora_rank=r.choice([None, 8, 24]),
        kv_lora_rank=r.choice([8, 16, 32]),
        qk_nope_head_dim=r.choice([4, 8]),
        qk_rope_head_dim=r.choice([2, 4, 8]),
        v_head_dim=r.choice([4, 8, 12]),
        n_routed_experts=n_group * per_group,
        n_shared_experts=r.randint(0, 2),
        num_experts_per_tok=r.randint(1, choosable),
        n_group=n_group,
        topk_group=topk_group,
        scoring_func="sigmoid" if method == "noaux_tc" else r.choice(["sigmoid", "softmax"]),
        topk_method=method,
        norm_topk_prob=r.choice([True, False]),
        num_nextn_predict_layers=r.randint(0, 2),
        rope_scaling=r.choice([None, yarn]),
        max_position_embeddings=256,
    )


RANDOM_SEEDS = range(6)
