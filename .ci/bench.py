#!/usr/bin/env python3
"""The reward pass's ways of computing the G per-completion norms, side by side on random weights of Qwen2.5's
exact shapes, offline: python3 .ci/bench.py [--shapes tiny,0.5b,1.5b] [--parts reward,untied] [--reps 3].
Each is timed (median after a warm-up) and its peak memory taken, beside the floor: ONE batched
forward+backward of the same loss over the same tokens, what plain training pays. It lives beside the GPU
scripts that run it (.ci/gpu_check) so that vigor.py keeps to the method; it imports the norms from vigor.py.
Training logs the time of each part of a step (time/generate, time/reward, time/reference, time/update)."""
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vigor import (ConfigError, arg, grad_norms, lm_head_grad_norms, mean_nll, parse_command_line,  # noqa: E402
                   per_layer_grad_norms, print_table)

BENCH_SHAPES = {  # Qwen2.5's hidden, intermediate, layers, heads, kv heads, vocab; completion lengths
    "tiny": (64, 256, 2, 4, 2, 1000, (16, 64)),
    "0.5b": (896, 4864, 24, 14, 2, 151936, (128, 512)),
    "1.5b": (1536, 8960, 28, 12, 2, 151936, (256, 1024))}
BENCH_PARTS = ("reward", "untied")


@dataclass
class BenchSettings:
    shapes: str = arg("tiny", "comma-separated shapes: tiny (a CPU), 0.5b, 1.5b (Qwen2.5's, CUDA)")
    parts: str = arg("reward,untied", "comma-separated: reward (tied embeddings, as Qwen2.5 to 3B), untied")
    reps: int = arg(3, "timed calls after a warm-up call; the median is shown")


def random_model(shape, device, dtype, tied=True, attn="sdpa"):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    h, inter, layers, heads, kv, vocab, _ = BENCH_SHAPES[shape]
    arch = Qwen2Config(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                       rope_theta=1e6, tie_word_embeddings=tied, attn_implementation=attn, eos_token_id=0,
                       pad_token_id=0)
    with torch.device(device):
        return Qwen2ForCausalLM(arch).to(dtype).eval()


def timed(fn, reps, device):
    """(median s of `reps` calls after a warm-up call, peak GiB, last result)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, result = [], None
    for rep in range(reps + 1):
        if rep == 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return sorted(times[1:])[reps // 2], peak, result


def bench_reward(shape, device, dtype, reps, tied, G=8, prompt_len=128):
    """Each way to get G per-completion norms, side by side with the floor: ONE batched forward+backward of
    the same loss over the same tokens (what plain training pays). Last column: agreement with the authors'
    loop."""
    model = random_model(shape, device, dtype, tied, attn="eager" if device.type == "cpu" else "sdpa")
    lo, hi = BENCH_SHAPES[shape][6]
    seeded = torch.Generator().manual_seed(0)
    ids = torch.randint(1, BENCH_SHAPES[shape][5], (G, prompt_len + hi), generator=seeded)
    mask = torch.zeros_like(ids)
    for i, T in enumerate(torch.linspace(lo, hi, G).long().tolist()):
        ids[i, prompt_len + T:] = 0
        mask[i, prompt_len:prompt_len + T] = 1
    ids, mask = ids.to(device), mask.to(device)
    params = [p for p in model.parameters() if p.requires_grad]

    def nll(x, m):
        return mean_nll(model(input_ids=x, use_cache=False).logits, x, m)

    def floor():
        nll(ids, mask).sum().backward()
        model.zero_grad(set_to_none=True)

    def loop():  # the authors' way: batch 1, autograd.grad over all parameters
        norms = []
        for x, m in zip(ids, mask):
            k = int(m.nonzero().max()) + 1
            grads = torch.autograd.grad(nll(x[None, :k], m[None, :k]), params)
            norms.append(sum(g.float().square().sum() for g in grads).sqrt())
        return torch.stack(norms)
    methods = {"floor: one batched forward+backward": floor, "loop, batch 1 (the authors' way)": loop,
               "torch.func vmap, chunk_size 1": lambda: grad_norms(model, ids, mask, 1),
               "torch.func vmap, chunk_size 8": lambda: grad_norms(model, ids, mask, 8),
               "per-layer, one backward (per_layer)": lambda: per_layer_grad_norms(model, ids, mask),
               "LM-head-only closed form (approximation)": lambda: lm_head_grad_norms(model, ids, mask)}
    rows, ref = [], None
    for name, fn in methods.items():
        try:
            t, peak, norms = timed(fn, reps, device)
        except torch.OutOfMemoryError:
            t, peak, norms = float("nan"), float("nan"), None
            torch.cuda.empty_cache()
        ref = norms if name.startswith("loop") else ref
        diff = float("nan")
        if norms is not None and ref is not None:
            diff = ((norms.float() - ref.float()).abs() / ref.float()).max().item()
        rows.append([name, t * 1e3, peak, f"{diff:.1e}"])
    rows = [[n, t, t / rows[0][1], p, p / rows[0][2], d] for n, t, p, d in rows]
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print_table(f"reward pass, {shape} {'tied' if tied else 'untied'}, {dtype}, G={G}, prompt {prompt_len}, "
                f"completions {lo}..{hi} on {on}",
                ["method", "ms", "x floor", "peak GiB", "x floor mem", "max rel. diff vs loop"], rows)


def bench(argv):
    """The tables for each shape and part; medians after a warm-up, peak memory with the weights."""
    settings = parse_command_line(argv, "python3 .ci/bench.py", BenchSettings)[0]
    shapes, parts, reps = settings.shapes.split(","), settings.parts.split(","), settings.reps
    for name, given, valid in (("shapes", shapes, BENCH_SHAPES), ("parts", parts, BENCH_PARTS)):
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ConfigError(f"--{name}: unknown {unknown}; valid: {', '.join(valid)}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for shape in shapes:
        for part in parts:
            bench_reward(shape, device, dtype, reps, tied=part == "reward")


if __name__ == "__main__":
    try:
        bench(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
