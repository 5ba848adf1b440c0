"""A PyTorch reference of memory-augmented models (the memory-transformer trainer's adapter mode, as
../shared/notes/seed-origins.md describes it, with tokenmill's documented routing semantics), and
checkpoints in the trainer's layout (config.yaml + model.safetensors) with random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.numpy import save_file


def random_memory(cfg, memory: dict, seed: int = 0, prefix: str = "") -> dict:
    """Trainer-named tensors for a tiny base config `cfg` (HF config) and a memory section."""
    rng = np.random.default_rng(seed)
    E, L = cfg.hidden_size, cfg.num_hidden_layers
    H = memory.get("memory_num_heads") or cfg.num_attention_heads
    KVH = memory.get("memory_num_kv_heads") or cfg.num_key_value_heads
    hd = E // H
    QD, KD = H * hd, KVH * hd
    layers = layer_indices(memory, L)
    banks = bank_assignments(memory, layers)
    N = memory["num_memory_tokens"]
    chaptered = memory.get("use_chapters", False)
    t = {}

    def f(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    for b in sorted(set(banks.values())):
        root = f"memory_banks.{b}." + ("base_bank." if chaptered else "")
        if memory.get("use_low_rank_memory"):
            r = memory["memory_rank"]
            t[root + "A"], t[root + "B"] = f(N, r, scale=0.5), f(E, r, scale=0.5)
        else:
            t[root + "memory"] = f(N, E)
    for layer in layers:
        a = f"memory_adapters.{layer}."
        t[a + "memory_layernorm.weight"] = 1.0 + f(E, scale=0.1)
        shapes = {"q": (QD, E), "k": (KD, E), "v": (KD, E), "o": (E, QD)}
        for p, (n_out, n_in) in shapes.items():
            if memory.get("use_low_rank_projections"):
                r = memory["projection_rank"]
                t[a + f"memory_attn.{p}_down.weight"] = f(r, n_in, scale=n_in ** -0.5)
                t[a + f"memory_attn.{p}_up.weight"] = f(n_out, r, scale=r ** -0.5 * (0.5 if p == "o" else 1.5))
            else:
                t[a + f"memory_attn.{p}_proj.weight"] = f(n_out, n_in, scale=n_in ** -0.5 * (0.5 if p == "o" else 1.5))
        if chaptered:
            t[f"routers.{layer}.router.weight"] = f(memory["num_chapters"], E, scale=0.5)
            t[f"routers.{layer}.router.bias"] = f(memory["num_chapters"], scale=0.5)
    return {prefix + k: v for k, v in t.items()}


def layer_indices(memory: dict, n_layer: int) -> list:
    placement = memory.get("memory_layer_placement", "all")
    if placement == "custom":
        return sorted(memory["memory_layer_indices"])
    if placement == "every_n":
        return list(range(0, n_layer, memory["memory_layer_n"]))
    if placement == "first_k":
        return list(range(memory["memory_layer_k"]))
    if placement == "last_k":
        return list(range(n_layer - memory["memory_layer_k"], n_layer))
    return list(range(n_layer))


def bank_assignments(memory: dict, layers: list) -> dict:
    sharing = memory.get("memory_sharing", "shared")
    if sharing == "per_layer":
        return {layer: i for i, layer in enumerate(layers)}
    if sharing == "every_k_layers":
        return {layer: i // memory["memory_sharing_k"] for i, layer in enumerate(layers)}
    return {layer: 0 for layer in layers}


def write_checkpoint(directory: Path, cfg, memory: dict, tensors: dict, base_tensors: dict | None = None) -> Path:
    """A trainer checkpoint directory; base_tensors (frozen base weights) are saved beside the memory."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model": {"num_layers": cfg.num_hidden_layers, "hidden_dim": cfg.hidden_size}, "memory": memory}
    (directory / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    save_file({**tensors, **(base_tensors or {})}, str(directory / "model.safetensors"))
    return directory


class MemoryReference:
    """Forward hooks on an HF model's decoder layers that add the memory layers' output, routed per
    position with tokenmill's semantics: prompt_len is the length of the sequence's first pass."""

    def __init__(self, hf_model, memory: dict, tensors: dict, strategy: str, top_k: int, window: int = 128):
        self.model, self.m, self.strategy, self.top_k, self.window = hf_model, memory, strategy, top_k, window
        self.t = {k: torch.tensor(v, dtype=torch.float64) for k, v in tensors.items()}
        cfg = hf_model.config
        self.E = cfg.hidden_size
        self.H = memory.get("memory_num_heads") or cfg.num_attention_heads
        self.KVH = memory.get("memory_num_kv_heads") or cfg.num_key_value_heads
        self.hd = self.E // self.H
        self.layers = layer_indices(memory, cfg.num_hidden_layers)
        self.banks = bank_assignments(memory, self.layers)
        self.prompt_len = None

    def bank(self, b: int) -> torch.Tensor:
        root = f"memory_banks.{b}." + ("base_bank." if self.m.get("use_chapters") else "")
        if root + "memory" in self.t:
            mem = self.t[root + "memory"]
        else:
            mem = self.t[root + "A"] @ self.t[root + "B"].T
        shared = self.m.get("num_shared_chapters", 0)
        if self.m.get("normalize_shared_routed_before_mixing") and shared > 0 and self.top_k > 0:
            eps = float(self.m.get("shared_routed_norm_eps", 1e-6))
            mem = mem / torch.sqrt((mem * mem).mean(-1, keepdim=True) + eps)
        return mem

    def proj(self, layer: int, p: str, x: torch.Tensor) -> torch.Tensor:
        a = f"memory_adapters.{layer}.memory_attn."
        if a + f"{p}_proj.weight" in self.t:
            return x @ self.t[a + f"{p}_proj.weight"].T
        return (x @ self.t[a + f"{p}_down.weight"].T) @ self.t[a + f"{p}_up.weight"].T

    def attend(self, layer: int, q: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        """q [H*hd] against memory rows mem [n, E]: the concatenated heads' outputs [H*hd]."""
        k = self.proj(layer, "k", mem).reshape(-1, self.KVH, self.hd)
        v = self.proj(layer, "v", mem).reshape(-1, self.KVH, self.hd)
        rep = self.H // self.KVH
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)   # [n, H, hd]
        qh = q.reshape(self.H, self.hd)
        scores = torch.einsum("hd,nhd->hn", qh, k) * self.hd ** -0.5
        p = torch.softmax(scores, dim=-1)
        return torch.einsum("hn,nhd->hd", p, v).reshape(-1)

    def select(self, probs: torch.Tensor):
        C, S = probs.shape[0], self.m.get("num_shared_chapters", 0)
        p = probs.clone()
        p[:S] = 0
        p = p / p.sum().clamp_min(1e-12)
        k = min(self.top_k, C - S)
        w, idx = torch.topk(p, k)
        w = w / w.sum().clamp_min(1e-12)
        return idx.tolist(), w

    def memory_output(self, layer: int, h: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """The memory layer's addition for one position's hidden state h [E]."""
        mem = self.bank(self.banks[layer])
        g = self.t[f"memory_adapters.{layer}.memory_layernorm.weight"]
        hn = h / torch.sqrt((h * h).mean() + 1e-6) * g
        q = self.proj(layer, "q", hn)
        if not self.m.get("use_chapters"):
            return self.proj(layer, "o", self.attend(layer, q, mem))
        C, S = self.m["num_chapters"], self.m.get("num_shared_chapters", 0)
        tpc = mem.shape[0] // C
        factor = float(self.m.get("routed_scaling_factor", 1.0))
        wr, br = self.t[f"routers.{layer}.router.weight"], self.t[f"routers.{layer}.router.bias"]
        probs = torch.softmax(pooled @ wr.T + br, dim=-1)
        idx, w = self.select(probs)
        chapter = lambda c: mem[c * tpc:(c + 1) * tpc]   # noqa: E731
        if self.strategy == "token":
            out = torch.zeros(self.H * self.hd, dtype=torch.float64)
            if S:
                out = out + self.attend(layer, q, torch.cat([chapter(c) for c in range(S)]))
            for c, wc in zip(idx, w):
                out = out + factor * wc * self.attend(layer, q, chapter(c))
            return self.proj(layer, "o", out)
        chosen = [(c, torch.tensor(1.0, dtype=torch.float64)) for c in range(S)]
        chosen += [(c, wc * factor if S else wc) for c, wc in zip(idx, w)]
        if S:
            total = sum(wc for _, wc in chosen).clamp_min(1e-12)
            chosen = [(c, wc / total) for c, wc in chosen]
        sel = torch.cat([chapter(c) * wc for c, wc in chosen])
        return self.proj(layer, "o", self.attend(layer, q, sel))

    def pooled(self, hs: torch.Tensor, p: int) -> torch.Tensor:
        P, W = self.prompt_len, self.window
        if self.strategy == "token":
            return hs[p]
        if self.strategy == "sequence" or (self.strategy == "hybrid" and p < P):
            return hs[:P].mean(0)
        return hs[max(0, p - W + 1):p + 1].mean(0)

    def hook(self, layer: int):
        def fn(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hs = hidden[0].to(torch.float64)
            add = torch.stack([self.memory_output(layer, hs[p], self.pooled(hs, p) if self.m.get("use_chapters") else None)
                               for p in range(hs.shape[0])])
            new = (hs + add).to(hidden.dtype).unsqueeze(0)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return fn

    @torch.no_grad()
    def logits(self, ids: list, prompt_len: int) -> np.ndarray:
        """Logits [len(ids), vocab] of the whole sequence, its first pass being ids[:prompt_len]."""
        self.prompt_len = prompt_len
        blocks = self.model.model.layers
        handles = [blocks[layer].register_forward_hook(self.hook(layer)) for layer in self.layers]
        try:
            out = self.model(torch.tensor([ids]), use_cache=False).logits[0]
        finally:
            for h in handles:
                h.remove()
        return out.double().numpy()

    def greedy(self, prompt: list, n: int) -> list:
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(np.argmax(self.logits(ids, len(prompt))[-1])))
        return ids[len(prompt):]
