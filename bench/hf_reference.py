#!/usr/bin/env python3
"""Generate Hugging Face reference fixtures for ultralong's logits/gradient tests.

For each case writes tests/fixtures/hf/<case>/:
  model/config.json, model/model.safetensors   (LlamaForCausalLM.save_pretrained, f32)
  tokens.json                                  (JSON array of T token ids)
  meta.json                                    (position offset, loss, versions, rope details)
  reference.safetensors                        (f32: `logits` [T, V] and one gradient per
                                                parameter under its HF name)

The gradients are those of the mean next-token loss (labels = input_ids, HF shifts
internally, mean over T-1 targets), computed with attn_implementation="eager" in float32,
2 threads, deterministic algorithms. Rust tests read these files; no Python in CI.

Usage: .venv/bin/python bench/hf_reference.py [--out tests/fixtures/hf] [--cases a,b]
Also writes tests/fixtures/hf/config_forms/yarn_{4x,5x}.json.
"""
import argparse
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

SEED = 20250406  # weights and tokens; identical across cases on purpose (see README)
T = 37

BASE = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
)
ROPE_THETA = 10000.0

YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256,
        "beta_fast": 4.0, "beta_slow": 1.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

CASES = {
    "llama3": dict(rope=LLAMA3, max_pos=512, P=0, rope_precision="exact"),
    "yarn": dict(rope=YARN, max_pos=4096, P=0, rope_precision="exact"),
    "yarn_far_fp32": dict(rope=YARN, max_pos=4096, P=4_000_000, rope_precision="fp32"),
    "default": dict(rope=None, max_pos=512, P=0, rope_precision="exact"),
}

TF_MAJOR = int(transformers.__version__.split(".")[0])


