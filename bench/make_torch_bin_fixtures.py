#!/usr/bin/env python3
"""Write the PyTorch state-dict fixtures of tests/torch_bin.rs (tests/fixtures/torch_bin/).

Each fixture directory holds weights as real PyTorch writes them (torch.save, or transformers'
save_pretrained(safe_serialization=False)) and, beside them, `expected.safetensors`: every tensor
as f32, converted by torch itself and written with safetensors.numpy, so the Rust reader is
checked against PyTorch's own reading of the same file, not against itself.

Run once, in a throwaway venv (CI has no torch; the tests read the committed files only):
    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch numpy safetensors "transformers<5"
    /tmp/tv/bin/python bench/make_torch_bin_fixtures.py tests/fixtures/torch_bin

Fixtures:
  f32/        OrderedDict with `_metadata` (as Module.state_dict() returns): a tied pair on one
              storage (two tensor objects), a slice with a storage offset (its whole storage is
              saved), a 1-D, a 0-D, an empty tensor, a [1, 4] with a non-standard stride on its
              size-1 dimension, an nn.Parameter (keep_vars=True)
  bf16/, f16/ the same kinds of tensors in bf16 and f16 (f16 with a subnormal and an infinity)
  protocol4/  torch.save(..., pickle_protocol=4): FRAME, MEMOIZE, STACK_GLOBAL, SHORT_BINUNICODE
  sharded/    a tiny LlamaForCausalLM in bf16 saved by transformers' save_pretrained with
              safe_serialization=False and a small max_shard_size: pytorch_model-0000i-of-0000N.bin
              + pytorch_model.bin.index.json + config.json, tied embeddings included;
              sharded.logits.json: transformers' f32 logits of those weights for a few tokens
  refused/    files that must be refused with a clear error:
              evil.bin        a torch-layout zip whose data.pkl calls os.system (protocol 2)
              transposed.bin  a non-contiguous view (a transpose)
              int64.bin       an int64 tensor (we read floating-point tensors only)
              legacy.bin      the pre-1.6 non-zip format (_use_new_zipfile_serialization=False)
"""

import collections
import json
import os
import shutil
import sys
import zipfile

import numpy as np
import torch
from safetensors.numpy import save_file


def expected(path, sd):
    """f32 values of every tensor of `sd`, as PyTorch reads them, into a safetensors file."""
    arrays = {k: v.detach().float().contiguous().numpy().copy() for k, v in sd.items()}
    save_file(arrays, path)


def with_metadata(items):
    """An OrderedDict carrying `_metadata`, as nn.Module.state_dict() returns."""
    sd = collections.OrderedDict(items)
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("model", {"version": 2})])
    return sd


def kinds(dtype, g):
    """One state dict holding every tensor layout the reader must honour, in `dtype`."""
    embed = torch.randn(5, 4, generator=g).to(dtype)
    big = torch.randn(6, 4, generator=g).to(dtype)
    return with_metadata(
        [
            ("model.embed_tokens.weight", embed),
            # Tied: a second tensor object on the same storage (state_dict detaches each).
            ("lm_head.weight", embed.detach()),
            # Rows 2..5 of a bigger tensor: storage offset 8, the whole storage is saved.
            ("model.layers.0.self_attn.q_proj.weight", big[2:5]),
            ("model.norm.weight", torch.randn(4, generator=g).to(dtype)),
            ("scale", torch.tensor(0.375, dtype=dtype)),
            ("empty", torch.zeros(0, 4, dtype=dtype)),
            # Shape [1, 4], stride (1, 1): contiguous, though not the canonical stride (4, 1).
            ("row", torch.randn(4, 1, generator=g).to(dtype).t()),
            ("param", torch.nn.Parameter(torch.randn(2, 3, generator=g).to(dtype))),
        ]
    )


def save(sd, path, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(sd, path, **kw)


def main(out):
    if os.path.isdir(out):
        shutil.rmtree(out)
    g = torch.Generator().manual_seed(20260101)

    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)]:
        sd = kinds(dtype, g)
        if dtype == torch.float16:
            sd["special"] = torch.tensor([2.0**-24, float("inf"), -0.0, 65504.0], dtype=dtype)
        row = sd["row"]
        assert row.stride() == (1, 1) and row.is_contiguous(), row.stride()
        assert sd["model.layers.0.self_attn.q_proj.weight"].storage_offset() == 8
        save(sd, f"{out}/{name}/pytorch_model.bin")
        expected(f"{out}/{name}/expected.safetensors", sd)

    sd = kinds(torch.float32, g)
    save(sd, f"{out}/protocol4/pytorch_model.bin", pickle_protocol=4)
    expected(f"{out}/protocol4/expected.safetensors", sd)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    cfg = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(f"{out}/sharded", safe_serialization=False, max_shard_size=1200)
    os.remove(f"{out}/sharded/generation_config.json")
    assert not os.path.exists(f"{out}/sharded/pytorch_model.bin")
    expected(f"{out}/sharded.expected.safetensors", model.state_dict())
    # transformers' logits of the same (bf16-rounded) weights computed in f32, eager attention:
    # what our loader must reproduce after reading the .bin shards.
    f32 = model.float().eval()
    f32.config._attn_implementation = "eager"
    tokens = [1, 5, 3, 14, 0, 9, 2]
    with torch.no_grad():
        logits = f32(torch.tensor([tokens])).logits[0]
    with open(f"{out}/sharded.logits.json", "w") as f:
        json.dump({"tokens": tokens, "logits": [float(x) for x in logits.flatten()]}, f)

    refused = f"{out}/refused"
    os.makedirs(refused)
    # A pickle that would run a shell command if unpickled by Python, in torch's archive layout.
    evil = b"\x80\x02cos\nsystem\nq\x00X\x0a\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03."
    with zipfile.ZipFile(f"{refused}/evil.bin", "w", zipfile.ZIP_STORED) as z:
        z.writestr("evil/data.pkl", evil)
        z.writestr("evil/byteorder", "little")
        z.writestr("evil/version", "3\n")
    save({"w": torch.randn(3, 4, generator=g).t()}, f"{refused}/transposed.bin")
    save({"ids": torch.arange(3)}, f"{refused}/int64.bin")
    save({"w": torch.ones(2)}, f"{refused}/legacy.bin", _use_new_zipfile_serialization=False)

    total = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs
    )
    print(json.dumps({"out": out, "bytes": total}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/torch_bin")
