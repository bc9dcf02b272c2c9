"""Tiny models built offline and deterministically: real architectures'
configs at toy sizes, random weights, a word-level tokenizer of the words of
a built-in text. What they say is words in a random order, the same every
time, which is what a round-trip test needs.

    python -m presharded.tiny_models build/tiny-llama [--arch qwen2]
"""

import argparse
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig, PreTrainedTokenizerFast

CORPUS = """\
A pre-sharded checkpoint stores each rank's slice of every weight in its own
files, so that at start-up each GPU reads only its own part. The quick brown
fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How
vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
The model was saved once and started many times: on a new node the disk
sets the pace, on a warm one the memory does. Read the manifest first, then
check every file against it; trust nothing that arrives from far away until
its hash agrees. When the engine wakes, the weights come back from the same
files, and the first token follows a moment later. Servers restart often in
production, with eight cards and large models; every second of waiting is
paid by people who ask a question and watch the screen. A small tool should
do one job well, say what went wrong in one clear line, and never lose data.
Tensors are split by rows or columns, experts are spread across devices,
and pipeline stages hold their layers in turn. We measure before we claim,
write down the command, and keep the numbers honest. Hello, world: what is
the capital of France? Paris is, and the river runs through it. Once upon a
time a small fox found a red apple under an old tree near the cold sea.
"""
SPECIALS = ["<unk>", "<s>", "</s>"]
WORDS = sorted({word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(CORPUS.lower())})

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
# A vision-language model's: its messages' content is a list of images and texts.
VISION_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]  # Idefics3's processor
VOCAB = len(SPECIALS) + len(WORDS)  # one id per word: the model says nothing a tokenizer cannot spell
# transformers 5 gives a Qwen2 model its own tokenizer class, which rebuilds a byte-level BPE from the
# vocabulary whatever the files say: the tiny Qwen2 has a BPE tokenizer trained on CORPUS, of this size.
BPE_VOCAB = 384
# Shapes shared by the decoder-only architectures below: 4 heads of 32, 2 KV heads.
DECODER = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
# transformers config class and arguments, per architecture; each tests something the others do not.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(DECODER, tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", dict(DECODER, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(DECODER, vocab_size=BPE_VOCAB, tie_word_embeddings=True)),  # q/k/v biases, tied
    "qwen3": ("Qwen3Config", dict(DECODER, head_dim=32, tie_word_embeddings=False)),  # q/k norms
    "mistral": ("MistralConfig", dict(DECODER, sliding_window=None)),
    "gemma2": ("Gemma2Config", dict(DECODER, head_dim=32, query_pre_attn_scalar=32, sliding_window=64,
                                    tie_word_embeddings=True)),  # scaled embeddings, soft-capping, tied
    "phi3": ("Phi3Config", dict(DECODER, pad_token_id=0, tie_word_embeddings=False)),  # fused qkv, gate_up
    "qwen3-moe": ("Qwen3MoeConfig", dict(DECODER, head_dim=32, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=64, decoder_sparse_step=1)),
    # many experts, as served MoEs have (Qwen3-30B-A3B 128, DeepSeek-V2-Lite 64): 64, 8 chosen per token
    "qwen3-moe-64": ("Qwen3MoeConfig", dict(DECODER, head_dim=32, num_experts=64, num_experts_per_tok=8,
                                            moe_intermediate_size=32, decoder_sparse_step=1)),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=128, ffn_dim=256, num_attention_heads=4,
                              word_embed_proj_dim=128, max_position_embeddings=256, pad_token_id=0)),
    # MLA (low-rank q and compressed kv with a rope part) and MoE: 8 routed experts, a shared one, a dense first
    # layer. DeepSeek's own sizes: vLLM's CPU MLA kernel takes only its latent size (kv_lora_rank +
    # qk_rope_head_dim = 576), vLLM's MLA prefill on Hopper a few head sizes, its (nope 128, rope 64, v 128)
    # among them (vLLM 0.26 refused 32, 64, 32).
    "deepseek-v2": ("DeepseekV2Config", dict(DECODER, num_key_value_heads=4, moe_intermediate_size=64,
                                             q_lora_rank=64, kv_lora_rank=512, qk_nope_head_dim=128,
                                             qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8,
                                             n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                             topk_method="greedy", n_group=1, topk_group=1,
                                             tie_word_embeddings=False)),
    # sliding-window and global layers in turn, q/k norms, scaled embeddings; untied: tied, its scaled
    # embeddings outweigh the layers at this size and it says its last word again and again
    "gemma3": ("Gemma3TextConfig", dict(DECODER, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                                        sliding_window_pattern=2, tie_word_embeddings=False)),
    # state-space (Mamba-2) layers between attention layers (conv and SSM weights per rank) with experts, as in
    # Granite-4.0-H-Tiny and -Small; tied embeddings (saved once, read under two names)
    "granite-hybrid": ("GraniteMoeHybridConfig", dict(DECODER, shared_intermediate_size=256, num_local_experts=4,
                                                      num_experts_per_tok=2, mamba_n_heads=8, mamba_d_head=32,
                                                      mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4,
                                                      mamba_expand=2, tie_word_embeddings=True)),
    # vision-language (SmolVLM's class): a vision tower of SigLIP's shape, 32x32 pixels in 16 patches that a
    # pixel shuffle folds into 4 of the Llama's input embeddings; the processor's files saved beside it. An
    # image is split into 32x32 tiles and a global one, as SmolVLM's are (unsplit, vLLM 0.26 gives it no
    # pixels: vLLM issue 48667).
    # (LLaVA, PaliGemma, Gemma 3's and Qwen2-VL's vLLM classes import torchvision, which the CPU install lacks.)
    "idefics3": ("Idefics3Config", dict(vision_config=dict(hidden_size=64, intermediate_size=128,
                                                           num_attention_heads=2, image_size=32, patch_size=8),
                                        text_config=dict(DECODER, model_type="llama", vocab_size=VOCAB + len(IMAGE_TOKENS)),
                                        scale_factor=2, pad_token_id=0, tie_word_embeddings=False)),
}
VISION = {"idefics3"}  # their layers: in text_config and vision_config


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word (and per run of punctuation) of CORPUS, lowercased; decoded with spaces."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces, " ." -> "."
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_bpe_tokenizer(vocab_size: int = BPE_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on CORPUS (its text is pieces of words)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_tiny(out: Path, arch: str = "llama", *, num_layers: int = 4, seed: int = 0) -> Path:
    """Write a tiny model of `arch` (config, safetensors weights, tokenizer) to `out`."""
    tokenizer = build_bpe_tokenizer() if arch == "qwen2" else build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config_class, kwargs = ARCHITECTURES[arch]
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "granite-hybrid":  # state-space layers, then attention, in turn
        kwargs = dict(kwargs, layer_types=["mamba", "attention"] * (num_layers // 2) + ["mamba"] * (num_layers % 2))
    if arch in VISION:
        tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
        kwargs = dict(kwargs, vision_config=dict(kwargs["vision_config"], num_hidden_layers=num_layers),
                      text_config=dict(kwargs["text_config"], num_hidden_layers=num_layers, **ids),
                      image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    else:
        kwargs = dict(kwargs, num_hidden_layers=num_layers)
    config = getattr(transformers, config_class)(**kwargs, **ids, torch_dtype="float32")
    torch.manual_seed(seed)
    model = (AutoModelForImageTextToText if arch in VISION else AutoModelForCausalLM).from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # wide weights: confident logits, stable greedy tokens
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if arch in VISION:  # its image processor (longest side to 64, tiles of 32) and chat template
        processor = transformers.Idefics3ImageProcessor(do_image_splitting=True, size={"longest_edge": 64},
                                                        max_image_size={"longest_edge": 32})
        transformers.Idefics3Processor(processor, tokenizer, image_seq_len=4,
                                       chat_template=VISION_CHAT_TEMPLATE).save_pretrained(out)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(out)
    return out


def build_tiny_llama(out: Path, *, tie_word_embeddings: bool = False, num_layers: int = 4) -> Path:
    return build_tiny(out, "llama-tied" if tie_word_embeddings else "llama", num_layers=num_layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--arch", choices=list(ARCHITECTURES), default="llama")
    parser.add_argument("--num-layers", type=int, default=4)
    args = parser.parse_args()
    path = build_tiny(args.output, args.arch, num_layers=args.num_layers)
    print(path)
    print(f"tiny {args.arch} written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
