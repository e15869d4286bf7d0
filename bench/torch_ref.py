#!/usr/bin/env python3
"""PyTorch reference GPT trainer: the baseline that the project's engine is measured against.

It follows the same model and recipe as the original nanoGPT (pre-LayerNorm GPT-2 blocks,
tied embeddings, AdamW(0.9, 0.95) with decay on matrices only, warmup + cosine LR,
grad clipping at 1.0, bf16 autocast on GPU, fused SDPA attention) so that a timing of
this script is a fair stand-in for "what a user would run instead".

Modes
  bench  random tokens, fixed shapes: prints ms/iter, tokens/s and MFU.
  train  character-level training on a text file (90/10 split), evaluating like nanoGPT:
         prints each eval, then the best val loss and the wall time.
  sample nanoGPT's sample.py loop on a model of the given shape: num_samples sequences one after the
         other, each token from a forward pass over the whole (cropped) context, no KV cache;
         prints tokens/s.
  kernels the PyTorch counterparts of the engine's CUDA kernels, one at a time in bf16 at the given
         shapes (GPU only): one `KERNEL {json}` line each, named and measured as the engine's
         `cuda_kernels_bench` example prints them, so that the two can be compared line by line.

Every run prints one last line: `RESULT {json}`.
Examples
  python3 bench/torch_ref.py bench --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=12
  python3 bench/torch_ref.py train --text=data/shakespeare_char/input.txt   # the shakespeare_char recipe
  python3 bench/torch_ref.py kernels --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=12
  python3 bench/torch_ref.py train --text=data/shakespeare_char/input.txt --device=cpu --compile=0 \
      --eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
      --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0      # the README's CPU recipe
"""
import argparse, json, math, os, sys, time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, h, dropout, bias):
        super().__init__()
        self.h, self.dropout = h, dropout
        self.ln1 = nn.LayerNorm(d, bias=bias)
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)
        self.ln2 = nn.LayerNorm(d, bias=bias)
        self.fc = nn.Linear(d, 4 * d, bias=bias)
        self.fc_out = nn.Linear(4 * d, d, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))
        x = x + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(x)))))
        return x


