"""A zoo of tiny, randomly initialized Hugging Face models, built from configs in code (no downloads).

The contract suite runs every architecture here through every prompt-tuning method and several checks
on two CPU cores, so every model is as small as its architecture allows while still exercising what
makes that architecture different:

* width: ``hidden_size`` 64 with 4 query heads of ``head_dim`` 16; 2 key/value heads where the
  architecture has grouped-query attention, 1 where it is multi-query (``gpt_bigcode``, ``falcon``);
  MLP ``intermediate_size`` 128; ``max_position_embeddings`` 512; the vocabulary is the caller's.
* depth: 2 layers. Hybrids get the fewest layers that hold at least one attention layer and one
  state-space / linear-attention layer (``jamba``, ``qwen3_next``: 2; ``falcon_h1`` runs attention
  and Mamba-2 side by side in every layer); architectures that mix sliding-window (or chunked) and
  full layers get one of each, via ``layer_types`` or the architecture's own knob (``max_window_layers``,
  ``no_rope_layer_interval``).
* windows: sliding windows are 4 tokens and Llama 4's attention chunk is 4 tokens, so test inputs of
  10-30 tokens (and any soft prompt in front of them) really cross window and chunk boundaries.
  (``modernbert``'s ``local_attention`` is the full width of its window, 4, i.e. 2 either side.)
* mixture of experts: 4 experts, top-2 routing, expert MLPs of width 32 (shared experts 32 or 64).
* state space: state size 8, convolution kernel 2 (4 for Qwen3-Next), few heads. Transformers picks
  the reference PyTorch scan / conv / gated-delta-rule path by itself when ``mamba_ssm``,
  ``causal_conv1d`` and ``flash-linear-attention`` are absent (as here), so nothing needs CUDA.
* special tokens: ``eos_token_id`` and ``pad_token_id`` are the caller's, ``bos_token_id`` is the eos
  id (T5 / mT5 have no BOS); seq2seq models start decoding from the pad id (T5 style) or the eos id
  (BART style).
* embeddings are tied where the config defaults to it or the small released checkpoints tie them
  (Llama 3.2, Qwen3, Granite 3); ``"tied"`` in ``FEATURES`` matches ``lm_head.weight is embed.weight``.
* Granite keeps Granite-3-like multipliers (embedding x12, residual 0.22, logits / 4) and RoBERTa gets
  ``max_position_embeddings = 512 + pad_token_id + 1`` (it numbers positions from ``pad + 1``).

Cost (2 layers, ~80k-260k parameters each): building the whole zoo takes well under a second after the
first import, and one forward+backward of a 3 x 20 batch is 5-35 ms per model on one CPU thread
(about 0.45 s summed over the zoo; the sequential Mamba scan and the hybrids are the slowest).

Attention implementation: ``"sdpa"`` wherever the model class declares ``_supports_sdpa``, otherwise
``"eager"`` (``gemma2``: SDPA cannot soft-cap logits; ``gpt_oss``: SDPA cannot add attention sinks;
``bloom``: ALiBi model without SDPA support; ``deberta-v2``: disentangled relative attention is
eager only; ``mamba``/``mamba2`` have no attention at all, "eager" is just the nominal choice).
Models are returned in eval mode, float32, on CPU, seeded with ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import torch

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128
LAYERS = 2
MAX_POS = 512
WINDOW = 4  # sliding window (tokens) of models that mix sliding and full layers
# Models whose every layer slides see only 2 x (window - 1) tokens back through 2 layers; a window of 4 would leave a
# prompt in front of a 10-token input without any effect on the label word (gradient exactly 0, correctly so).
ALL_SLIDING_WINDOW = 12
CHUNK = 4  # Llama 4 attention chunk (tokens)
EXPERTS, TOP_K, EXPERT_WIDTH = 4, 2, 32

CAUSAL: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "gemma",
    "gemma2",
    "gemma3",
    "gpt_oss",
    "llama4",
    "phi3",
    "gpt_neox",
    "falcon",
    "opt",
    "gptj",
    "bloom",
    "gpt2",
    "gpt_bigcode",
    "olmo2",
    "granite",
    "cohere",
    "jamba",
    "falcon_h1",
    "qwen3_next",
    "mamba",
    "starcoder2",
    "phi",
    "stablelm",
    "cohere2",
    "olmo3",
    "smollm3",
    "exaone4",
    "mamba2",
)
SEQ2SEQ: tuple[str, ...] = ("t5", "bart", "mt5", "mbart")
ENCODER: tuple[str, ...] = ("bert", "roberta", "deberta-v2", "modernbert")
ALL: tuple[str, ...] = CAUSAL + SEQ2SEQ + ENCODER

FEATURES: dict[str, set[str]] = {
    "llama": {"gqa", "rotary", "tied"},
    "mistral": {"gqa", "rotary", "sliding"},
    "qwen2": {"gqa", "rotary", "sliding", "hybrid_window"},
    "qwen3": {"gqa", "rotary", "tied"},
    "qwen2_moe": {"gqa", "rotary", "moe"},
    "qwen3_moe": {"gqa", "rotary", "moe"},
    "mixtral": {"gqa", "rotary", "moe"},
    "gemma": {"gqa", "rotary", "tied"},
    "gemma2": {"gqa", "rotary", "sliding", "hybrid_window", "softcap", "tied"},
    "gemma3": {"gqa", "rotary", "sliding", "hybrid_window", "tied"},
    "gpt_oss": {"gqa", "rotary", "sliding", "hybrid_window", "moe", "sinks"},
    "llama4": {"gqa", "rotary", "chunked", "hybrid_window", "nope_layers", "moe"},
    "phi3": {"gqa", "rotary", "partial_rotary"},
    "gpt_neox": {"rotary", "partial_rotary", "parallel_attn"},
    "falcon": {"mqa", "rotary", "parallel_attn", "tied"},
    "opt": {"learned_pos", "tied"},
    "gptj": {"rotary", "partial_rotary", "parallel_attn"},
    "bloom": {"alibi", "tied"},
    "gpt2": {"learned_pos", "tied"},
    "gpt_bigcode": {"mqa", "learned_pos", "tied"},
    "olmo2": {"gqa", "rotary"},
    "granite": {"gqa", "rotary", "tied"},
    "cohere": {"gqa", "rotary", "parallel_attn", "tied"},
    "jamba": {"gqa", "ssm", "moe", "nope_layers"},
    "falcon_h1": {"gqa", "rotary", "ssm"},
    "qwen3_next": {"gqa", "rotary", "partial_rotary", "ssm", "moe"},
    "mamba": {"ssm", "pure_ssm", "tied"},
    "starcoder2": {"gqa", "rotary", "sliding", "tied"},
    "phi": {"rotary", "partial_rotary", "parallel_attn"},
    "stablelm": {"gqa", "rotary", "partial_rotary"},
    "cohere2": {"gqa", "rotary", "sliding", "hybrid_window", "nope_layers", "parallel_attn", "tied"},
    "olmo3": {"gqa", "rotary", "sliding", "hybrid_window"},
    "smollm3": {"gqa", "rotary", "nope_layers", "tied"},
    "exaone4": {"gqa", "rotary", "sliding", "hybrid_window", "nope_layers"},
    "mamba2": {"ssm", "pure_ssm"},
    "t5": {"encoder_decoder", "bidirectional", "tied"},
    "bart": {"encoder_decoder", "bidirectional", "learned_pos", "tied"},
    "mt5": {"encoder_decoder", "bidirectional", "tied"},
    "mbart": {"encoder_decoder", "bidirectional", "learned_pos", "tied"},
    "bert": {"bidirectional", "learned_pos", "tied"},
    "roberta": {"bidirectional", "learned_pos", "tied"},
    "deberta-v2": {"bidirectional", "learned_pos", "tied"},
    "modernbert": {"bidirectional", "rotary", "sliding", "hybrid_window", "tied"},
}


def _ids(eos: int, pad: int) -> dict:
    return dict(eos_token_id=eos, bos_token_id=eos, pad_token_id=pad)


def _decoder(vocab: int, eos: int, pad: int, **kw) -> dict:
    """Llama-style keyword arguments shared by most modern decoders."""
    base = dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        **_ids(eos, pad),
    )
    base.update(kw)
    return base


def config_for(arch: str, vocab_size: int, eos_token_id: int, pad_token_id: int):
    """The tiny config of `arch` (one of `ALL`)."""
    import transformers as T

    v, e, p = vocab_size, eos_token_id, pad_token_id
    moe = dict(num_experts_per_tok=TOP_K)
    sliding_full = ["sliding_attention", "full_attention"]

    if arch == "llama":
        return T.LlamaConfig(**_decoder(v, e, p, tie_word_embeddings=True))
    if arch == "mistral":
        return T.MistralConfig(**_decoder(v, e, p, sliding_window=ALL_SLIDING_WINDOW))
    if arch == "qwen2":
        # layers >= max_window_layers slide: layer 0 full, layer 1 sliding
        return T.Qwen2Config(**_decoder(v, e, p, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1))
    if arch == "qwen3":
        return T.Qwen3Config(**_decoder(v, e, p, tie_word_embeddings=True))
    if arch == "qwen2_moe":
        return T.Qwen2MoeConfig(
            **_decoder(
                v,
                e,
                p,
                num_experts=EXPERTS,
                moe_intermediate_size=EXPERT_WIDTH,
                shared_expert_intermediate_size=2 * EXPERT_WIDTH,
                **moe,
            )
        )
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(
            **_decoder(v, e, p, num_local_experts=EXPERTS, moe_intermediate_size=EXPERT_WIDTH, **moe)
        )
    if arch == "mixtral":
        return T.MixtralConfig(**_decoder(v, e, p, num_local_experts=EXPERTS, intermediate_size=EXPERT_WIDTH, **moe))
    if arch == "gemma":
        return T.GemmaConfig(**_decoder(v, e, p))
    if arch == "gemma2":
        # eager: Gemma2PreTrainedModel._supports_sdpa is False (SDPA cannot soft-cap attention logits)
        return T.Gemma2Config(
            **_decoder(v, e, p, sliding_window=WINDOW, layer_types=sliding_full, query_pre_attn_scalar=HEAD_DIM)
        )
    if arch == "gemma3":
        return T.Gemma3TextConfig(
            **_decoder(v, e, p, sliding_window=WINDOW, layer_types=sliding_full, query_pre_attn_scalar=HEAD_DIM)
        )
    if arch == "gpt_oss":
        # eager: GptOssPreTrainedModel._supports_sdpa is False (learned attention sinks, one per head)
        return T.GptOssConfig(
            **_decoder(
                v,
                e,
                p,
                intermediate_size=EXPERT_WIDTH,
                num_local_experts=EXPERTS,
                sliding_window=WINDOW,
                layer_types=sliding_full,
                rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
                **moe,
            )
        )
    if arch == "llama4":
        # no_rope_layer_interval=2: layer 0 is chunked attention with RoPE, layer 1 full attention without (NoPE)
        return T.Llama4TextConfig(
            **_decoder(
                v,
                e,
                p,
                intermediate_size=EXPERT_WIDTH,
                intermediate_size_mlp=INTERMEDIATE,
                num_local_experts=EXPERTS,
                attention_chunk_size=CHUNK,
                no_rope_layer_interval=2,
                **moe,
            )
        )
    if arch == "phi3":
        return T.Phi3Config(
            **_decoder(
                v, e, p, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
            )
        )
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(
            vocab_size=v,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            **_ids(e, p),
        )
    if arch == "falcon":
        # new decoder architecture: parallel attention + MLP, num_kv_heads=1 (multi-query), rotary
        return T.FalconConfig(
            vocab_size=v,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_kv_heads=1,
            new_decoder_architecture=True,
            parallel_attn=True,
            alibi=False,
            ffn_hidden_size=INTERMEDIATE,
            max_position_embeddings=MAX_POS,
            **_ids(e, p),
        )
    if arch == "opt":
        return T.OPTConfig(
            vocab_size=v,
            hidden_size=HIDDEN,
            word_embed_proj_dim=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            ffn_dim=INTERMEDIATE,
            max_position_embeddings=MAX_POS,
            **_ids(e, p),
        )
    if arch == "gptj":
        return T.GPTJConfig(
            vocab_size=v,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            rotary_dim=HEAD_DIM // 2,
            n_positions=MAX_POS,
            **_ids(e, p),
        )
    if arch == "bloom":
        # eager: Bloom does not declare SDPA support (ALiBi bias built from the attention mask)
        return T.BloomConfig(vocab_size=v, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **_ids(e, p))
    if arch == "gpt2":
        return T.GPT2Config(
            vocab_size=v,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            n_positions=MAX_POS,
            **_ids(e, p),
        )
    if arch == "gpt_bigcode":
        return T.GPTBigCodeConfig(
            vocab_size=v,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            n_positions=MAX_POS,
            multi_query=True,
            **_ids(e, p),
        )
    if arch == "olmo2":
        return T.Olmo2Config(**_decoder(v, e, p))
    if arch == "granite":
        # Granite 3 style multipliers, so scaled embeddings / residuals / logits are exercised
        return T.GraniteConfig(
            **_decoder(
                v,
                e,
                p,
                tie_word_embeddings=True,
                embedding_multiplier=12.0,
                residual_multiplier=0.22,
                attention_multiplier=1 / HEAD_DIM,
                logits_scaling=4.0,
            )
        )
    if arch == "cohere":
        return T.CohereConfig(**_decoder(v, e, p))
    if arch == "jamba":
        # layer 0 Mamba (dense MLP), layer 1 attention (MoE MLP); Jamba attention layers have no positions
        return T.JambaConfig(
            **_decoder(
                v,
                e,
                p,
                num_experts=EXPERTS,
                intermediate_size=INTERMEDIATE,
                attn_layer_period=2,
                attn_layer_offset=1,
                expert_layer_period=2,
                expert_layer_offset=1,
                mamba_d_state=8,
                mamba_d_conv=2,
                mamba_expand=2,
                mamba_dt_rank=8,
                **moe,
            )
        )
    if arch == "falcon_h1":
        return T.FalconH1Config(
            **_decoder(
                v,
                e,
                p,
                mamba_d_ssm=HIDDEN,
                mamba_n_heads=4,
                mamba_d_head=HIDDEN // 4,
                mamba_n_groups=1,
                mamba_d_state=8,
                mamba_d_conv=2,
                mamba_expand=1,
                mamba_chunk_size=8,
            )
        )
    if arch == "qwen3_next":
        return T.Qwen3NextConfig(
            **_decoder(
                v,
                e,
                p,
                layer_types=["linear_attention", "full_attention"],
                linear_key_head_dim=HEAD_DIM,
                linear_value_head_dim=HEAD_DIM,
                linear_num_key_heads=2,
                linear_num_value_heads=4,
                num_experts=EXPERTS,
                moe_intermediate_size=EXPERT_WIDTH,
                shared_expert_intermediate_size=EXPERT_WIDTH,
                **moe,
            )
        )
    if arch == "mamba":
        # no attention; "eager" is nominal. Sequential selective scan on CPU (no mamba_ssm / causal_conv1d)
        return T.MambaConfig(
            vocab_size=v,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            state_size=8,
            conv_kernel=2,
            expand=2,
            time_step_rank=8,
            **_ids(e, p),
        )
    if arch == "mamba2":
        # no attention; "eager" is nominal. Chunked torch SSD path on CPU
        return T.Mamba2Config(
            vocab_size=v,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_heads=4,
            head_dim=2 * HIDDEN // 4,
            expand=2,
            n_groups=1,
            state_size=8,
            conv_kernel=2,
            chunk_size=8,
            time_step_rank=8,
            **_ids(e, p),
        )
    if arch == "starcoder2":
        return T.Starcoder2Config(**_decoder(v, e, p, sliding_window=ALL_SLIDING_WINDOW))
    if arch == "phi":
        return T.PhiConfig(
            **_decoder(
                v,
                e,
                p,
                num_key_value_heads=HEADS,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            )
        )
    if arch == "stablelm":
        return T.StableLmConfig(**_decoder(v, e, p))
    if arch == "cohere2":
        # sliding layers use RoPE, full layers none
        return T.Cohere2Config(**_decoder(v, e, p, sliding_window=WINDOW, layer_types=sliding_full))
    if arch == "olmo3":
        return T.Olmo3Config(**_decoder(v, e, p, sliding_window=WINDOW, layer_types=sliding_full))
    if arch == "smollm3":
        # no_rope_layers: 1 = RoPE, 0 = NoPE
        return T.SmolLM3Config(**_decoder(v, e, p, no_rope_layers=[1, 0]))
    if arch == "exaone4":
        # sliding layers use RoPE, full layers none
        return T.Exaone4Config(
            **_decoder(v, e, p, sliding_window=WINDOW, sliding_window_pattern=2, layer_types=sliding_full)
        )

    if arch == "t5":
        return T.T5Config(
            vocab_size=v,
            d_model=HIDDEN,
            d_kv=HEAD_DIM,
            d_ff=INTERMEDIATE,
            num_layers=LAYERS,
            num_decoder_layers=LAYERS,
            num_heads=HEADS,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            eos_token_id=e,
            pad_token_id=p,
            decoder_start_token_id=p,
        )
    if arch == "mt5":
        return T.MT5Config(
            vocab_size=v,
            d_model=HIDDEN,
            d_kv=HEAD_DIM,
            d_ff=INTERMEDIATE,
            num_layers=LAYERS,
            num_decoder_layers=LAYERS,
            num_heads=HEADS,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            eos_token_id=e,
            pad_token_id=p,
            decoder_start_token_id=p,
        )  # MT5Config forces tie_word_embeddings=True
    if arch in ("bart", "mbart"):
        cls = T.BartConfig if arch == "bart" else T.MBartConfig
        return cls(
            vocab_size=v,
            d_model=HIDDEN,
            encoder_layers=LAYERS,
            decoder_layers=LAYERS,
            encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS,
            encoder_ffn_dim=INTERMEDIATE,
            decoder_ffn_dim=INTERMEDIATE,
            max_position_embeddings=MAX_POS,
            decoder_start_token_id=e,
            forced_eos_token_id=e,
            **_ids(e, p),
        )

    enc = dict(
        vocab_size=v,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POS,
        **_ids(e, p),
    )
    if arch == "bert":
        return T.BertConfig(**enc)
    if arch == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1, so room for MAX_POS tokens whatever the pad id
        return T.RobertaConfig(**{**enc, "max_position_embeddings": MAX_POS + p + 1})
    if arch == "deberta-v2":
        # eager: DeBERTa-v2 does not declare SDPA support (disentangled relative attention)
        return T.DebertaV2Config(**enc, relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"])
    if arch == "modernbert":
        return T.ModernBertConfig(
            **enc,
            cls_token_id=e,
            sep_token_id=e,
            local_attention=WINDOW,
            layer_types=["full_attention", "sliding_attention"],
        )
    raise KeyError(f"unknown zoo architecture {arch!r}; known: {', '.join(ALL)}")


def auto_class(arch: str):
    import transformers as T

    if arch in SEQ2SEQ:
        return T.AutoModelForSeq2SeqLM
    if arch in ENCODER:
        return T.AutoModelForMaskedLM
    return T.AutoModelForCausalLM


def attn_implementation(arch: str, config=None) -> str:
    """ "sdpa" where the model class supports it, else "eager" (also for attention-free Mamba / Mamba-2)."""
    auto = auto_class(arch)
    config = config if config is not None else config_for(arch, 64, 0, 0)
    model_cls = auto._model_mapping[type(config)]
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"


def build_model(arch: str, vocab_size: int, eos_token_id: int, pad_token_id: int, seed: int = 0):
    """A tiny randomly initialized model of `arch`, in eval mode, float32, on CPU."""
    config = config_for(arch, vocab_size, eos_token_id, pad_token_id)
    impl = attn_implementation(arch, config)
    torch.manual_seed(seed)
    model = auto_class(arch).from_config(config, attn_implementation=impl, dtype=torch.float32)
    return model.eval()
