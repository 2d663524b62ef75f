"""Benchmark of vigor.py's costs, offline, on random weights of exact Qwen2.5 shapes (no hub needed).

    python bench_vigor.py                         # CPU: a small shape, every method, seconds
    python bench_vigor.py --shapes 0.5b,1.5b      # CUDA: the issue's shapes, reward + generation + RL step

Reward pass: per-completion gradient norms of G completions (prompt 128 tokens, completion lengths evenly
spread over the shape's range), each method side by side against the floor = ONE batched forward+backward
of the same loss over the same tokens (what plain training would pay). Times are medians of --reps runs
after a warm-up; peak memory is torch.cuda.max_memory_allocated (weights included). Generation: new
tokens/s for 64 sequences, dynamic vs static (compiled) KV cache. RL step: vigor.rl_step on 8 prompts x 8
completions, time split generate / reward / reference / update.
"""
import argparse
import statistics
import time

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

import vigor

SHAPES = {  # Qwen2.5 configs (hidden, intermediate, layers, heads, kv heads); vocab 151936, tied for <= 3B
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, lengths=(16, 64)),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, lengths=(128, 512)),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, lengths=(256, 1024)),
}


def random_model(shape, device, dtype, tied=True, attn="sdpa"):
    spec = dict(SHAPES[shape])
    spec.pop("lengths")
    cfg = Qwen2Config(**spec, max_position_embeddings=4096, tie_word_embeddings=tied, rope_theta=1e6,
                      attn_implementation=attn, eos_token_id=0, pad_token_id=0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    return model


def group_batch(shape, G, prompt_len, device, seed=0):
    lo, hi = SHAPES[shape]["lengths"]
    lengths = torch.linspace(lo, hi, G).long()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SHAPES[shape]["vocab_size"], (G, prompt_len + hi), generator=g)
    mask = torch.zeros_like(ids)
    for i, T in enumerate(lengths.tolist()):
        ids[i, prompt_len + T:] = 0
        mask[i, prompt_len:prompt_len + T] = 1
    return ids.to(device), mask.to(device)


def floor(model, ids, mask):
    """One batched forward+backward of sum_b l_b: plain training's cost for the same tokens."""
    model.zero_grad(set_to_none=True)
    w = mask[:, 1:].float()
    loss = (-(vigor.token_logps(model(input_ids=ids, use_cache=False).logits, ids) * w).sum(1) / w.sum(1)).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)


def loop(model, ids, mask):
    """The authors' way: batch 1, autograd.grad over all parameters, one completion at a time."""
    params, out = [p for p in model.parameters() if p.requires_grad], []
    for row, m in zip(ids, mask):
        n = int(m.nonzero().max()) + 1
        x, w = row[:n][None], m[1:n].float()
        loss = -(vigor.token_logps(model(input_ids=x, use_cache=False).logits, x)[0] * w).sum() / w.sum()
        out.append(sum(g.float().square().sum() for g in torch.autograd.grad(loss, params)).sqrt())
    return torch.stack(out)


