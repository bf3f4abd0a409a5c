"""A PyTorch Hybrid Distill training step, written the way PyTorch code bases (FD, MaskAlign, MAE) write
one, to compare our JAX step with on the same card (``benchmarks/throughput.py`` runs it in a subprocess).

One step: a CLIP-like feature teacher and a MAE-like relation teacher (frozen, no grad) run on the full
image; the feature teacher's last-block CLS->patch attention (heads averaged) weights a multinomial draw of
K kept patches; the student sees CLS + the kept patches; losses: SmoothL1 (beta 2) between a linear head
on the student tokens and the layer-normed teacher tokens at the kept positions, plus the KL between the
relation teacher's and the student's attention distributions over the kept tokens at blocks 1..L-1
(0-based 0..L-2), averaged over layers; backward and AdamW. bf16 autocast on CUDA, fused scaled-dot-product
attention where no probabilities are needed, an explicit softmax where they are.

    python benchmarks/torch_peer.py --batch 256 --keep 0.5            # ViT-B/16, eager
    python benchmarks/torch_peer.py --batch 256 --keep 0.5 --compile  # torch.compile
    python benchmarks/torch_peer.py --preset tiny --device cpu --batch 4 --steps 2   # proves it runs

Prints one JSON line: impl, batch, keep, step_s, img_s, warmup_s, peak_gb, loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

# name -> (width, depth, heads, patch, image size)
PRESETS = {"b16": (768, 12, 12, 16, 224), "tiny": (32, 3, 2, 8, 32)}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep_logits: bool):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, d_head]
        logits = None
        if keep_logits:  # the probabilities are needed: explicit softmax, in fp32
            logits = torch.matmul(q, k.transpose(-2, -1)) / (d // self.heads) ** 0.5
            mixed = torch.matmul(torch.softmax(logits.float(), dim=-1).to(v.dtype), v)
        else:
            mixed = F.scaled_dot_product_attention(q, k, v)
        return self.out(mixed.transpose(1, 2).reshape(b, n, d)), logits


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, keep_logits: bool):
        y, logits = self.attn(self.norm1(x), keep_logits)
        x = x + y
        return x + self.mlp(self.norm2(x)), logits


class ViT(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, patch: int, image: int):
        super().__init__()
        self.embed = nn.Conv2d(3, width, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, images, kept=None, logit_layers=()):
        """Tokens [B, 1 + N or 1 + K, D] and {layer: attention logits} for ``logit_layers``."""
        patches = self.embed(images).flatten(2).transpose(1, 2) + self.pos[:, 1:]
        if kept is not None:
            patches = torch.gather(patches, 1, kept[..., None].expand(-1, -1, patches.shape[-1]))
        cls = (self.cls + self.pos[:, :1]).expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1)
        maps = {}
        for i, block in enumerate(self.blocks):
            x, logits = block(x, i in logit_layers)
            if logits is not None:
                maps[i] = logits
        return self.norm(x), maps


def kept_block(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows and columns ``index`` [B, K] of attention logits [B, H, N, N]: [B, H, K, K]."""
    b, h, n, _ = logits.shape
    k = index.shape[1]
    rows = torch.gather(logits, 2, index[:, None, :, None].expand(b, h, k, n))
    return torch.gather(rows, 3, index[:, None, None, :].expand(b, h, k, k))


def train_step(student, head, feature_teacher, relation_teacher, optimizer, images, keep_n, layers, autocast):
    b = images.shape[0]
    with autocast():
        with torch.no_grad():
            feats, last = feature_teacher(images, logit_layers=(len(feature_teacher.blocks) - 1,))
            cls_attn = torch.softmax(next(iter(last.values()))[:, :, 0, 1:].float(), dim=-1).mean(1)
            kept = torch.multinomial(cls_attn, keep_n)  # [B, K] patch indices, redundancy-weighted
            index = torch.cat([torch.zeros(b, 1, dtype=kept.dtype, device=kept.device), kept + 1], dim=1)
            width = feats.shape[-1]
            target = F.layer_norm(
                torch.gather(feats, 1, index[..., None].expand(-1, -1, width)).float(), (width,)
            )
            _, teacher_maps = relation_teacher(images, logit_layers=layers)
            teacher_probs = {
                i: torch.softmax(kept_block(m, index).float(), dim=-1) for i, m in teacher_maps.items()
            }
        tokens, student_maps = student(images, kept=kept, logit_layers=layers)
        feature_loss = F.smooth_l1_loss(head(tokens).float(), target, beta=2.0)
        relation_loss = 0.0
        for i in layers:
            log_student = torch.log_softmax(student_maps[i].float(), dim=-1)
            p = teacher_probs[i]
            kl = torch.sum(p * (torch.log(p.clamp_min(1e-30)) - log_student), dim=-1)  # [B, H, K+1]
            relation_loss = relation_loss + kl.mean()
        loss = feature_loss + relation_loss / len(layers)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="b16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--keep", type=float, default=0.5, help="kept fraction of the patches")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--compile", action="store_true", help="torch.compile the step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    width, depth, heads, patch, image = PRESETS[a.preset]
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    student = ViT(width, depth, heads, patch, image).to(device)
    feature_teacher = ViT(width, depth, heads, patch, image).to(device).eval().requires_grad_(False)
    relation_teacher = ViT(width, depth, heads, patch, image).to(device).eval().requires_grad_(False)
    head = nn.Linear(width, width).to(device)
    params = list(student.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if cuda else {}))
    keep_n = max(1, round((image // patch) ** 2 * a.keep))
    layers = tuple(range(depth - 1))
    step = torch.compile(train_step) if a.compile else train_step
    images = torch.randn(a.batch, 3, image, image, device=device)
    args = (student, head, feature_teacher, relation_teacher, optimizer, images, keep_n, layers, autocast)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step(*args)
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step(*args)
    sync()
    dt = (time.perf_counter() - t0) / a.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    out = dict(
        impl="torch-compile" if a.compile else "torch-eager",
        preset=a.preset,
        batch=a.batch,
        keep=a.keep,
        kept_tokens=keep_n,
        step_s=round(dt, 4),
        img_s=round(a.batch / dt, 1),
        warmup_s=round(warm, 1),
        peak_gb=round(peak, 1) if peak is not None else None,
        loss=float(loss.detach()),
    )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