class GPT(nn.Module):
    def __init__(self, vocab, block, L, H, D, dropout, bias):
        super().__init__()
        self.block = block
        self.wte = nn.Embedding(vocab, D)
        self.wpe = nn.Embedding(block, D)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(D, H, dropout, bias) for _ in range(L))
        self.ln_f = nn.LayerNorm(D, bias=bias)
        self.head = nn.Linear(D, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * L) if name.endswith(("proj.weight", "fc_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def n_params(self):  # nanoGPT's count: all parameters but the position embedding
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def forward(self, idx, targets=None):
        B, T = idx.shape
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_f(x)
        if targets is None:  # inference: the last position's logits only, as nanoGPT
            return self.head(x[:, [-1], :])
        logits = self.head(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature, top_k):
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.block else idx[:, -self.block:]
            logits = self(idx_cond)[:, -1, :] / temperature
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def flops_per_iter(n_params, L, H, D, T, tokens):
    # nanoGPT's estimate: 6N per token plus the attention term 12*L*H*(D/H)*T
    return (6 * n_params + 12 * L * H * (D // H) * T) * tokens


def make_optimizer(model, lr, wd, beta2, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), fused=device == "cuda")


def lr_at(it, a):
    if it < a.warmup_iters:
        return a.lr * (it + 1) / (a.warmup_iters + 1)
    if it >= a.lr_decay_iters:
        return a.min_lr
    ratio = (it - a.warmup_iters) / (a.lr_decay_iters - a.warmup_iters)
    return a.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (a.lr - a.min_lr)


def setup(a):
    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    amp = torch.autocast(dev, dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    return dev, amp


def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def bench(a):
    dev, amp = setup(a)
    model = GPT(a.vocab_size, a.block_size, a.n_layer, a.n_head, a.n_embd, 0.0, bool(a.bias)).to(a.device)
    opt = make_optimizer(model, 6e-4, 0.1, 0.95, dev)
    step = torch.compile(model) if a.compile else model
    x = torch.randint(a.vocab_size, (a.batch_size, a.block_size), device=a.device)
    y = torch.randint(a.vocab_size, (a.batch_size, a.block_size), device=a.device)

    def one():
        with amp:
            loss = step(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    for _ in range(a.warmup):
        one()
    sync(dev)
    warm_s = time.time() - t0
    t0 = time.time()
    for _ in range(a.iters):
        loss = one()
    sync(dev)
    dt = (time.time() - t0) / a.iters
    tokens = a.batch_size * a.block_size
    fl = flops_per_iter(model.n_params(), a.n_layer, a.n_head, a.n_embd, a.block_size, tokens)
    res = dict(mode="bench", device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
               compile=bool(a.compile), n_params=model.n_params(), batch_size=a.batch_size,
               block_size=a.block_size, ms_per_iter=round(dt * 1e3, 3), tokens_per_s=round(tokens / dt),
               tflops=round(fl / dt / 1e12, 2), mfu_h100_989=round(fl / dt / 989e12, 4),
               mfu_a100_312=round(fl / dt / 312e12, 4), warmup_s=round(warm_s, 2), loss=float(loss.detach()),
               peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None)
    print(f"{res['ms_per_iter']} ms/iter  {res['tokens_per_s']} tok/s  {res['tflops']} TFLOP/s")
    print("RESULT " + json.dumps(res))
    if a.profile:
        profile_steps(one, a.profile, dev)


def profile_steps(one, steps, dev):
    """Device time per step of each kernel over `steps` more steps (torch.profiler; on the CPU, each
    operator's own CPU time), as STEP_KERNEL lines, the largest first: the counterpart of the table
    examples/cuda_step_bench.rs prints for the engine's fused step."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one()
        sync(dev)
    rows = []
    for e in prof.key_averages():
        if dev == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((us / 1e3 / steps, e.count / steps, e.key))
    rows.sort(reverse=True)
    print(f"device time per step, by kernel, over {steps} profiled steps: {sum(r[0] for r in rows):.2f} ms")
    for ms, launches, name in rows:
        print("STEP_KERNEL " + json.dumps(dict(name=name[:100], launches_per_step=launches, ms_per_step=round(ms, 4))))


def train(a):
    dev, amp = setup(a)
    text = open(a.text, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}

    def batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - a.block_size, (a.batch_size,))
        x = torch.stack([d[i:i + a.block_size] for i in ix])
        y = torch.stack([d[i + 1:i + 1 + a.block_size] for i in ix])
        return x.to(a.device), y.to(a.device)

    model = GPT(len(chars), a.block_size, a.n_layer, a.n_head, a.n_embd, a.dropout, bool(a.bias)).to(a.device)
    opt = make_optimizer(model, a.lr, a.weight_decay, a.beta2, dev)
    step = torch.compile(model) if a.compile else model

    @torch.no_grad()
    def evaluate():
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = torch.zeros(a.eval_iters)
            for k in range(a.eval_iters):
                with amp:
                    losses[k] = step(*batch(split)).item()
            out[split] = losses.mean().item()
        model.train()
        return out

    t0 = time.time()
    best, history = float("inf"), []
    for it in range(a.max_iters + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, a)
        if it % a.eval_interval == 0:
            ev = evaluate()
            best = min(best, ev["val"])
            history.append((it, round(ev["train"], 4), round(ev["val"], 4), round(time.time() - t0, 1)))
            print(f"step {it}: train {ev['train']:.4f} val {ev['val']:.4f}  t={time.time() - t0:.1f}s", flush=True)
        if it == a.max_iters:
            break
        with amp:
            loss = step(*batch("train"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(dev)
    res = dict(mode="train", device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
               best_val=round(best, 4), wall_s=round(time.time() - t0, 1), iters=a.max_iters,
               ms_per_iter=round((time.time() - t0) / a.max_iters * 1e3, 2), history=history)
    print("RESULT " + json.dumps(res))


def sample(a):
    dev, amp = setup(a)
    model = GPT(a.vocab_size, a.block_size, a.n_layer, a.n_head, a.n_embd, 0.0, bool(a.bias)).to(a.device)
    model.eval()
    start = torch.zeros((1, 1), dtype=torch.long, device=a.device)
    t0 = time.time()
    with amp:
        for _ in range(a.num_samples):
            model.generate(start, a.max_new_tokens, a.temperature, a.top_k)
    sync(dev)
    dt = time.time() - t0
    tokens = a.num_samples * a.max_new_tokens
    res = dict(mode="sample", device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
               n_params=model.n_params(), num_samples=a.num_samples, max_new_tokens=a.max_new_tokens,
               seconds=round(dt, 3), tokens_per_s=round(tokens / dt, 1))
    print(f"{tokens} tokens in {dt:.2f} s: {res['tokens_per_s']} tokens/s")
    print("RESULT " + json.dumps(res))


def kernels(a):
    """Each op alone, as a training step runs it: timed between two CUDA events after a write of 512 MiB
    has evicted its inputs from L2, the median of `iters` runs after `warmup`. gbps counts the bytes the
    op must read and write at least (the same count as the engine's benchmark); tflops, the products'
    multiply-adds times two (attention's causal half only). Backward passes go through autograd, as in
    training."""
    dev, _ = setup(a)
    if dev != "cuda":
        sys.exit("torch_ref.py kernels: needs a CUDA GPU (torch.cuda.is_available() is False)")
    B, T, C, NH, V = a.batch_size, a.block_size, a.n_embd, a.n_head, a.vocab_size
    N, H, bf = B * T, 4 * C, torch.bfloat16
    XB, F32B = 2, 4
    flush = torch.empty(512 * 2**20, dtype=torch.int8, device="cuda")
    times = {}

    def rand(*shape, scale=1.0, grad=False):
        return ((torch.rand(*shape, device="cuda") * 2 - 1) * scale).to(bf).requires_grad_(grad)

    def report(name, fn, nbytes, flops=None):
        for _ in range(a.warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(a.iters)]
        for start, end in events:  # all queued before the first wait: the host keeps ahead of the GPU
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        ms = sorted(start.elapsed_time(end) for start, end in events)[a.iters // 2]
        line = dict(name=name, ms=round(ms, 4), gbps=round(nbytes / (ms * 1e-3) / 1e9, 1))
        if flops is not None:
            line["tflops"] = round(flops / (ms * 1e-3) / 1e12, 1)
        times[name] = line["ms"]
        print("KERNEL " + json.dumps(line), flush=True)

    def grad(out, inputs, dout):
        return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)

    # token and position embeddings
    idx = torch.randint(V, (B, T), device="cuda")
    wte, wpe = rand(V, C, scale=0.02, grad=True), rand(T, C, scale=0.02, grad=True)
    dout = rand(B, T, C)
    with torch.no_grad():
        report("encoder_fwd", lambda: F.embedding(idx, wte) + wpe[:T], N * 4 + 2 * N * C * XB + T * C * XB)
    report("encoder_bwd", grad(F.embedding(idx, wte) + wpe[:T], (wte, wpe), dout),
           N * 4 + N * C * XB + 2 * N * C * F32B + 2 * T * C * F32B)

    # layer norms over (N, C)
    x, branch = rand(N, C, grad=True), rand(N, C)
    w, b = rand(C, grad=True), rand(C, grad=True)
    stats = 2 * N * F32B
    with torch.no_grad():
        report("layernorm_fwd", lambda: F.layer_norm(x, (C,), w, b), 2 * N * C * XB + 2 * C * XB + stats)

        def residual_layernorm():
            r = x + branch
            return r, F.layer_norm(r, (C,), w, b)
        report("residual_layernorm_fwd", residual_layernorm, 4 * N * C * XB + 2 * C * XB + stats)
    report("layernorm_bwd", grad(F.layer_norm(x, (C,), w, b), (x, w, b), dout.view(N, C)),
           3 * N * C * XB + C * XB + stats + 4 * C * F32B)

    # the MLP's hidden activations, (N, 4C)
    pre, dpost = rand(N, H, scale=3.0, grad=True), rand(N, H)
    with torch.no_grad():
        report("gelu_fwd", lambda: F.gelu(pre, approximate="tanh"), 2 * N * H * XB)
        # the gradient and the recomputed output, as the engine's GELU backward pass
        report("gelu_bwd", lambda: (torch.ops.aten.gelu_backward(dpost, pre, approximate="tanh"),
                                    F.gelu(pre, approximate="tanh")), 4 * N * H * XB)
    # the MLP's first linear layer, (N, C) -> (N, 4C), its product alone (the bias is timed below)
    fc_w = rand(H, C, scale=0.02, grad=True)
    mm_flops = 2 * N * C * H
    with torch.no_grad():
        report("matmul_fc_fwd", lambda: F.linear(x, fc_w), (N * C + H * C + N * H) * XB, mm_flops)
    report("matmul_fc_bwd", grad(F.linear(x, fc_w), (x, fc_w), dpost),
           (2 * N * C + H * C + N * H) * XB + 2 * H * C * F32B, 2 * mm_flops)
    post, fc_bias = rand(N, H), rand(H)
    report("bias_add", lambda: post.add_(fc_bias), 2 * N * H * XB + H * XB)
    report("bias_bwd", lambda: dpost.sum(0), N * H * XB + 2 * H * F32B)
    fc_b = rand(H)
    with torch.no_grad():
        report("matmul_fc_bias_fwd", lambda: F.linear(x, fc_w, fc_b), (N * C + H * C + N * H + H) * XB, mm_flops)

    # causal self-attention from qkv (B, T, 3C), out as (B, T, C)
    qkv = rand(B, T, 3 * C, grad=True)

    def attention():
        q, k, v = qkv.view(B, T, 3, NH, C // NH).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    fwd_flops = 2 * B * NH * T * T * (C // NH)
    rows = B * NH * T * F32B
    with torch.no_grad():
        report("attention_fwd", attention, 4 * N * C * XB + rows, fwd_flops)
    report("attention_bwd", grad(attention(), qkv, dout), 8 * N * C * XB + rows, 2.5 * fwd_flops)

    # the classifier's loss and its gradient, (N, V) logits, in float32 as the model above computes it
    logits, targets = rand(N, V, grad=True), torch.randint(V, (N,), device="cuda")
    report("cross_entropy", lambda: torch.autograd.grad(F.cross_entropy(logits.float(), targets), logits),
           2 * N * V * XB + N * 8)

    # one AdamW step over the model's parameters (float32 master weights, fused); the engine's step also
    # writes the weights' bf16 copy, which autocast makes in each forward instead
    model = GPT(V, T, a.n_layer, NH, C, 0.0, bool(a.bias)).to("cuda")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = make_optimizer(model, 6e-4, 0.1, 0.95, dev)
    n_params = sum(p.numel() for p in model.parameters())
    report("adamw", opt.step, 7 * n_params * F32B)

    res = dict(mode="kernels", device=torch.cuda.get_device_name(), torch=torch.__version__,
               batch_size=B, block_size=T, n_embd=C, n_head=NH, vocab_size=V, adamw_params=n_params, ms=times)
    print("RESULT " + json.dumps(res))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["bench", "train", "sample", "kernels"])
    defaults = dict(  # the shakespeare_char recipe; bench overrides shapes on the command line
        device="cuda" if torch.cuda.is_available() else "cpu", compile=1, seed=1337, threads=0,
        n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, bias=0,
        lr=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=5000, lr_decay_iters=5000,
        beta2=0.99, weight_decay=0.1, eval_interval=250, eval_iters=200,
        vocab_size=50304, warmup=10, iters=30, profile=0, text="",
        num_samples=10, max_new_tokens=500, temperature=0.8, top_k=200)
    for k, v in defaults.items():
        p.add_argument(f"--{k}", type=type(v), default=v)
    a = p.parse_args()
    {"bench": bench, "train": train, "sample": sample, "kernels": kernels}[a.mode](a)


if __name__ == "__main__":
    main()
