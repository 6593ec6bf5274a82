"""Writes a random llama-shaped checkpoint (config.json + model.safetensors, bf16) for
benchmarks: default ~1.1B parameters (TinyLlama shape). Deterministic for a given seed.

    python make_random_llama.py OUT_DIR [--hidden 2048 --layers 22 --inter 5632 --heads 32 --kv 4
        --vocab 49152 --tokenizer-gguf SmolLM2.gguf]
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokenizer-gguf", help="save this GGUF's tokenizer as tokenizer.json (transformers)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    hd = a.hidden // a.heads
    t = {}

    def w(name, *shape, scale=0.02):
        t[name] = (torch.randn(*shape) * scale).to(torch.bfloat16)

    w("model.embed_tokens.weight", a.vocab, a.hidden)
    w("lm_head.weight", a.vocab, a.hidden)
    t["model.norm.weight"] = torch.ones(a.hidden, dtype=torch.bfloat16)
    for i in range(a.layers):
        p = f"model.layers.{i}"
        w(f"{p}.self_attn.q_proj.weight", a.heads * hd, a.hidden)
        w(f"{p}.self_attn.k_proj.weight", a.kv * hd, a.hidden)
        w(f"{p}.self_attn.v_proj.weight", a.kv * hd, a.hidden)
        w(f"{p}.self_attn.o_proj.weight", a.hidden, a.heads * hd)
        w(f"{p}.mlp.gate_proj.weight", a.inter, a.hidden)
        w(f"{p}.mlp.up_proj.weight", a.inter, a.hidden)
        w(f"{p}.mlp.down_proj.weight", a.hidden, a.inter)
        t[f"{p}.input_layernorm.weight"] = torch.ones(a.hidden, dtype=torch.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(a.hidden, dtype=torch.bfloat16)
    os.makedirs(a.out, exist_ok=True)
    tmp = os.path.join(a.out, ".model.safetensors.tmp")
    save_file(t, tmp)
    os.replace(tmp, os.path.join(a.out, "model.safetensors"))
    cfg = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": a.vocab, "hidden_size": a.hidden, "intermediate_size": a.inter,
        "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if a.tokenizer_gguf:
        from transformers import AutoTokenizer

        d, f = os.path.split(a.tokenizer_gguf)
        AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(a.out)
    n = sum(x.numel() for x in t.values())
    print(f"{a.out}: {n / 1e9:.2f}B parameters")


if __name__ == "__main__":
    main()