def timed(fn, reps, device):
    """(median seconds, peak GiB, last result) after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, result = [], None
    for _ in range(reps):
        t = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, result


def reward_table(shape, device, dtype, reps, tied, G=8, prompt_len=128):
    model = random_model(shape, device, dtype, tied=tied, attn="eager" if device.type == "cpu" else "sdpa")
    ids, mask = group_batch(shape, G, prompt_len, device)
    methods = {"floor: one batched forward+backward": lambda: floor(model, ids, mask),
               "loop, batch 1 (the authors' way)": lambda: loop(model, ids, mask),
               "torch.func vmap, chunk_size 1": lambda: vigor.grad_norms(model, ids, mask, 1),
               "torch.func vmap, chunk_size 8": lambda: vigor.grad_norms(model, ids, mask, 8),
               "per-layer, one backward (per_layer)": lambda: vigor.per_layer_grad_norms(model, ids, mask),
               "LM-head-only closed form (approximation)": lambda: vigor.lm_head_grad_norms(model, ids, mask)}
    rows, results = [], {}
    for name, fn in methods.items():
        try:
            t, peak, results[name] = timed(fn, reps, device)
            rows.append([name, t * 1e3, peak])
        except torch.OutOfMemoryError:
            rows.append([name, float("nan"), float("nan")])
            torch.cuda.empty_cache()
    base_t, base_m = rows[0][1], rows[0][2]
    ref = results.get("loop, batch 1 (the authors' way)")
    print(f"\nreward pass, {shape} {'tied' if tied else 'untied'}, {dtype}, G={G}, prompt {prompt_len}, completions "
          f"{SHAPES[shape]['lengths'][0]}..{SHAPES[shape]['lengths'][1]} on {device_name(device)}")
    print("| method | ms | x floor | peak GiB | x floor mem | max rel. diff vs loop |\n|---|---|---|---|---|---|")
    for name, t, peak in rows:
        r = results.get(name)
        diff = ((r.float() - ref.float()).abs() / ref.float()).max().item() if r is not None and ref is not None \
            and "floor" not in name else float("nan")
        print(f"| {name} | {t:.1f} | {t / base_t:.2f} | {peak:.1f} | {peak / base_m:.2f} | {diff:.1e} |")


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def generation_table(shape, device, dtype, batch=64, new_tokens=256, prompt_len=128):
    model = random_model(shape, device, dtype)
    ids = torch.randint(1, SHAPES[shape]["vocab_size"], (batch, prompt_len), device=device)
    print(f"\ngeneration, {shape}, {batch} sequences x {new_tokens} new tokens, on {device_name(device)}")
    print("| cache | first call s | s | new tokens/s |\n|---|---|---|---|")
    for cache in ("dynamic", "static"):
        gen = GenerationConfig(do_sample=True, temperature=0.9, top_k=50, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None,
                               **({"cache_implementation": "static"} if cache == "static" else {}))
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        sync()
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        sync()
        s = time.perf_counter() - t
        print(f"| {cache} | {first:.2f} | {s:.2f} | {batch * new_tokens / s:,.0f} |")
    del model


def rl_step_table(shape, device, dtype, static_cache, steps=3):
    """Whole RL steps: 8 prompts x 8 completions up to the shape's longest completion, per_layer reward."""
    model = random_model(shape, device, dtype)
    ref = random_model(shape, device, dtype)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
    tok = vigor.char_tokenizer(SHAPES[shape]["vocab_size"])
    cfg = vigor.make_config({"num_generations": 8, "prompts_per_step": 8, "max_completion_length":
                             SHAPES[shape]["lengths"][1], "grad_norm_method": "per_layer", "static_cache": static_cache,
                             "micro_batch_size": 16, "lr": 1e-6})
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    prompts = [vigor.synthetic_split("train")[i]["prompt"] * 12 for i in range(8)]  # ~100 characters
    print(f"\nRL step, {shape}, 8 prompts x 8 completions up to {cfg.max_completion_length} tokens, "
          f"static_cache={static_cache}, on {device_name(device)} (first step = warm-up, not shown)")
    print("| step | total s | generate s | reward s | reference s | update s | mean length | gen tokens/s |"
          "\n|---|---|---|---|---|---|---|---|")
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        m, ro, _ = vigor.rl_step(cfg, model, ref, tok, opt, sched, prompts, None)
        if step:
            print(f"| {step} | {m['step_time']:.2f} | {m['time/generate']:.2f} | {m['time/reward']:.2f} | "
                  f"{m['time/reference']:.2f} | {m['time/update']:.2f} | {m['completions/mean_length']:.0f} | "
                  f"{m['gen/tokens_per_s']:,.0f} |")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny", help="comma-separated: tiny, 0.5b, 1.5b")
    p.add_argument("--parts", default="reward,untied,generation,step", help="which tables to print")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--static_cache", action="store_true", help="RL step with the static compiled cache")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = args.parts.split(",")
    for shape in args.shapes.split(","):
        if "reward" in parts:
            reward_table(shape, device, dtype, args.reps, tied=True)
        if "untied" in parts:
            reward_table(shape, device, dtype, args.reps, tied=False)
        if "generation" in parts and shape != "1.5b":
            generation_table(shape, device, dtype)
        if "step" in parts and shape != "1.5b":
            rl_step_table(shape, device, dtype, args.static_cache)


if __name__ == "__main__":
    main()
