"""LLaDA2-MoE configuration for `AutoConfig.from_pretrained(dir, trust_remote_code=True)`.

Shipped by llada_train (`llada_train/model/hf_remote/`) in
exports whose source had no remote code of its own, e.g. a model trained from scratch. It needs
transformers only: readers of the config alone (SGLang, vLLM, `AutoConfig`) work without
llada_train. Every key of config.json becomes an attribute; the defaults are LLaDA2.1-mini's.
The official configuration_llada2_moe.py of inclusionAI/LLaDA2.1-mini reads the same file.
"""

from transformers import PretrainedConfig


class LLaDA2MoeConfig(PretrainedConfig):
    model_type = "llada2_moe_veomni"  # the value of config.json's model_type in llada_train exports
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=157184,
        hidden_size=2048,
        intermediate_size=5120,
        moe_intermediate_size=512,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=256,
        num_experts_per_tok=8,
        num_shared_experts=1,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        rope_theta=600000.0,
        partial_rotary_factor=0.5,
        rotary_dim=None,
        max_position_embeddings=16384,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        use_qkv_bias=False,
        use_bias=False,
        initializer_range=0.02,
        pad_token_id=156892,
        eos_token_id=None,
        mask_token_id=None,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_topk_prob = norm_topk_prob
        self.first_k_dense_replace = first_k_dense_replace
        self.score_function = score_function
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.rotary_dim = (
            rotary_dim if rotary_dim is not None else int(head_dim * partial_rotary_factor)
        )
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
