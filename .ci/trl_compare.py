#!/usr/bin/env python3
"""vigor.py against stock TRL GRPOTrainer on the fine-tuned regime at its calibrated settings (tiny_configs/sft.yaml,
lr 2e-5, 16 prompts x 8 per step, 100 steps), with the same settings and the same reward functions (gt, VIGOR through
vigor.TRLReward, self-certainty), per seed; held-out greedy accuracy on the 500 test problems, graded by vigor.grade,
after each trainer's run from the same warm start.
Usage: python3 .ci/trl_compare.py OUT_DIR [--seeds 7,8,9] [--rewards gt,vigor,self_certainty]"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vigor  # noqa: E402


def trl_run(cfg, reward, seed, out):
    """TRL 1.16 GRPOTrainer with vigor.py's defaults spelled out (TRL's own defaults differ: beta 0, top_k 0,
    gradient checkpointing on, and bf16, which applies on a CPU too: vigor.py computes in float32 there)."""

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    folder = vigor.tiny_base_model(cfg)
    policy, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompts, answers = vigor.load_prompts(cfg.train_data)
    args = GRPOConfig(
        output_dir=out, seed=seed, max_steps=cfg.steps, num_generations=cfg.num_generations,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations, gradient_accumulation_steps=1,
        learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio, weight_decay=0.0,
        beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
        num_iterations=cfg.num_iterations, max_grad_norm=cfg.max_grad_norm, scale_rewards="group",
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, mask_truncated_completions=False, gradient_checkpointing=False,
        bf16=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True)

    def gt(prompts, completions, answer, **kwargs):  # the gold-answer reward, graded like vigor.py's
        return [float(vigor.is_correct(c, a)) for c, a in zip(completions, answer)]
    rewards = {"gt": gt, "vigor": vigor.TRLReward(policy, tok, args),
               "self_certainty": vigor.TRLReward(policy, tok, args, reward="self_certainty")}
    data = datasets.Dataset.from_list([{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
    GRPOTrainer(model=policy, reward_funcs=[rewards[reward]], args=args, train_dataset=data,
                processing_class=tok).train()
    return policy, tok


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--seeds", default="7,8,9")
    p.add_argument("--rewards", default="gt,vigor,self_certainty")
    a = p.parse_args()
    results, path = {}, os.path.join(a.out, "trl_compare.json")
    if os.path.isfile(path):
        results = json.load(open(path))
    for seed in map(int, a.seeds.split(",")):
        for reward in a.rewards.split(","):
            cfg = vigor.regime_config("sft", ["--seed", str(seed), "--reward", reward, "--eval_samples", "0",
                                              "--out_dir", a.out, "--run_name", f"vigorpy-{reward}-s{seed}"])
            eval_sets = [(spec, *vigor.load_prompts(spec)) for spec in cfg.eval_data]
            for trainer in ("vigor.py", "TRL"):
                key = f"{trainer}|{reward}|{seed}"
                if key in results:
                    continue
                t = time.time()
                torch.manual_seed(seed)
                if trainer == "vigor.py":
                    out = vigor.train(cfg)
                    before, after = out["before"], out["after"]
                else:
                    policy, tok = trl_run(cfg, reward, seed, os.path.join(a.out, f"trl-{reward}-s{seed}"))
                    after = vigor.evaluate(policy, tok, eval_sets, cfg)
                    before = None
                results[key] = {"after": after["eval/test/accuracy"], "seconds": time.time() - t,
                                "before": before and before["eval/test/accuracy"]}
                print(key, results[key], flush=True)
                json.dump(results, open(path, "w"), indent=1)
    seeds = a.seeds.split(",")
    print(f"\n| reward | trainer | {' | '.join('seed ' + s for s in seeds)} | mean ± sd | s per run |")
    print("|---|---|" + "---|" * (len(seeds) + 2))
    for reward in a.rewards.split(","):
        for trainer in ("vigor.py", "TRL"):
            runs = [results[f"{trainer}|{reward}|{s}"] for s in seeds]
            accs = [r["after"] for r in runs]
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            print(f"| {reward} | {trainer} | " + " | ".join(f"{x:.1%}" for x in accs) +
                  f" | {statistics.mean(accs):.1%} ± {sd:.1%} | {statistics.mean(r['seconds'] for r in runs):.0f} |")
    base = [r["before"] for r in results.values() if r["before"] is not None]
    print(f"\nbase (the warm start, before RL): {base[0]:.1%}" if base else "")


if __name__ == "__main__":
    main()
