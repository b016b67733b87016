#!/usr/bin/env python3
"""Write tests/fixtures/hsa_authors/: an HSA checkpoint in the layout the authors' training script
saves (RamstorageAI/long-context-modeling: `save_pretrained(safe_serialization=False)`, i.e.
pytorch_model.bin written by torch.save; config.json as an HF LlamaConfig with model_type "llama",
architectures ["DRTForCausalLM"], their extra keys and no num_hidden_layers), with the logits of
bench/np_hsa_check.py's independent numpy model on fixed token ids.

The weights: random N(0, 0.3²) (norm weights 1 + N(0, 0.1²)) for exactly the names and shapes of
WEIGHTS (a tiny model, one encoder layer), generated here with numpy, stored by torch as f32.
Run once with torch and numpy (any CPU torch); the outputs are committed and CI reads them only.

Usage: python bench/make_hsa_authors_fixture.py [OUT_DIR]
"""
import collections
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import np_hsa_check  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hsa_authors"

# As their configs are written: a LlamaConfig's keys plus the HSA ones; no num_hidden_layers.
CONFIG = {
    "architectures": ["DRTForCausalLM"], "model_type": "llama",
    "vocab_size": 48, "hidden_size": 24, "intermediate_size": 40,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02, "max_position_embeddings": 2048, "rope_theta": 10000.0,
    "attention_bias": False, "attention_dropout": 0.0, "lmk_token_id": 47, "pad_token_id": 0,
    "num_lower_layers": 1, "num_upper_layers": 1, "num_upper_groups": 1,
    "sliding_window": 5, "chunk_size": 4, "chunk_topk": 2, "retrieval_dim": 8,
    "encoder_layers": 1, "enable_enc_cls": True, "enc_prenorm": True,
    "enable_softmax": True, "enable_qk_norm": True, "enable_lmk_norm": True, "hsa_only": False,
    "inference_segment": 16384, "torch_dtype": "float32", "transformers_version": "4.46.0",
}


def weights():
    d, h, kv, g = 24, 4, 2, 2
    dh, f, v, dr = d // h, 40, 48, 8
    enc_f = int((8 * d / 3) // 64 * 64) or 0
    shapes = collections.OrderedDict()
    shapes["backbone.embeddings.weight"] = [v, d]

    def attn(p, bias=False):
        shapes[f"{p}.q_proj.weight"] = [h * dh, d]
        shapes[f"{p}.k_proj.weight"] = [kv * dh, d]
        shapes[f"{p}.v_proj.weight"] = [kv * dh, d]
        if bias:
            shapes[f"{p}.q_proj.bias"] = [h * dh]
            shapes[f"{p}.k_proj.bias"] = [kv * dh]
            shapes[f"{p}.v_proj.bias"] = [kv * dh]
        shapes[f"{p}.o_proj.weight"] = [d, h * dh]
        shapes[f"{p}.q_norm.weight"] = [dh]
        shapes[f"{p}.k_norm.weight"] = [dh]

    def mlp(p, width):
        shapes[f"{p}.gate_proj.weight"] = [width, d]
        shapes[f"{p}.up_proj.weight"] = [width, d]
        shapes[f"{p}.down_proj.weight"] = [d, width]

    def swa(i):
        p = f"backbone.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = [d]
        attn(f"{p}.self_attn")
        shapes[f"{p}.post_attention_layernorm.weight"] = [d]
        mlp(f"{p}.mlp", f)

    swa(0)
    p = "backbone.layers.1"  # chunking, with the CLS encoder (no chunking norm)
    shapes[f"{p}.cls_emb"] = [1, 1, d]
    shapes[f"{p}.enc_prenorm.weight"] = [d]
    e = f"{p}.encoder.layers.0"
    shapes[f"{e}.input_layernorm.weight"] = [d]
    attn(f"{e}.self_attn", bias=True)
    shapes[f"{e}.post_attention_layernorm.weight"] = [d]
    if enc_f:
        mlp(f"{e}.mlp", enc_f)
    shapes[f"{p}.encoder.norm.weight"] = [d]
    shapes[f"{p}.proj_k.weight"] = [g * dh, d]
    shapes[f"{p}.proj_v.weight"] = [g * dh, d]
    shapes[f"{p}.lmk_ln.weight"] = [dr, d]
    shapes[f"{p}.k_rmsnorm.weight"] = [dh]
    p = "backbone.layers.2"  # retrieval
    shapes[f"{p}.pre_norm.weight"] = [d]
    shapes[f"{p}.ln.weight"] = [dr, d]
    shapes[f"{p}.lmk_q_norm.weight"] = [dr // g]
    shapes[f"{p}.lmk_k_norm.weight"] = [dr // g]
    p = "backbone.layers.3"  # HSA block
    shapes[f"{p}.swa_prenorm.weight"] = [d]
    attn(f"{p}.attn")
    shapes[f"{p}.pre_norm.weight"] = [d]
    shapes[f"{p}.q_proj.weight"] = [d, d]
    shapes[f"{p}.q_norm.weight"] = [dh]
    shapes[f"{p}.o_proj.weight"] = [d, d]
    shapes[f"{p}._mlp_norm.weight"] = [d]
    mlp(f"{p}._mlp", f)
    swa(4)
    shapes["backbone.norm_f.weight"] = [d]
    shapes["lm_head.weight"] = [v, d]
    rng = np.random.default_rng(20261204)
    out = collections.OrderedDict()
    for name, shape in shapes.items():
        if len(shape) == 1 and not name.endswith(".bias"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    w = weights()
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    torch.save(collections.OrderedDict((k, torch.from_numpy(a)) for k, a in w.items()),
               os.path.join(OUT, "pytorch_model.bin"))
    ids = [int(x) for x in np.random.default_rng(7).integers(0, 48, 16)]
    ref = np_hsa_check.Model(CONFIG, {k: a.astype(np.float64) for k, a in w.items()}).logits(ids, 0)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"ids": ids, "pos0": 0, "logits": ref.tolist(),
                   "source": "bench/np_hsa_check.py (numpy, float64)"}, f)
    print(f"wrote {OUT}: {len(w)} tensors, logits {ref.shape}")


if __name__ == "__main__":
    main()