def make_config(case):
    kw = dict(BASE, max_position_embeddings=case["max_pos"])
    if TF_MAJOR >= 5:
        rp = dict(case["rope"]) if case["rope"] else {"rope_type": "default"}
        rp["rope_theta"] = ROPE_THETA
        kw["rope_parameters"] = rp
    else:
        kw["rope_theta"] = ROPE_THETA
        if case["rope"]:
            kw["rope_scaling"] = dict(case["rope"])
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def init_params(model, seed):
    """Explicit init, independent of HF's _init_weights: N(0, 0.02) for every matrix,
    1 + 0.1*N(0,1) for every RMSNorm weight. Parameters visited in sorted-name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:  # RMSNorm weights (no biases in this config)
                assert "norm" in name, name
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def tokens_for(seed, vocab):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (T,), generator=g)


def run_reference(model, ids, P):
    model.zero_grad(set_to_none=True)
    pos = torch.arange(P, P + T, dtype=torch.long)[None]
    out = model(input_ids=ids[None], position_ids=pos, labels=ids[None], use_cache=False)
    out.loss.backward()
    tensors = {"logits": out.logits[0].detach().float().contiguous().clone()}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        tensors[name] = p.grad.detach().float().contiguous().clone()
    return out.loss.item(), tensors


def config_form_name():
    return "rope_parameters (transformers 5.x)" if TF_MAJOR >= 5 else "rope_scaling (transformers 4.x)"


def yarn_4x_form(cfg_json):
    """The 4.x spelling of a 5.x config: rope_theta top level, scaling in rope_scaling."""
    d = dict(cfg_json)
    rp = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rp.pop("rope_theta")
    d["rope_scaling"] = rp
    d.pop("dtype", None)
    d["torch_dtype"] = "float32"
    d["transformers_version"] = "4.x (hand-written from the " + transformers.__version__ + " form)"
    return d


def yarn_5x_form(cfg_json):
    d = dict(cfg_json)
    if "rope_scaling" in d:
        rp = dict(d.pop("rope_scaling"))
        rp["rope_theta"] = d.pop("rope_theta")
        d["rope_parameters"] = rp
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out_root = os.path.abspath(args.out)
    os.makedirs(out_root, exist_ok=True)

    for cname in args.cases.split(","):
        case = CASES[cname]
        cfg = make_config(case)
        model = LlamaForCausalLM(cfg).float()
        assert model.config._attn_implementation == "eager", model.config._attn_implementation
        init_params(model, SEED)
        model.train()  # dropout is 0.0; train() only matters for dropout
        ids = tokens_for(SEED, cfg.vocab_size)

        loss, tensors = run_reference(model, ids, case["P"])
        loss2, tensors2 = run_reference(model, ids, case["P"])
        assert loss == loss2 and all(torch.equal(tensors[k], tensors2[k]) for k in tensors), \
            f"{cname}: reference is not bitwise reproducible"

        rot = model.model.rotary_emb
        inv_freq = rot.inv_freq.detach().float().cpu()
        attn_factor = float(rot.attention_scaling)

        cdir = os.path.join(out_root, cname)
        if os.path.exists(cdir):
            shutil.rmtree(cdir)
        mdir = os.path.join(cdir, "model")
        os.makedirs(mdir)
        model.save_pretrained(mdir, safe_serialization=True)
        with open(os.path.join(cdir, "tokens.json"), "w") as f:
            json.dump([int(t) for t in ids], f)
            f.write("\n")
        save_file(tensors, os.path.join(cdir, "reference.safetensors"),
                  metadata={"generator": "bench/hf_reference.py", "case": cname})
        meta = {
            "case": cname,
            "T": T,
            "position_offset": case["P"],
            "loss": loss,
            "loss_reduction": "mean over T-1 next-token targets (labels=input_ids, HF shift)",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "attn_implementation": "eager",
            "dtype": "float32",
            "rope_precision": case["rope_precision"],
            "rope_type": case["rope"]["rope_type"] if case["rope"] else "default",
            "config_form": config_form_name(),
            # HF's fp32 inv_freq buffer; each value is an exact f32 printed as a double
            "inv_freq": [float(x) for x in inv_freq.numpy().astype(np.float64)],
            "inv_freq_f32_hex": [format(int(x), "08x") for x in inv_freq.numpy().view(np.uint32)],
            "attention_factor": attn_factor,
            "seed": SEED,
            "threads": torch.get_num_threads(),
        }
        if case["rope"] and case["rope"]["rope_type"] == "yarn":
            meta["attention_factor_expected"] = 0.1 * math.log(case["rope"]["factor"]) + 1.0
            r, d = case["rope"], BASE["head_dim"]
            corr = lambda n: d * math.log(r["original_max_position_embeddings"] / (n * 2 * math.pi)) / (2 * math.log(ROPE_THETA))
            meta["yarn_correction_range"] = {
                "low_untruncated": corr(r["beta_fast"]), "high_untruncated": corr(r["beta_slow"]),
                "low": max(math.floor(corr(r["beta_fast"])), 0), "high": min(math.ceil(corr(r["beta_slow"])), d - 1)}
            assert abs(attn_factor - meta["attention_factor_expected"]) < 1e-12, attn_factor
        with open(os.path.join(cdir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        for dp, _, fns in os.walk(cdir):
            for fn in fns:
                os.chmod(os.path.join(dp, fn), 0o644)
        sizes = {fn: os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(cdir) for fn in fns}
        print(f"{cname}: loss={loss:.6f} attn_factor={attn_factor:.6f} files={sizes} total={sum(sizes.values())}")

    # config forms
    yarn_cfg_path = os.path.join(out_root, "yarn", "model", "config.json")
    if os.path.exists(yarn_cfg_path):
        with open(yarn_cfg_path) as f:
            written = json.load(f)
        forms = os.path.join(out_root, "config_forms")
        os.makedirs(forms, exist_ok=True)
        if "rope_parameters" in written:
            f5, f4 = written, yarn_4x_form(written)
        else:
            f4, f5 = written, yarn_5x_form(written)
            f5["transformers_version"] = "5.x (hand-written)"
        for name, d in (("yarn_5x.json", f5), ("yarn_4x.json", f4)):
            with open(os.path.join(forms, name), "w") as f:
                json.dump(d, f, indent=2, sort_keys=True)
                f.write("\n")
        # both forms must give the installed version the same rope (inv_freq, attention factor)
        ref = None
        for name in ("yarn_5x.json", "yarn_4x.json"):
            c = LlamaConfig.from_json_file(os.path.join(forms, name))
            r = LlamaForCausalLM(c).model.rotary_emb
            got = (r.inv_freq.clone(), float(r.attention_scaling))
            if ref is None:
                ref = got
            else:
                assert torch.equal(ref[0], got[0]) and ref[1] == got[1], f"{name} differs from 5.x form"
        print("config_forms: yarn_4x.json and yarn_5x.json load to identical inv_freq/attention factor")
    check_f32_recipe()
    return 0


def check_f32_recipe():
    """The f32 inv_freq recipe in np_llama_check.hf_f32_inv_freq (which the Rust fp32 mode
    follows) must equal HF's buffer bit for bit, also at Llama-3.1 / UltraLong scale."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from np_llama_check import hf_f32_inv_freq
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    big = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=14336, num_hidden_layers=1, vocab_size=128256)
    probes = {
        "llama3.1 (theta 5e5, factor 8, orig 8192)": (131072, {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        "default (theta 5e5)": (8192, None),
    }
    for s, n in ((128, "1M"), (256, "2M"), (512, "4M")):
        probes[f"UltraLong-{n} yarn s={s} beta 4/1"] = (8192 * s, {"rope_type": "yarn", "factor": float(s),
            "original_max_position_embeddings": 8192, "beta_fast": 4.0, "beta_slow": 1.0})
    for name, (maxpos, rope) in probes.items():
        kw = dict(big, max_position_embeddings=maxpos)
        if TF_MAJOR >= 5:
            kw["rope_parameters"] = dict(rope or {"rope_type": "default"}, rope_theta=500000.0)
        else:
            kw["rope_theta"] = 500000.0
            if rope:
                kw["rope_scaling"] = dict(rope)
        cfg = LlamaConfig(**kw)
        hf = LlamaRotaryEmbedding(cfg).inv_freq.numpy()
        mine = hf_f32_inv_freq(cfg.to_dict())
        same = np.array_equal(hf.view(np.int32), mine.view(np.int32))
        print(f"f32 inv_freq recipe vs HF, {name}: {'bitwise equal' if same else 'DIFFERS'}")
        assert same, name


if __name__ == "__main__":
    sys.exit(main())
