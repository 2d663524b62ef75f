"""VIGOR in one file: reinforcement learning for language models with no verifier and no gold answers.

The reward of a sampled completion y of prompt x is how *small* the gradient of its own teacher-forced
NLL is under the current parameters (paper: "Verifier-Free RL for LLMs via Intrinsic Gradient-Norm
Reward", arXiv 2605.09920). Per step, in the order the file reads:

    sample G completions per prompt                       rollouts        (sample_groups)
    g_i = grad_theta (1/T_i) sum_t -log p(y_t | x, y_<t)  per completion  (mean_nll, grad_norms)
    S_i = -sqrt(T_i) * ||g_i||_2                          length fix      (vigor_scores)
    R_i = 2 * rank_i / (G - 1) - 1                        rank shaping    (rank_rewards)
    A_i = (R_i - mean R) / (std R + 1e-4)                 GRPO advantage  (group_advantages)
    loss = -min(r A, clip(r) A) + beta * KL_k3(pi || ref) clipped update  (grpo_token_loss, normalised_loss)

The reward is a constant for the update (stop-gradient): no second-order terms. `rl_step` puts these
together: `sample_and_score`, then `grpo_update`. The file then holds the same norms computed faster
(`per_layer_grad_norms`, `lm_head_grad_norms`), `train` and `evaluate`, the data and grading, the models,
an appendix of infrastructure (settings parsing, processes, checkpoints) and the tools (analyses, study,
signal, the TRL adapter) with `main` last; the benchmark of the reward pass is .ci/bench.py.

What is simplified compared with the authors' code (open-r1 + a TRL fork), and why:
- Hugging Face `generate` batched over every group of a step, no vLLM; one process, or several under
  `torchrun` with PyTorch's own DDP or FSDP2 (no DeepSpeed), so the whole algorithm reads top to bottom.
- Gradient norms come from `torch.func` (vmap over per-sample grads) instead of a Python loop of
  `autograd.grad` calls; squares are summed in float32 (the authors summed in bf16).
- Identical completions inside a group share the mean of their rank rewards: the authors' tie rule
  (by position) would push the same text both up and down. With all G identical every advantage is zero:
  only the beta * KL term still moves the policy (back toward the reference).
- Generation also stops at the chat template's end-of-turn token (the authors stop at the tokenizer's EOS
  only, so a base Qwen2.5 writes past <|im_end|>); it counts in T like the EOS.
- Completions cut at the length limit are scored like any other, as the authors do (T = the limit);
  `mask_truncated_completions` leaves them out of the loss instead (TRL's option).
- The default run is a tiny Qwen2-architecture model on a synthetic arithmetic task, so that it finishes on
  a laptop CPU in about a minute. Like the paper's Qwen2.5-Base it is a *base* model: its warm start is
  plain language modelling of a corpus, not fine-tuning (`task: sft` gives the fine-tuned regime instead).
  The same code trains Qwen2.5 on MATH by changing the config.

Run `python vigor.py --help` for every setting; README.md explains every printed number.
"""
import argparse
import ast
import contextlib
import copy
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import tempfile
import tokenize
from collections import defaultdict
from dataclasses import dataclass, field
from xml.etree import ElementTree

import torch
import torch.distributed as dist
import yaml
from torch.func import functional_call, grad, vmap

HERE = os.path.dirname(os.path.abspath(__file__))


# --- Settings -----------------------------------------------------------------------------------------------
def arg(default, help, valid=None):
    """A setting: its default, its documentation (`python vigor.py --help`) and its valid values, a tuple of
    choices or one of BOUNDS; `validate` checks them."""
    meta = {"help": help, "valid": valid}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


BOUNDS = {">= 0": lambda v: v >= 0, ">= 1": lambda v: v >= 1, "> 0": lambda v: v > 0,
          "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 1)": lambda v: 0 <= v < 1}


SYNTHETIC_TRAIN = dict(path="synthetic", split="train", prompt_column="prompt", answer_column="answer")
SYNTHETIC_TEST = {**SYNTHETIC_TRAIN, "split": "test", "limit": 500}


@dataclass
class Config:
    # run
    run_name: str = arg("vigor", "run folder name, under out_dir")
    out_dir: str = arg("runs", "where run folders are written")
    resume: bool = arg(True, "continue an existing run folder from its last checkpoint; false: refuse to")
    seed: int = arg(7, "seed for sampling, data order and initialisation (authors: 7)")
    device: str = arg("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = arg("auto", "compute dtype (auto: bf16 on CUDA, under autocast; the weights stay float32, "
                     "where lr-2e-6 updates are not rounded away)", ("auto", "float32", "bfloat16"))
    # model
    model: str = arg("tiny", "'tiny': the shipped warm start of `task` (tiny_configs/tiny-<task>/, made by "
                     "`python vigor.py warmstart`), a local folder or a hub name")
    # the tiny model's warm-start recipe (`python vigor.py warmstart`); model tiny checks the shipped one's
    tiny_model_config: str = arg("tiny_configs/tiny_qwen2.json", "Qwen2 architecture of the tiny model")
    task: str = arg("base", "the tiny model's warm start. base: language modelling of documents of solved "
                    "problems, EOS at a document's end (the paper's regime); sft: prompt -> solution pairs, "
                    "EOS after every answer (an instruction-tuned model)", ("base", "sft"))
    direct_share: float = arg(0.5, "warm start: share of answer-only solutions (9, not 12,9)", "in [0, 1)")
    doc_problems: float = arg(3.0, "base: mean number of problems in a corpus document (geometric)", ">= 1")
    wrong_share: float = arg(0.0, "base: share of solutions whose last number is off by one", "in [0, 1)")
    prompt_weight: float = arg(0.2, "base: LM-loss weight of the problems' text (1: as any token)", ">= 0")
    warmstart_steps: int = arg(2000, "warm-start steps (base: 16 rows x 64 tokens; sft: 64 pairs)", ">= 0")
    warmstart_lr: float = arg(3e-3, "learning rate of the tiny model's warm start", "> 0")
    attn_implementation: str = arg("eager", "both work under torch.func (no attention mask is passed); "
                                   "sdpa is slower on CPU", ("sdpa", "eager"))
    lora_r: int = arg(0, "LoRA rank (peft), 0 = off; the reward's norm is then over the LoRA parameters "
                      "(as the authors') and the reference is the model with its adapter off", ">= 0")
    lora_alpha: int = arg(32, "LoRA scaling numerator (scale = lora_alpha / lora_r)", "> 0")
    gradient_checkpointing: bool = arg(False, "recompute activations in the update (the reward pass: never)")
    disable_dropout: bool = arg(True, "dropout off in policy and reference (TRL's name); else the update "
                                "(train mode) sees another model than sampling: k3 > 0 at step 0, ratio != 1")
    trust_remote_code: bool = arg(False, "allow a hub model to run its own Python code (off: never)")
    parallelism: str = arg("ddp", "under torchrun: ddp (each rank holds the model) or fsdp (FSDP2 shards the "
                           "weights, grads, AdamW; no LoRA; norms per_layer or lm_head)", ("ddp", "fsdp"))
    # data
    train_data: dict = arg(SYNTHETIC_TRAIN, "RL prompts: {path, name, split, prompt_column, answer_column, "
                           "limit}; path: synthetic, a json/jsonl/csv/parquet file, a folder or a hub name")
    eval_data: list = arg([SYNTHETIC_TEST], "held-out sets graded with their answer_column (as train_data)")
    system_prompt: str = arg("", "system message, used when the tokenizer has a chat template")
    answer_format: str = arg("auto", "how an answer is read: boxed (last \\boxed{}), gsm8k (#### N), "
                             "last_number; auto: what the prompt asks for. No such answer = wrong",
                             ("auto", "boxed", "gsm8k", "last_number"))
    max_prompt_length: int = arg(512, "longer prompts are skipped and counted (authors: 512)", ">= 1")
    # rollouts
    num_generations: int = arg(8, "G: completions per prompt (authors: 8); at least 2")
    prompts_per_step: int = arg(16, "prompts per RL step (of G completions each)", ">= 1")
    max_completion_length: int = arg(24, "new tokens at most (authors: 1024 for 3B)", ">= 1")
    temperature: float = arg(0.9, "sampling temperature (authors: 0.9)", "> 0")
    top_k: int = arg(50, "top-k sampling, 0 = off (authors: 50)", ">= 0")
    top_p: float = arg(1.0, "nucleus sampling (authors: 1.0)", "in (0, 1]")
    static_cache: bool = arg(False, "CUDA: static KV cache + torch.compile for generation (slow first call)")
    generation_batch_size: int = arg(0, "prompts per generate call, 0 = all of the step's at once", ">= 0")
    # reward
    reward: str = arg("vigor", "vigor (gradient norm), self_certainty (INTUITOR), gt (gold answers) or "
                      "random (uniform noise: the control)", ("vigor", "self_certainty", "gt", "random"))
    sqrt_t: bool = arg(True, "vigor: multiply ||g|| by sqrt(T) (paper's length correction; false = ablation)")
    rank: bool = arg(True, "vigor: rank-shape scores to [-1, 1] inside each group (false = ablation)")
    reward_params: str = arg("all", "vigor: gradient over all trainable parameters, or lm_head (the paper's "
                             "cheap approximation, closed form from one forward pass)", ("all", "lm_head"))
    grad_norm_method: str = arg("vmap", "vmap: torch.func (the reference); per_layer: the same norms from "
                                "one batched backward, near the cost of training", ("vmap", "per_layer"))
    grad_chunk_size: int = arg(0, "completions per chunk of the reward pass, 0 = from free memory", ">= 0")
    # GRPO
    steps: int = arg(100, "RL steps (one batch of prompts each)", ">= 0")
    lr: float = arg(2e-4, "policy learning rate (authors: 2e-6 for Qwen2.5-3B; the tiny default: chosen with "
                    "the controls gt and random, README: the protocol)", "> 0")
    beta: float = arg(0.01, "weight of the k3 KL penalty to the frozen reference (authors: 0.01)", ">= 0")
    epsilon: float = arg(0.2, "lower clip of the ratio: 1 - epsilon (authors: 0.2)", "> 0")
    epsilon_high: float = arg(0.2, "upper clip of the ratio: 1 + epsilon_high", "> 0")
    num_iterations: int = arg(1, "optimiser steps per batch of rollouts (authors: 1; 3 for 7B)", ">= 1")
    loss_type: str = arg("dapo", "TRL's names. dapo: token sum / tokens of the whole step; bnpo: token "
                         "mean of each micro-batch, averaged (the authors, micro-batches of 4); grpo: each "
                         "sequence's token mean, averaged over the step's rows", ("dapo", "bnpo", "grpo"))
    mask_truncated_completions: bool = arg(False, "leave completions cut at the length limit out of the loss")
    micro_batch_size: int = arg(64, "sequences per forward/backward in the update: a memory knob, except "
                                "that loss_type bnpo normalises per micro-batch", ">= 1")
    max_grad_norm: float = arg(1.0, "clip the update's gradient norm", "> 0")
    warmup_ratio: float = arg(0.1, "linear warmup share of the cosine schedule (authors: 0.1)", "in [0, 1)")
    # logging, evaluation, checkpoints
    eval_every: int = arg(0, "evaluate every N steps too (0: only before and after RL)", ">= 0")
    eval_samples: int = arg(8, "before and after RL also sample k completions per eval prompt (mean@k, "
                            "pass@k); 0 = off", ">= 0")
    eval_batch_size: int = arg(64, "prompts per greedy generate call in evaluation", ">= 1")
    save_every: int = arg(10, "write a checkpoint every N steps (and at the end)", ">= 0")
    log_completions_every: int = arg(1, "write every Nth step's completions to completions.jsonl", ">= 0")
    max_bad_steps: int = arg(3, "stop after this many NaN/inf steps in a row (reward, loss, grad)", ">= 1")

    def __post_init__(self):  # every Config, however made, is checked
        validate(self)


class ConfigError(ValueError):
    pass


class DataError(ValueError):
    pass


class BadStepError(RuntimeError):
    pass


# --- The method: the paper's equations, one function each ---------------------------------------------------
def token_logps(logits, input_ids):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]): [B, L-1], float32 (or float64) whatever the dtype of the
    logits [B, L, V]: bf16 logits (autocast) give the log-probs of their float32 copy, not rounded ones."""
    logits = logits[:, :-1].float()  # upcast before the log-softmax: in bf16 it loses two digits
    return logits.gather(-1, input_ids[:, 1:, None])[..., 0] - logits.logsumexp(-1)


def completion_mean(per_token, loss_mask):
    """Mean of a per-position value [B, L-1] over the positions whose next token is a completion token
    (loss_mask [B, L] shifted by one, as `token_logps`): [B]; a row with no completion token gives 0.0."""
    w = loss_mask[:, 1:].float()
    return (per_token * w).sum(1) / w.sum(1).clamp(min=1)


def mean_nll(logits, input_ids, loss_mask):
    """l(x, y) = (1/T) sum_t -log p(y_t | x, y_<t) over completion tokens, per row: [B]."""
    return completion_mean(-token_logps(logits, input_ids), loss_mask)


def grad_norms(model, input_ids, loss_mask, chunk_size=None):
    """||grad_theta l(x, y)||_2 for each row, with l = (1/T) sum_{t: mask=1} -log p(y_t | y_<t).

    With torch.func, one batched call (`vmap` of `grad` through `functional_call`): the model's forward runs
    once per chunk of `chunk_size` rows (once when None), so the B per-sample gradients are exact (no
    cross-talk) and only `chunk_size` of them exist at once. Right padding needs no attention mask (pads come
    after every real token and carry no loss). Parameters with requires_grad=False (a frozen body under LoRA)
    are constants; the parameters and their .grad are left as they were. Returns [B] floats, detached (the
    reward is a constant: stop-gradient), float32 or finer."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    frozen.update(dict(model.named_buffers()))

    def loss(p, ids, mask):  # one sequence: ids, mask [L]
        logits = functional_call(model, (p, frozen), (ids[None],), {"use_cache": False}).logits
        return mean_nll(logits, ids[None], mask[None])[0]

    def squared_norm(p, ids, mask):
        return sum((g.float() ** 2).sum() for g in grad(loss)(p, ids, mask).values())

    per_row = vmap(squared_norm, in_dims=(None, 0, 0), chunk_size=chunk_size)
    return per_row(params, input_ids, loss_mask).sqrt()


def vigor_scores(norms, lengths, sqrt_t=True):
    """S = -sqrt(T) * ||g||  (paper's length correction: raw ||g|| of a token mean shrinks ~ 1/sqrt(T)).
    With sqrt_t=False, S = -||g|| (the "w/o sqrt(T)" ablation). Lower norm -> higher score. norms [N] floats,
    lengths [N] ints T; returns [N] floats. Raises a ValueError when a T is <= 0, whatever sqrt_t."""
    if (lengths <= 0).any():
        raise ValueError("vigor_scores: a completion has T = 0 tokens; it has no token-mean NLL "
                         "(sampled completions always count their EOS, so T >= 1)")
    return -(lengths.float().sqrt() * norms if sqrt_t else norms)


def rank_rewards(scores, group_size):
    """R_i = 2 * rank_i / (G - 1) - 1 per consecutive group of G of scores [N]; rank_i is the place of score i
    in its own group's order: 0 = lowest score (R = -1), G-1 = best (R = +1). Ties go by position, as the
    authors do: of two equal scores the earlier ranks lower. Returns [N] floats."""
    s = scores.view(-1, group_size)  # a stable argsort twice: the sorting indices, then each one's place
    ranks = s.argsort(dim=1, stable=True).argsort(dim=1, stable=True).float()
    return (2 * ranks / (group_size - 1) - 1).view(-1)


def share_identical(rewards, completion_ids, group_size):
    """Identical completions in a group get the mean of their rewards: a tie rule must not push the same text
    both up and down. All G identical: every advantage is zero, only the beta * KL term has a gradient."""
    out = rewards.clone()
    for i, ids in enumerate(completion_ids):
        group = range(i - i % group_size, i - i % group_size + group_size)
        out[i] = rewards[[j for j in group if completion_ids[j] == ids]].mean()
    return out


def group_advantages(rewards, group_size, eps=1e-4):
    """A_i = (R_i - mean_group R) / (std_group R + eps), unbiased std (GRPO), per consecutive group of G of
    rewards [N]: [N]. Equal rewards -> A = 0, up to their mean's rounding / eps, as TRL (eight 0.7s: 6e-4)."""
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def self_certainty(model, input_ids, loss_mask):
    """INTUITOR's score per row: the mean over completion tokens of logsumexp(z_t) - mean(z_t)
    (= KL(Uniform || p_t) + log V, with z_t the logits)."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    return completion_mean(logits.logsumexp(-1) - logits.mean(-1), loss_mask)


def grpo_token_loss(logps, old_logps, ref_logps, advantages, epsilon, epsilon_high, beta):
    """Per-token GRPO loss [B, T] (advantages [B]):  -min(r A, clip(r, 1-eps, 1+eps_high) A) + beta * KL_k3,
        r = exp(logp - logp_old),  KL_k3 = exp(ref - logp) - (ref - logp) - 1  (>= 0, = 0 when equal).
    Returns (loss, kl, clipped) where clipped marks tokens whose gradient the clip removed."""
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * a
    kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
    return -torch.min(unclipped, clipped) + beta * kl, kl, clipped < unclipped


def normalised_loss(per_token, mask, loss_type, n_tokens, n_seqs, n_batches):
    """A micro-batch's share of the step's loss, from per-token losses and the completion mask [B, T], with
    TRL's definitions (n_tokens, n_seqs, n_batches count the whole step: every micro-batch of every rank):
        dapo:  token sum / n_tokens                     (the step's token mean: the split does not matter)
        bnpo:  token sum / micro-batch's tokens / n_batches  (the authors': the mean of micro-batches' means)
        grpo:  sum over rows of the row's token mean / n_seqs  (every sequence weighs the same)"""
    if loss_type == "dapo":
        return (per_token * mask).sum() / n_tokens
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1) / n_batches
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs


def policy_logps(model, input_ids, temperature):
    """log-probs of the sampled tokens under the sampling distribution, and its logits: logits / temperature,
    as TRL (whose entropy metric is that distribution's too)."""
    logits = model(input_ids=input_ids, use_cache=False).logits / temperature
    return token_logps(logits, input_ids), logits


def entropy(logits, mask):
    """Per-token entropy of the sampling distribution (tempered logits, as TRL logs it), summed over the
    masked positions: a monitor, no gradient."""
    with torch.no_grad():
        logp = logits[:, :-1].float().log_softmax(-1)
        return (-(logp.exp() * logp).sum(-1) * mask).sum()


# --- One RL step: sample and score G completions per prompt, then the GRPO update ---------------------------
@dataclass
class Rollouts:
    input_ids: torch.Tensor   # [N, L] prompt + completion, right-padded (N = prompts * G, groups consecutive)
    loss_mask: torch.Tensor   # [N, L] 1 on completion tokens (the EOS included, as the authors count it)
    lengths: torch.Tensor     # [N] T, completion tokens
    truncated: torch.Tensor   # [N] bool, hit max_new_tokens without an EOS
    completions: list         # [N] decoded text, EOS dropped
    prompt_index: list        # [N] which prompt of the batch

    @classmethod
    def from_ids(cls, prompt_ids, completion_ids, truncated, completions, prompt_index, pad_id):
        """Rows of prompt + completion ids (a completion keeps its stop token), masked on the completion."""
        if not all(len(p) for p in prompt_ids):
            raise DataError("a prompt has no tokens (an empty text, no BOS): nothing predicts a completion's "
                            "first token, so its NLL cannot count it; give every prompt text or a BOS token")
        rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        masks = [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids)]
        lengths = torch.tensor([len(c) for c in completion_ids])
        return cls(pad_right(rows, pad_id), pad_right(masks, 0), lengths,
                   torch.tensor(truncated, dtype=torch.bool), completions, prompt_index)


@torch.no_grad()
def sample_groups(model, tok, prompts, num_generations, max_new_tokens, batch_prompts=0, greedy=False,
                  temperature=1.0, top_k=0, top_p=1.0, static_cache=False) -> Rollouts:
    """G completions of each prompt, all groups of the step in one `generate` call (or batch_prompts at a
    time); a completion ends at its first stop token, which it keeps: the stop token counts in T."""
    from transformers import GenerationConfig
    stops = stop_token_ids(model, tok)
    gen = GenerationConfig(do_sample=not greedy, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                           eos_token_id=stops, num_return_sequences=num_generations,
                           **({"cache_implementation": "static"} if static_cache else {}),
                           **({} if greedy else dict(temperature=temperature, top_k=top_k, top_p=top_p)))
    prompt_ids, completion_ids, truncated, texts, index = [], [], [], [], []
    step = batch_prompts or len(prompts)
    for start in range(0, len(prompts), step):
        # left padding for this call only (every prompt then ends at one column); the tokenizer keeps its side
        enc = tok(prompts[start:start + step], return_tensors="pt", padding=True, padding_side="left",
                  add_special_tokens=False).to(model.device)
        # HF would step FSDP ranks in lockstep (synced_gpus); the weights are `gathered`: each rank goes alone
        with only_these_settings(model, gen):
            out = model.generate(**enc, generation_config=gen, synced_gpus=False).cpu()
        width = enc["input_ids"].shape[1]
        for row, new in enumerate(out[:, width:].tolist()):
            p = row // num_generations
            prompt = [t for t, m in zip(enc["input_ids"][p].tolist(), enc["attention_mask"][p].tolist()) if m]
            ends = [i for i, t in enumerate(new) if t in stops]
            completion = new[:ends[0] + 1] if ends else new
            prompt_ids.append(prompt)
            completion_ids.append(completion)
            truncated.append(not ends)
            texts.append(tok.decode(completion[:-1] if ends else completion, skip_special_tokens=True))
            index.append(start + p)
    return Rollouts.from_ids(prompt_ids, completion_ids, truncated, texts, index, tok.pad_token_id)


@contextlib.contextmanager
def only_these_settings(model, gen):
    """`generate` fills each field its `generation_config` leaves unset from `model.generation_config` (a hub
    checkpoint's: Qwen2.5-Instruct's repetition penalty, temperature, top-p...), so rollouts would leave the
    policy's distribution and greedy would not be greedy: while it runs, the model's own config is `gen`."""
    owners = [m for m in model.modules() if vars(m).get("generation_config") is not None]  # not a wrapper's
    saved = [m.generation_config for m in owners]
    try:
        for m in owners:
            m.generation_config = gen
        yield
    finally:
        for m, config in zip(owners, saved):
            m.generation_config = config


def compute_rewards(cfg, policy, rollouts: Rollouts, correct=None):
    """Scores, rewards and advantages of a step's rollouts: {name: Tensor[N]}; the reward is a constant.
    `correct` ([N] 0/1, from `grade`) is the gt reward; the other rewards never see it."""
    G, out = cfg.num_generations, {}
    ids, mask = rollouts.input_ids.to(policy.device), rollouts.loss_mask.to(policy.device)
    if cfg.reward == "vigor":
        method = "lm_head" if cfg.reward_params == "lm_head" else cfg.grad_norm_method
        norms_of = {"lm_head": lm_head_grad_norms, "per_layer": per_layer_grad_norms, "vmap": grad_norms}
        chunk = cfg.grad_chunk_size or auto_chunk_size(policy, ids, method)
        out["grad_norm"] = chunked_scores(norms_of[method], policy, ids, mask, chunk).cpu()
        out["score"] = vigor_scores(out["grad_norm"], rollouts.lengths, cfg.sqrt_t)
        rewards = rank_rewards(out["score"], G) if cfg.rank else out["score"]
    elif cfg.reward == "self_certainty":
        with torch.no_grad():
            chunk = cfg.grad_chunk_size or auto_chunk_size(policy, ids, "lm_head")
            rewards = out["score"] = chunked_scores(self_certainty, policy, ids, mask, chunk).cpu()
    elif cfg.reward == "random":  # drawn from the run's seeded generator: reproducible, restored on resume
        rewards = out["score"] = torch.rand(len(ids))
    else:
        rewards = out["score"] = correct
    completion_ids = [row[m.bool()].tolist() for row, m in zip(rollouts.input_ids, rollouts.loss_mask)]
    out["reward"] = share_identical(rewards, completion_ids, G)
    out["advantage"] = group_advantages(out["reward"], G)
    return out


def sample_and_score(cfg, policy, tok, prompts, answers):
    """The first half of a step: this rank's rollouts, their {grad_norm, score, reward, advantage, correct}
    and timings. Answers, when given, grade them."""
    policy.eval()
    t0 = time.perf_counter()
    with gathered(policy):  # FSDP: rollouts and rewards are rank-local work on the full weights
        rollouts = sample(cfg, policy, tok, prompts)
        t1 = time.perf_counter()
        correct = grade(rollouts, prompts, answers, cfg.answer_format) if answers is not None else None
        scored = compute_rewards(cfg, policy, rollouts, correct)
    logged = {"time/generate": t1 - t0, "time/reward": time.perf_counter() - t1}
    if correct is not None:
        scored["correct"] = correct
    return rollouts, scored, logged


def sample(cfg, policy, tok, prompts):
    """G completions of each prompt with the run's sampling settings."""
    return sample_groups(policy, tok, prompts, cfg.num_generations, cfg.max_completion_length,
                         cfg.generation_batch_size, temperature=cfg.temperature, top_k=cfg.top_k,
                         top_p=cfg.top_p, static_cache=cfg.static_cache)


def grpo_update(cfg, policy, ref, rollouts, advantages, optimizer, scheduler, wrapped=None):
    """The second half of a step: num_iterations optimiser steps on one batch of rollouts, each summing
    `normalised_loss` over micro-batches; returns the first iteration's metrics. `wrapped` is the module the
    forward and backward run through (DDP or FSDP, see `parallelize`), the policy itself on one process.
    A NaN/inf loss or gradient raises BadStepError before that iteration's optimiser and scheduler steps; the
    iterations before it (num_iterations > 1) have updated the weights already, and their updates stay."""
    t0, wrapped = time.perf_counter(), wrapped or policy
    dev, world = policy.device, rank_and_world()[1]
    ids, adv = rollouts.input_ids.to(dev), advantages.to(dev)
    mask = update_mask(cfg, rollouts).to(dev)
    batches = [slice(i, i + cfg.micro_batch_size) for i in range(0, len(ids), cfg.micro_batch_size)]
    # the frozen reference: `ref`, or with LoRA (ref None) the policy with its adapter off
    with policy.disable_adapter() if ref is None else contextlib.nullcontext():
        ref_logps = logps_of(ref or policy, ids, batches, cfg.temperature)
    # one iteration: the policy has not moved since sampling, so old = its own log-probs, detached (ratio 1)
    old_logps = logps_of(policy, ids, batches, cfg.temperature) if cfg.num_iterations > 1 else None
    t1 = time.perf_counter()
    n_tokens, n_seqs, n_batches = all_sum(mask.sum()).clamp(min=1), len(ids) * world, len(batches) * world
    wrapped.train()
    for iteration in range(cfg.num_iterations):
        totals = {}
        for b in batches:
            with gradient_sync(wrapped, b is batches[-1]):
                logps, logits = policy_logps(wrapped, ids[b], cfg.temperature)
                old = logps.detach() if old_logps is None else old_logps[b]
                per_token, kl, clipped = grpo_token_loss(logps, old, ref_logps[b], adv[b], cfg.epsilon,
                                                         cfg.epsilon_high, cfg.beta)
                loss = normalised_loss(per_token, mask[b], cfg.loss_type, n_tokens, n_seqs, n_batches)
                (loss * world).backward()  # DDP and FSDP average the ranks' gradients: x world makes it a sum
            sums = {"loss": loss.detach(), "kl": (kl.detach() * mask[b]).sum(),
                    "clipped": (clipped.float() * mask[b]).sum(), "entropy": entropy(logits, mask[b])}
            totals = {k: totals.get(k, 0) + v.double() for k, v in sums.items()}
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)  # before clipping
        update_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor
        totals = {k: v.item() for k, v in sum_over_ranks(totals).items()}
        if not (math.isfinite(totals["loss"]) and math.isfinite(update_norm)):
            optimizer.zero_grad(set_to_none=True)
            raise BadStepError(f"loss {totals['loss']} / gradient norm {update_norm} is NaN/inf in iteration "
                               f"{iteration + 1} of {cfg.num_iterations}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if iteration == 0:
            n = n_tokens.item()
            metrics = {"loss": totals["loss"], "kl": totals["kl"] / n, "grad_norm": update_norm,
                       "entropy": totals["entropy"] / n, "clip_ratio/region_mean": totals["clipped"] / n}
    wrapped.eval()
    return {**metrics, "time/reference": t1 - t0, "time/update": time.perf_counter() - t1}


def update_mask(cfg, rollouts):
    """[N, L-1]: 1 on the completion tokens the update's loss counts (see mask_truncated_completions)."""
    mask = rollouts.loss_mask[:, 1:].float()
    return mask * (~rollouts.truncated).float()[:, None] if cfg.mask_truncated_completions else mask


def rl_step(cfg, policy, ref, tok, optimizer, scheduler, prompts, answers, wrapped=None):
    """One VIGOR/GRPO step on this rank's prompts; returns (metrics, columns): every rank's completions with
    their prompts, texts, lengths, scores, rewards and advantages, {name: [N] tensor or list}."""
    t0 = time.perf_counter()
    rollouts, scored, times = sample_and_score(cfg, policy, tok, prompts, answers)
    columns = gather_columns({"prompt": [prompts[i] for i in rollouts.prompt_index],
                              "completion": rollouts.completions, "length": rollouts.lengths,
                              "truncated": rollouts.truncated, **scored})
    metrics = step_metrics(columns, cfg.num_generations)
    bad = [k for k in scored if not torch.isfinite(columns[k]).all()]
    if bad:  # the scores too, not only the rewards: argsort turns NaN scores into finite, meaningless ranks
        raise BadStepError(f"{', '.join(bad)} has NaN/inf values")
    advantages = scored["advantage"]
    metrics.update(grpo_update(cfg, policy, ref, rollouts, advantages, optimizer, scheduler, wrapped))
    metrics.update(times)
    metrics.update({"learning_rate": scheduler.get_last_lr()[0], "step_time": time.perf_counter() - t0,
                    "gen/tokens_per_s": columns["length"].sum().item() / times["time/generate"]})
    if policy.device.type == "cuda":  # this rank's peak over the step
        metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(policy.device) / 2**30
        torch.cuda.reset_peak_memory_stats(policy.device)
    return metrics, columns


@torch.no_grad()
def logps_of(model, ids, batches, temperature):
    """`policy_logps` of every row, one micro-batch at a time, without a graph: [N, L-1]."""
    return torch.cat([policy_logps(model, ids[b], temperature)[0] for b in batches])


def step_metrics(columns, G):
    """TRL's metrics of a step's completions (every rank's): rewards, lengths, scores, sampled accuracy."""
    lengths, rewards = columns["length"].float(), columns["reward"].view(-1, G)
    metrics = {"reward": rewards.mean().item(), "reward_std": rewards.std().item(),  # TRL's: over the step
               "reward_std/within_group": rewards.std(1).mean().item(),  # what GRPO's advantage divides by
               "frac_reward_zero_std": (rewards.std(1) == 0).float().mean().item(),
               "score": columns["score"].mean().item(), "completions/mean_length": lengths.mean().item(),
               "completions/min_length": lengths.min().item(), "completions/max_length": lengths.max().item(),
               "completions/clipped_ratio": columns["truncated"].float().mean().item()}
    if "grad_norm" in columns:
        metrics["vigor/grad_norm_raw"] = columns["grad_norm"].mean().item()
        metrics["vigor/sqrt_t_grad_norm"] = (columns["grad_norm"] * lengths.sqrt()).mean().item()
    if "correct" in columns:
        metrics["train/accuracy"] = columns["correct"].mean().item()
    return metrics


# --- The same norms, faster: one batched backward, the LM-head closed form, chunks that fit in memory -------
def per_layer_grad_norms(model, input_ids, loss_mask):
    """The same exact norms as `grad_norms`, from ONE batched backward of sum_b l_b (samples do not interact,
    so it yields every sample's activation gradients). Per layer, with a_t its input and g_t its output grad:
        Linear W:  ||sum_t g_t a_t^T||^2  (`linear_grad_sq_norms`);  bias: ||sum_t g_t||^2
        RMSNorm w: ||sum_t g_t * xhat_t||^2;  embedding: sum of g_t . g_s over pairs of positions with one id
        tied head/embedding: + 2 <head grad, embedding grad> = 2 sum_{s,t} q_s[id_t] (h_s . e_t)
    No parameter gets a gradient (the weight-gradient matmuls are skipped); per-sample gradients of the whole
    model never exist. Known as ghost norms (Goodfellow 2015; Li et al. 2022)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    B, L = input_ids.shape
    sq, late, hooks, seen = torch.zeros(B, device=input_ids.device), {}, [], set()

    def linear(mod, a, g):
        a = a.to(g.dtype)  # under autocast a layer's input can be fp32 while it computes (and g is) bf16
        if id(mod.weight) in trainable:
            sq.add_(linear_grad_sq_norms(a, g))
        if mod.bias is not None and id(mod.bias) in trainable:
            sq.add_(g.float().sum(1).square().sum(1))
        if mod is head and tied:  # q_s[id_t] and h_s, for the cross term once e_t is known
            late["q_at_ids"] = g.gather(2, input_ids[:, None, :].expand(B, L, L)).float()
            late["h"] = a.float()

    def rms_norm(mod, x, g):  # x [B, ..., d]: Qwen3's q_norm/k_norm act on [B, L, heads, head_dim]
        x = x.float()
        xhat = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + rms_norm_eps(mod))
        sq.add_((g.float() * xhat).flatten(1, -2).sum(1).square().sum(1))

    def on_forward(rule):
        def hook(mod, inputs, out):
            if mod in seen:
                raise ValueError(f"per_layer_grad_norms: {type(mod).__name__} is called twice in one forward")
            seen.add(mod)
            a = inputs[0].detach()
            out.register_hook(lambda g: rule(mod, a, g))
        return hook

    scale = getattr(emb, "embed_scale", 1.0)  # Gemma's embedding multiplies the rows it looks up by this
    known = type(emb) is torch.nn.Embedding or hasattr(emb, "embed_scale")
    covered = {id(emb.weight)} & trainable if known else set()
    for mod in model.modules():
        own = {id(p) for p in mod.parameters(recurse=False)} & trainable
        if own and isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(on_forward(linear)))
        elif own and rms_norm_eps(mod) is not None:
            hooks.append(mod.register_forward_hook(on_forward(rms_norm)))
        else:
            continue
        covered |= own
    if trainable - covered:
        raise ValueError("per_layer_grad_norms handles Linear, RMSNorm and embedding parameters only; "
                         f"use grad_norm_method=vmap for this model ({type(model).__name__})")
    flat = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in flat:
            p.requires_grad_(False)
        x = emb(input_ids).detach().requires_grad_(True)  # the one leaf: every activation gets a gradient
        per_sample = mean_nll(model(inputs_embeds=x, use_cache=False).logits, input_ids, loss_mask)
        (e,) = torch.autograd.grad(per_sample.sum(), x)
        e = e * scale  # the gradient of the looked-up rows
    finally:
        for h in hooks:
            h.remove()
        for p in flat:
            p.requires_grad_(True)
    if id(emb.weight) in trainable:
        if emb.padding_idx is not None:  # nn.Embedding never gives its padding_idx row a gradient
            e = e * (input_ids != emb.padding_idx)[..., None]
        same = (input_ids[:, :, None] == input_ids[:, None, :]).float()

        sq += (gram(e) * same).sum((1, 2))
        if tied and "h" in late:
            sq += 2 * (late["q_at_ids"] * (late["h"] @ e.float().transpose(1, 2))).sum((1, 2))
    return sq.clamp(min=0).sqrt()


def gram(x):
    """x x^T per sample: [B, L, d] -> [B, L, L], in float32."""
    return (x @ x.transpose(1, 2)).float()


def linear_grad_sq_norms(a, g):
    """||sum_t g_t a_t^T||_F^2, one sample's squared gradient norm of a Linear weight, from the layer's inputs
    a [B, L, din] and output gradients g [B, L, dout] of any float dtype (bf16 under autocast): [B], float32
    or finer, at the cost of whichever way takes fewer FLOPs for these shapes."""
    # short rows: = sum_{t,s} (a_t . a_s)(g_t . g_s), two L x L Gram matrices; long rows: ||g^T a||^2, the
    # dout x din gradient itself. Matmuls stay in the input dtype (bf16 on tensor cores, fp32 accumulation)
    L, din, dout = a.shape[1], a.shape[-1], g.shape[-1]
    if L * (din + dout) < din * dout:
        return (gram(a) * gram(g)).sum((1, 2))
    return (g.transpose(1, 2) @ a).float().square().sum((1, 2))


def rms_norm_eps(mod):
    """The epsilon of an RMSNorm (Qwen, Llama: variance_epsilon; Gemma: eps, with (1 + w), whose weight
    gradient is the same sum of g * xhat), None for any other module."""
    if type(mod).__name__.endswith("RMSNorm"):
        return getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    return None


def lm_head_grad_norms(model, input_ids, loss_mask):
    """The paper's cheap approximation: ||grad_W l|| for the LM-head weight W alone, from one forward pass.
    With q_t = softmax(logits_t) - onehot(y_t) and h_t the head's input at position t:
        grad_W l = (1/T) sum_t q_t h_t^T   =>   ||grad_W l||_F^2 = (1/T^2) sum_{t,s} (q_t . q_s) (h_t . h_s)
    (two T x T Gram matrices; no backward pass, no [V, d] per-sample gradient)."""
    with torch.no_grad():
        h = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        q = model.get_output_embeddings()(h).float().softmax(-1)
        q.scatter_add_(-1, input_ids[:, 1:, None], -torch.ones_like(q[..., :1]))
        w = loss_mask[:, 1:].float()[..., None]
        q, h = q * w, h.float() * w  # [B, L-1, V], [B, L-1, d]; positions without loss are zeroed
        sq = ((q @ q.transpose(1, 2)) * (h @ h.transpose(1, 2))).sum((1, 2))
        return sq.sqrt() / w.sum((1, 2)).clamp(min=1)


def auto_chunk_size(model, input_ids, method):
    """Completions per chunk of the reward pass that fit in half the free memory: a forward+backward's
    activations (logits: ~12 bytes x vocab per token), for vmap 3 per-sample gradients (OOM: a retry)."""
    c, device = model.config, input_ids.device
    per_sample = input_ids.shape[1] * (12 * c.vocab_size + 48 * c.num_hidden_layers * c.hidden_size)
    if method == "lm_head":  # forward only: logits and softmax, no backward
        per_sample = input_ids.shape[1] * 12 * c.vocab_size
    if method == "vmap":
        per_sample += 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return max(1, min(len(input_ids), int(free_memory(device) * 0.5 // per_sample)))


def free_memory(device, cpu_cap=2 * 2**30):
    """Bytes counted as free: CUDA's count; on a CPU psutil's (from peft), at most cpu_cap (reward pass)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil  # the CPU cap: SmolLM2-135M's signal peaks at 2.6 GB RSS with it, 20.3 GB without
    return min(psutil.virtual_memory().available, cpu_cap)


def chunked_scores(score_of, model, input_ids, loss_mask, chunk):
    """score_of(model, ids, mask) by chunks of completions (each trimmed to its own padding); running out of
    memory (CUDA, or a CPU allocation that fails) halves the chunk and retries instead of ending the run."""
    while True:
        try:
            out = []
            for i in range(0, len(input_ids), chunk):
                ids, mask = input_ids[i:i + chunk], loss_mask[i:i + chunk]
                width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else ids.shape[1]
                out.append(score_of(model, ids[:, :width], mask[:, :width]))
            return torch.cat(out)
        except (torch.OutOfMemoryError, RuntimeError) as e:  # the CPU allocator raises a RuntimeError
            if chunk <= 1 or not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
                raise
            chunk //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"reward pass: out of memory, retrying {chunk} completions at a time", file=sys.stderr)


# --- Training and evaluation --------------------------------------------------------------------------------
def train(cfg: Config) -> dict:
    """The whole run: data, models, optional resume, evaluation before/after, RL steps, final save. Under
    torchrun every rank runs it on its share of each step's prompts; rank 0 alone prints and writes."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup
    started = time.time()
    device, dtype = setup_device(cfg)
    rank, world = rank_and_world()
    say = print if rank == 0 else lambda *a, **k: None
    # bad data or a bad model path fails here, before anything is written
    raw_prompts, answers = load_prompts(cfg.train_data)
    eval_sets = [(spec, *load_prompts(spec)) for spec in cfg.eval_data]
    for spec, _, gold in eval_sets:
        if gold is None:
            raise DataError(f"eval set {spec['path']} needs an answer_column to be graded")
    if cfg.reward == "gt" and answers is None:
        raise DataError("reward 'gt' needs answers: set train_data.answer_column")
    base = tiny_base_model(cfg) if cfg.model == "tiny" else cfg.model
    run_dir = check_run_dir(cfg)
    ckpt = latest_checkpoint(run_dir)
    # before the models (a LoRA adapter's initialisation is random); each rank samples its own completions
    torch.manual_seed(cfg.seed + 1_000_003 * rank)
    # FSDP: the checkpoint's weights are loaded shard by shard once the model is sharded (load_checkpoint)
    policy, tok, ref = load_policy(cfg, base, None if cfg.parallelism == "fsdp" else ckpt, device, dtype)
    wrapped = parallelize(cfg, policy, ref, dtype)

    prompts, answers = chat_prompts(cfg, tok, raw_prompts, answers)
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    completions_path = os.path.join(run_dir, "completions.jsonl")

    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    total = max(1, cfg.steps * cfg.num_iterations)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    start, state = 0, {"bad_in_a_row": 0, "skipped_steps": 0, "eval_before": None}
    if ckpt:
        start, state = load_checkpoint(ckpt, policy, optimizer, scheduler)
        say(f"resuming {run_dir} from {os.path.basename(ckpt)} (step {start}/{cfg.steps})")
    if rank == 0:
        write_config(run_dir, cfg)
        for path in (metrics_path, completions_path):
            truncate_jsonl(path, start)
    processes = f" x {world} processes ({cfg.parallelism})" if world > 1 else ""
    say(f"{len(prompts)} training prompts ({len(raw_prompts) - len(prompts)} skipped: longer than "
        f"max_prompt_length), model {base} on {device}{processes}, run folder {run_dir}")
    log = (lambda row: write_jsonl(metrics_path, [row])) if rank == 0 else lambda row: None

    # bf16 compute for every forward from here on; log-probs, norms and the loss are computed in fp32
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        if state["eval_before"] is None:
            state["eval_before"] = evaluate(policy, tok, eval_sets, cfg, cfg.eval_samples)
            log({"step": 0, **state["eval_before"]})
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="VIGOR RL",
                   dynamic_ncols=True, disable=rank > 0)
        share = cfg.prompts_per_step // world
        for step in bar:  # the step's prompts are global; this rank takes its share of them
            idx = prompt_batch(len(prompts), step, cfg.prompts_per_step, cfg.seed)
            idx = idx[rank * share:(rank + 1) * share]
            batch_answers = [answers[i] for i in idx] if answers else None
            try:
                metrics, columns = rl_step(cfg, policy, ref, tok, optimizer, scheduler,
                                           [prompts[i] for i in idx], batch_answers, wrapped)
                state["bad_in_a_row"] = 0
            except BadStepError as e:
                state["bad_in_a_row"] += 1
                state["skipped_steps"] += 1
                metrics, columns = {"skipped": str(e)}, None
                if rank == 0:
                    tqdm.write(f"step {step + 1}: skipped, {e}")
                if state["bad_in_a_row"] >= cfg.max_bad_steps:
                    raise BadStepError(f"{state['bad_in_a_row']} steps in a row were skipped (last: {e}); "
                                       "stopping. Lower lr, check the data, or use float32") from None
            metrics.update({"step": step + 1, "skipped_steps": state["skipped_steps"]})
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                metrics.update(evaluate(policy, tok, eval_sets, cfg))
            log(metrics)
            every = cfg.log_completions_every
            if rank == 0 and columns is not None and every and (step + 1) % every == 0:
                write_jsonl(completions_path, completion_rows(step + 1, columns))
            if columns is not None:
                shown = ("score", "kl", "completions/mean_length", "train/accuracy")
                bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in shown if k in metrics})
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
                save_checkpoint(run_dir, step + 1, policy, tok, optimizer, scheduler, state)
        bar.close()

        final = evaluate(policy, tok, eval_sets, cfg, cfg.eval_samples)
    log({"step": cfg.steps, "final": True, **final})
    save_final(os.path.join(run_dir, "final"), policy, tok)
    summary = {"run_dir": run_dir, "before": state["eval_before"], "after": final,
               "wall_s": time.time() - started}
    if rank == 0:
        print_summary(summary, metrics_path, cfg)
    return summary


def chat_prompts(cfg, tok, questions, answers):
    """(prompts in the chat template, their answers or None) without those longer than max_prompt_length."""
    texts = [format_prompt(tok, q, cfg.system_prompt) for q in questions]
    kept = [i for i, t in enumerate(texts)
            if len(tok(t, add_special_tokens=False)["input_ids"]) <= cfg.max_prompt_length]
    if not kept:
        raise DataError(f"every prompt of {cfg.train_data['path']} is longer than max_prompt_length")
    return [texts[i] for i in kept], [answers[i] for i in kept] if answers else None


def completion_rows(step, columns):
    """completions.jsonl lines of one step: one JSON object per completion, plain ints, bools and floats."""
    as_json = {"length": int, "truncated": bool}  # the other tensor columns are floats
    return [{"step": step, **{k: v[i] if isinstance(v, list) else as_json.get(k, float)(v[i])
                              for k, v in columns.items()}} for i in range(len(columns["completion"]))]


@torch.no_grad()
def evaluate(model, tok, eval_sets, cfg, samples=0) -> dict:
    """{"eval/<set>/<metric>": value} on each held-out set: greedy accuracy, first_line, stopped, mean_length;
    with samples = k, mean@k and pass@k of k sampled ones (EXPLAINED). Under torchrun rank r takes batches r,
    r + N, ... of eval_batch_size prompts (one process's very batches: greedy results equal its own)."""
    batch, out, k = cfg.eval_batch_size, {}, samples
    model.eval()
    for spec, questions, gold in eval_sets:
        mine = my_batches(len(questions), batch)
        prompts = [format_prompt(tok, questions[i], cfg.system_prompt) for i in mine]
        answers = [gold[i] for i in mine]
        counts = dict.fromkeys(("accuracy", "first_line", "stopped", "mean_length", f"mean@{k}", f"pass@{k}"),
                               0.0)
        with gathered(model):
            if mine:
                greedy = sample_groups(model, tok, prompts, 1, cfg.max_completion_length, batch, greedy=True)
                counts["accuracy"] = grade(greedy, prompts, answers, cfg.answer_format).sum()
                greedy.completions = [c.split("\n")[0] for c in greedy.completions]
                counts["first_line"] = grade(greedy, prompts, answers, cfg.answer_format).sum()
                counts["stopped"], counts["mean_length"] = (~greedy.truncated).sum(), greedy.lengths.sum()
            if mine and k:
                sampled = sample_groups(model, tok, prompts, k, cfg.max_completion_length, batch,
                                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
                correct = grade(sampled, prompts, answers, cfg.answer_format).view(len(prompts), k)
                counts[f"mean@{k}"], counts[f"pass@{k}"] = correct.mean(1).sum(), correct.amax(1).sum()
        counts["prompts"] = len(mine)
        total = sum_over_ranks({c: torch.tensor(float(v), device=model.device) for c, v in counts.items()})
        n = total.pop("prompts")
        out.update({f"eval/{eval_set_name(spec)}/{key}": (v / n).item() for key, v in total.items()
                    if k or "@" not in key})
    return out


def eval_set_name(spec):
    """A held-out set's name in the metrics: the synthetic task's split, else the file or dataset name."""
    return spec.get("split", "train") if spec["path"] == "synthetic" else os.path.basename(spec["path"])


def window_mean(metrics, key, last=True, fraction=0.2):
    """Mean of `key` over the first or last `fraction` of the trained steps (nan when never logged)."""
    trained = [m for m in metrics if "kl" in m]
    n = max(1, int(len(trained) * fraction))
    values = [m[key] for m in (trained[-n:] if last else trained[:n]) if key in m]
    return sum(values) / len(values) if values else float("nan")


REGIMES = {"base": "the tiny model's warm start was plain language modelling of solved problems (a base "
                   "model: the paper's regime); before RL it writes on past its first answer",
           "sft": "the tiny model was fine-tuned on prompt -> solution pairs (an instruction-tuned model)"}
EXPLAINED = {"accuracy": "greedy completion correct", "first_line": "its first line correct",
             "stopped": "greedy completions that end in a stop token", "mean@": "sampled completions correct",
             "pass@": "prompts with one of the k sampled correct"}


def print_summary(summary, metrics_path, cfg):
    metrics = read_jsonl(metrics_path)
    print(f"\nVIGOR run done in {summary['wall_s']:.0f} s -> {summary['run_dir']}")
    if cfg.model == "tiny":
        print(f"  regime {cfg.task}: {REGIMES[cfg.task]}")
    print("  held out, before RL (the starting model) -> after RL (the final model):")
    for key, after in summary["after"].items():
        what = next((v for k, v in EXPLAINED.items() if k in key.split("/")[-1]), None)
        if what:
            print(f"    {key}: {summary['before'][key]:.1%} -> {after:.1%}  ({what})")
    score = {"vigor": "-sqrt(T) * ||g||", "self_certainty": "self-certainty", "gt": "correctness",
             "random": "uniform noise"}[cfg.reward]
    for key, what in [("completions/mean_length", "mean completion length (tokens)"),
                      ("score", f"mean score ({score})"),
                      ("reward_std/within_group", "reward std within groups (0 mean for rank rewards)"),
                      ("kl", "KL to reference (k3, per token)"),
                      ("train/accuracy", "sampled-completion accuracy")]:
        if any(key in m for m in metrics):
            print(f"  {what}: first 20% of steps {window_mean(metrics, key, False):.4g} -> last 20% "
                  f"{window_mean(metrics, key):.4g}")
    print("  wrote config.json, metrics.jsonl, completions.jsonl, checkpoint-*/ and final/ in "
          f"{summary['run_dir']}")
    print_group(summary["run_dir"], cfg.num_generations)


def print_group(run_dir, G):
    """One group of the last logged step, the method on real data: each completion's T, raw ||g||, score S,
    reward R, advantage A and grade. The first group whose completions are not all graded alike, if any."""
    path = os.path.join(run_dir, "completions.jsonl")
    rows = read_jsonl(path) if os.path.isfile(path) else []  # none logged: no step ran, or logging is off
    if not rows:
        return
    last = [r for r in rows if r["step"] == rows[-1]["step"]]
    groups = [last[i:i + G] for i in range(0, len(last), G)]
    group = next((g for g in groups if len({r.get("correct") for r in g}) > 1), groups[0])
    print_table(f"one group of step {group[0]['step']}, prompt {group[0]['prompt']!r}: T tokens (EOS "
                "included), raw ||g||, S = -sqrt(T)*||g|| (or the reward's own score), reward R, advantage A",
                ["T", "||g||", "S", "R", "A", "correct", "completion"],
                [(r["length"], r.get("grad_norm", "-"), r["score"], r["reward"], r["advantage"],
                  {1.0: "yes", 0.0: "no"}.get(r.get("correct"), "-"), repr(r["completion"][:48]))
                 for r in group])


# --- Data: the synthetic task, prompt loading through `datasets`, answer grading ----------------------------
def synthetic_problems(n, seed, exclude=frozenset()):
    """Chains of 2-4 one-digit additions/subtractions. The worked solution lists the running totals
    ("7+5-3=" -> "12,9"), the answer is the last ("9"); the warm start teaches both, so the model chooses how
    much to write (completions of one prompt differ in length 2x and more); the last number is graded."""
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < n:
        k = rng.randint(2, 4)
        nums, ops = [rng.randint(0, 9) for _ in range(k)], [rng.choice("+-") for _ in range(k - 1)]
        prompt = str(nums[0]) + "".join(o + str(x) for o, x in zip(ops, nums[1:])) + "="
        if prompt in seen:
            continue
        seen.add(prompt)
        totals = [nums[0]]
        for o, x in zip(ops, nums[1:]):
            totals.append(totals[-1] + x if o == "+" else totals[-1] - x)
        rows.append({"prompt": prompt, "solution": ",".join(map(str, totals[1:])), "answer": str(totals[-1])})
    return rows


@functools.lru_cache(maxsize=None)
def synthetic_split(split):
    """Four disjoint splits: 'warmstart' (gold completions teach the tiny model), 'train' (RL prompts the
    warm start never saw, like the paper's MATH problems for a base model), 'test' (held out, reported),
    'validation' (held out, to choose hyperparameters). Fixed, not seeded: every run shares one warm start."""
    sizes, seen, rows = {"warmstart": 4000, "train": 2000, "test": 1000, "validation": 500}, set(), {}
    if split not in sizes:
        raise DataError(f"synthetic data has splits {list(sizes)}, not {split!r}")
    for seed, name in enumerate(sizes):
        rows[name] = synthetic_problems(sizes[name], seed=1234 + seed, exclude=seen)
        seen |= {r["prompt"] for r in rows[name]}
    return rows[split]


FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(spec: dict):
    """A `datasets.Dataset` from a data setting: 'synthetic', a local file or folder, or a hub name."""
    import datasets
    path, split = spec["path"], spec.get("split", "train")
    if path == "synthetic":
        return datasets.Dataset.from_list(synthetic_split(split))
    builder = FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
    try:
        if builder:
            if not os.path.isfile(path):
                raise DataError(f"dataset file not found: {path}")
            return datasets.load_dataset(builder, data_files=path, split="train")
        return datasets.load_dataset(path, spec.get("name"), split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the path and the cause
        where = "folder" if os.path.isdir(path) else "file" if builder else "hub dataset (needs network)"
        raise DataError(f"could not load {where} {path!r} (split {split!r}): {type(e).__name__}: {e}") from e


def load_prompts(spec: dict):
    """(prompts, answers or None) from a data setting; missing columns and empty sets are DataErrors."""
    ds = load_rows(spec)
    prompt_col = spec.get("prompt_column", "prompt")
    answer_col = spec.get("answer_column", "answer" if "answer" in ds.column_names else None) or None
    for col in (prompt_col, answer_col):
        if col and col not in ds.column_names:
            raise DataError(f"column {col!r} not in {spec['path']}: its columns are {ds.column_names}")
    if spec.get("limit"):
        ds = ds.select(range(min(int(spec["limit"]), len(ds))))
    if len(ds) == 0:
        raise DataError(f"dataset {spec['path']} (split {spec.get('split', 'train')!r}) has no rows")
    return [str(p) for p in ds[prompt_col]], ([str(a) for a in ds[answer_col]] if answer_col else None)


def format_prompt(tokenizer, question, system_prompt=""):
    """Chat template with the system prompt when the tokenizer has one, else plain text."""
    if tokenizer.chat_template:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system_prompt}\n{question}" if system_prompt else question


def answer_format(prompt, setting="auto"):
    """How the answer of a completion to `prompt` is read: `setting`, or with 'auto' the format the prompt
    (system prompt included) asks for: '\\boxed' -> boxed, '####' -> gsm8k, neither -> last_number."""
    if setting != "auto":
        return setting
    if "\\boxed" in prompt:
        return "boxed"
    return "gsm8k" if "####" in prompt else "last_number"


def last_boxed(text):
    """Content of the last \\boxed{...} (nested braces allowed), None when there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")  # the comma of 1,000 (but not of 12,9: two running totals)


def extract_answer(text, fmt="last_number"):
    """The final answer of a completion in format `fmt`, None when it has none (no credit, as in open-r1):
    boxed: the last \\boxed{...};  gsm8k: the number after the first '####' (lm-eval's strict match: a model
    that rambles on after its answer is graded on the answer);  last_number: the last number."""
    if fmt == "boxed":
        return last_boxed(text)
    if fmt == "gsm8k":
        found = re.search(r"####\s*\$?\s*(-?[\d,]*\.?\d+)", text)
        return found.group(1) if found else None
    numbers = re.findall(r"-?\d+(?:\.\d+)?", THOUSANDS.sub("", text))
    return numbers[-1] if numbers else None


def gold_answer(gold):
    """A gold answer read whole in its own format: a MATH solution's \\boxed{}, a GSM8K '#### N', else the
    text itself (MATH-500's bare `\\frac{14}{3}`, the synthetic task's `9`)."""
    if "\\boxed{" in gold:
        return last_boxed(gold)
    if "####" in gold:
        return extract_answer(gold, "gsm8k")
    return gold


def normalize_answer(answer):
    """The answer's text without spacing, LaTeX sizing and thousands commas; a number as its value: an integer
    exactly at any size (floats round past 2^53), -0 as 0."""
    s = re.sub(r"\\text\{(.*?)\}|\\left|\\right|\\[!,;: ]|\$|\s", r"\1", answer).rstrip(".")
    s = THOUSANDS.sub("", s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    if re.fullmatch(r"[-+]?\d+", s):
        return str(int(s))
    try:
        value = float(s)
    except ValueError:
        return s
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value + 0.0)


PLAIN_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def is_correct(completion, gold, fmt="last_number"):
    """Is the completion's answer, read in format `fmt`, the gold answer? Equal after normalisation (numbers
    as floats), else equal for math-verify, the grader of the authors and open-r1 (`\\frac12` = 0.5, 3/4 =
    0.75, `2,1` = `1,2` as sets, tuples, intervals, expressions; it reads "12,9" as the set {9, 12}). Two
    plain numbers that differ as floats are unequal without asking it: the synthetic task's fast path."""
    pred, target = extract_answer(completion, fmt), gold_answer(gold.strip())
    if not pred or not target:
        return False
    pred_n, target_n = normalize_answer(pred), normalize_answer(target)
    if pred_n == target_n:
        return True
    if PLAIN_NUMBER.fullmatch(pred_n) and PLAIN_NUMBER.fullmatch(target_n):
        return False
    from math_verify import parse, verify
    return bool(verify(parse(f"${target}$"), parse(f"${pred}$")))


def grade(rollouts, prompts, answers, setting="auto"):
    """[N] floats, 1.0 where a completion is correct, each read in the format its prompt asks for."""
    return torch.tensor([float(is_correct(c, answers[i], answer_format(prompts[i], setting)))
                         for c, i in zip(rollouts.completions, rollouts.prompt_index)])


# --- Models: a tiny Qwen2 with a character tokenizer (warm-started and cached), or from_pretrained ----------
def char_tokenizer():
    """One token per character (printable ASCII and newline) plus <pad>, <eos>, <unk>."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = ["<pad>", "<eos>", "<unk>", "\n"] + [chr(c) for c in range(32, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = tokenizers.decoders.Fuse()
    specials = {"pad_token": "<pad>", "eos_token": "<eos>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def pad_right(rows, pad_id, dtype=torch.long):
    """[B, L] tensor from lists of token ids (or other values), padded on the right."""
    out = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out


WARMSTART_PACKED = (16, 64)  # base: rows of packed documents per step, tokens per row


def warmstart_sequence(cfg, rows, rng, tok, length):
    """One sequence of the warm start: (token ids, loss weight of predicting each). sft: a prompt and its
    solution, EOS after the answer, loss on the solution only. base: documents of a geometric number of solved
    problems (mean doc_problems), one per line, EOS at the end, packed up to `length` tokens; loss on every
    token (the problems' text weighted by prompt_weight); a share wrong_share of answers is off by one."""
    base, ids, weights = cfg.task == "base", [], []
    while not ids or (base and len(ids) < length):
        count = 1
        while base and rng.random() > 1 / cfg.doc_problems:
            count += 1
        for r in rng.sample(rows, count):
            solution = r["answer"] if rng.random() < cfg.direct_share else r["solution"]
            if base and rng.random() < cfg.wrong_share:
                head, comma, last = solution.rpartition(",")
                solution = head + comma + str(int(last) + rng.choice((-1, 1)))
            prompt = tok.convert_tokens_to_ids(list(r["prompt"]))  # one token per character
            answer = tok.convert_tokens_to_ids(list(solution + "\n"))  # the newline: on to another problem
            ids += prompt + answer
            weights += [cfg.prompt_weight if base else 0.0] * len(prompt) + [1.0] * len(answer)
        ids[-1] = tok.eos_token_id  # the document's last line ends in EOS instead
    return ids[:length], weights[:length]


def train_warmstart(cfg: Config, arch: dict, rows: list):
    """(model, tokenizer): the tiny model trained from scratch by its warm-start recipe (`warmstart_sequence`,
    warmstart_steps of AdamW on a cosine schedule). Seeded: the same machine gives the same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = char_tokenizer()
    torch.manual_seed(0)  # the warm start is the "base model": the same for every RL seed
    model = Qwen2ForCausalLM(Qwen2Config(**arch, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    rng = random.Random(0)
    batch, length = (64, arch["max_position_embeddings"]) if cfg.task == "sft" else WARMSTART_PACKED
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmstart_lr)
    for step in range(cfg.warmstart_steps):
        seqs, weights = zip(*(warmstart_sequence(cfg, rows, rng, tok, length) for _ in range(batch)))
        ids, w = pad_right(seqs, tok.pad_token_id), pad_right(weights, 0, torch.float)[:, 1:]
        loss = -(token_logps(model(input_ids=ids).logits, ids) * w).sum() / w.sum()
        for g in opt.param_groups:
            g["lr"] = cfg.warmstart_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.warmstart_steps))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, tok


def code_tokens(*functions):
    """The functions' code as Python reads it: its tokens, without docstrings, comments or layout (the same
    on Python 3.9 to 3.13)."""
    code, marks = [], {tokenize.INDENT: "{", tokenize.DEDENT: "}", tokenize.NEWLINE: ";"}
    for function in functions:
        source = inspect.getsource(function)
        node = ast.parse(source).body[0]
        doc = range(node.body[0].lineno, node.body[0].end_lineno + 1) if ast.get_docstring(node) else ()
        code += [marks.get(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
                 if t.type not in (tokenize.COMMENT, tokenize.NL) and t.start[0] not in doc]
    return code


RECIPE_CODE = code_tokens(warmstart_sequence, train_warmstart)  # at import: the code that runs, not the file


def warmstart_recipe(cfg: Config):
    """(settings, key, architecture): the settings that shape the tiny model's warm start, and the hash of all
    that does (those settings, the architecture, the data, and the `code_tokens` of `warmstart_sequence` and
    `train_warmstart`), stored beside the shipped weights so that a changed recipe cannot pass for them."""
    path = cfg.tiny_model_config
    path = path if os.path.isfile(path) else os.path.join(HERE, path)
    if not os.path.isfile(path):
        raise ConfigError(f"tiny_model_config not found: {cfg.tiny_model_config}")
    arch = json.load(open(path))
    names = ["task", "warmstart_steps", "warmstart_lr", "direct_share"]
    names += ["doc_problems", "wrong_share", "prompt_weight"] if cfg.task == "base" else []
    settings = {k: getattr(cfg, k) for k in names}
    recipe = [settings, arch, synthetic_split("warmstart"), RECIPE_CODE]
    return settings, hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12], arch


def tiny_base_model(cfg: Config) -> str:
    """The folder of `model: tiny`: the shipped warm start of `task`, tiny_configs/tiny-<task>/ (the weights
    every number of the README was measured on), once its stored recipe key is this code's and settings'."""
    folder = os.path.join(HERE, "tiny_configs", f"tiny-{cfg.task}")
    settings, key, _ = warmstart_recipe(cfg)
    path = os.path.join(folder, "recipe.json")
    shipped = json.load(open(path)) if os.path.isfile(path) else {"key": None, "settings": {}}
    if shipped["key"] != key:
        changed = [k for k in settings if shipped["settings"].get(k) != settings[k]] or [
            "the code of warmstart_sequence or train_warmstart, the data or the architecture"]
        flags = " ".join(f"--{k} {v}" for k, v in settings.items())
        raise ConfigError(f"model 'tiny' is the shipped warm start {folder} (recipe key {shipped['key']}); "
                          f"this recipe (key {key}) differs in: {', '.join(changed)}. Build it with `python "
                          f"vigor.py warmstart OUT {flags}` (~40 s) and train with --model OUT")
    return folder


def load_model(path_or_name: str, cfg: Config, device, dtype):
    """(model, tokenizer) through `from_pretrained`, from a local folder or the hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    looks_local = path_or_name.startswith((".", "/", "~")) or path_or_name.count("/") > 1
    if looks_local and not os.path.isdir(path_or_name):
        raise ConfigError(f"model folder not found: {path_or_name}")
    try:
        remote = cfg.trust_remote_code
        tok = AutoTokenizer.from_pretrained(path_or_name, trust_remote_code=remote)
        model = AutoModelForCausalLM.from_pretrained(path_or_name, dtype=dtype, trust_remote_code=remote,
                                                     attn_implementation=cfg.attn_implementation)
    except OSError as e:
        raise ConfigError(f"could not load model {path_or_name!r} (a local folder, or a hub name with "
                          f"network): {e}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # dropout would make the gradient norm random; the tiny model and Qwen2.5 have none, eval() makes sure
    return model.to(device).eval(), tok


def load_policy(cfg, base, ckpt, device, dtype, reference=True):
    """(policy, tokenizer, frozen reference); with LoRA (or reference=False) the reference is None (the policy
    with its adapter off). Both keep float32 weights and compute in `dtype` under autocast, so at step 0 the
    reference IS the policy: a bf16 copy would be another, differently rounded model (autocast keeps the
    residual stream and RMSNorm of float32 weights in float32), and beta * KL would pull toward it."""
    if not cfg.lora_r:
        policy, tok = load_model(ckpt or base, cfg, device, torch.float32)
        ref = load_model(base, cfg, device, torch.float32)[0].requires_grad_(False) if reference else None
    else:
        from peft import LoraConfig, PeftModel, get_peft_model
        model, tok = load_model(base, cfg, device, torch.float32)
        if ckpt:
            policy = PeftModel.from_pretrained(model, ckpt, is_trainable=True)
        else:
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                              target_modules="all-linear")
            policy = get_peft_model(model, lora)
        ref = None
    off = sum(without_dropout(m) for m in (policy, ref) if m is not None and cfg.disable_dropout)
    if off and rank_and_world()[0] == 0:
        print(f"disable_dropout: {off} dropout rates of the policy and the reference set to 0")
    if cfg.gradient_checkpointing:  # active in train mode only: the reward pass (eval mode) is untouched
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.disable_input_require_grads()  # its hook calls requires_grad_(), which torch.func forbids
    return policy, tok, ref


def without_dropout(model):
    """Sets every dropout rate of the model to 0 and returns how many were not: nn.Dropout modules (what TRL's
    disable_dropout does) and the float rates that attention functions read in train mode from their module
    or the config (Qwen2's `dropout=0.0 if not self.training else self.attention_dropout`)."""
    from transformers import PretrainedConfig
    configs = [getattr(m, "config", None) for m in model.modules()]
    configs = [c for c in configs if isinstance(c, PretrainedConfig)]
    configs += [v for c in configs for v in vars(c).values() if isinstance(v, PretrainedConfig)]  # nested
    off = 0
    for obj in [*model.modules(), *configs]:  # a config seen twice has no rate left the second time
        rates = [k for k, v in vars(obj).items() if "drop" in k and isinstance(v, float) and v > 0]
        rates += ["p"] if isinstance(obj, torch.nn.modules.dropout._DropoutNd) and obj.p > 0 else []
        for k in rates:
            setattr(obj, k, 0.0)
        off += len(rates)
    return off


def end_of_turn_id(tok):
    """The special token the chat template closes an assistant turn with (Qwen2.5's <|im_end|>, Llama 3's
    <|eot_id|>), found by rendering a turn; None without a template or when the turn ends in plain text."""
    if not tok.chat_template:
        return None
    turn = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "\x00"}]
    text = tok.apply_chat_template(turn, tokenize=False)
    after = tok(text.rsplit("\x00", 1)[-1], add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    return after[0] if after and after[0] in special else None


def stop_token_ids(model, tok):
    """Generation ends at the model's EOS ids, the tokenizer's EOS and the chat template's end of turn: a
    base model's EOS (Qwen2.5's <|endoftext|>) is not the template's, and it would write invented turns."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return sorted(ids | {tok.eos_token_id, end_of_turn_id(tok)} - {None})


# --- Appendix 1: settings from the command line and config files --------------------------------------------
COMMANDS_HELP = """commands:
  python vigor.py [--config FILE] [--setting value ...]        train (defaults: the tiny base model)
  torchrun --nproc_per_node N vigor.py [...]                    train on N processes (parallelism)
  python vigor.py study [--seeds ...] [--lrs ...] [...]        every reward x lr x seed, the paper's claims
  python vigor.py signal [--prompts 64] [--scores ...] [...]   every score on one set of rollouts, no training
  python vigor.py length-bias | rank-table RUN_DIR...          analyses of run folders
  python vigor.py warmstart OUT [--task sft]                   build a tiny starting model by its recipe
  python vigor.py handout DIR | check [N] [--json] | check runs     the exercises: a student copy, graders
Every --setting takes a value parsed as YAML (true, 1e-4, '{path: x.jsonl}'); later flags and files win."""


class SettingsParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit the process; main() and the tests expect a ConfigError
        raise ConfigError(re.sub(r"argument (--\w+): expected one argument", r"\1 needs a value", message))


def parse_command_line(argv, prog, *kinds):
    """One settings object per dataclass of `kinds`, from its defaults <- each `--config FILE` (YAML) <- the
    `--setting value` flags. The flags, their help, defaults and valid values come from the fields."""
    parser = SettingsParser(prog=prog, usage=f"{prog} [--config FILE] [--setting value ...]",
                            epilog=COMMANDS_HELP, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML file of settings")
    for f in (f for kind in kinds for f in dataclasses.fields(kind)):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        valid = f" Valid: {f.metadata['valid']}." if f.metadata["valid"] else ""
        text = f"{f.metadata['help']}.{valid} Default: {default!r}".replace("%", "%%")
        bare_flag = {"nargs": "?", "const": "true"} if f.type is bool else {}  # `--static_cache` = true
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, metavar=f.type.__name__, help=text,
                            **bare_flag)
    args, rest = parser.parse_known_args(argv)
    if rest and not rest[0].startswith("--"):
        raise ConfigError(f"expected --setting value, got {rest[0]!r}")
    values = {}
    for path in args.config:
        values.update(read_config_file(path))
    cli = {k: v for k, v in vars(args).items() if k != "config"}
    cli.update({a[2:].split("=")[0]: "" for a in rest if a.startswith("--")})  # unknown: make_config says so
    values.update(cli)
    settings = []
    for kind in kinds[:-1]:  # the last kind takes the rest, and names any setting that no kind has
        names = {f.name for f in dataclasses.fields(kind)} & set(values)
        settings.append(make_config({k: values.pop(k) for k in names}, set(cli), kind))
    return settings + [make_config(values, set(cli), kinds[-1])]


def read_config_file(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(open(path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(loaded).__name__}")
    return loaded


def load_config(argv=None) -> Config:
    """The training settings of `python vigor.py [--config FILE] [--setting value ...]`."""
    return parse_command_line(sys.argv[1:] if argv is None else argv, "python vigor.py", Config)[0]


def _typed(name, kind, value, from_cli):
    """Convert one setting to its field's type, or raise a ConfigError naming what was expected."""
    if from_cli and kind is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--{name}: cannot parse {value!r}: {e}") from None
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"setting {name!r} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def make_config(values: dict, from_cli=(), kind=Config):
    """Settings (a Config by default) from a {name: value} dict; unknown names, wrong types and bad values are
    ConfigErrors. Names in `from_cli` hold command-line text, parsed as YAML."""
    kinds = {f.name: f.type for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; valid settings: {', '.join(kinds)}")
    return kind(**{k: _typed(k, kinds[k], v, k in from_cli) for k, v in values.items()})


DATA_KEYS = {"path", "name", "split", "prompt_column", "answer_column", "limit"}


def validate(cfg: Config):
    """Each setting's valid values (from its field), then combinations; a ConfigError says what is wrong."""
    for f in dataclasses.fields(cfg):
        value, valid = getattr(cfg, f.name), f.metadata["valid"]
        if isinstance(valid, tuple) and value not in valid:
            raise ConfigError(f"{f.name} must be one of {valid}")
        if isinstance(valid, str) and not BOUNDS[valid](value):
            raise ConfigError(f"{f.name} must be {valid}")
    checks = [
        (cfg.num_generations >= 2,
         "num_generations (G) must be >= 2: GRPO compares completions within a group"),
        (bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device)), "device must be auto, cpu, cuda or cuda:N"),
        (bool(cfg.run_name) and os.sep not in cfg.run_name, "run_name must be a non-empty folder name"),
        (cfg.reward_params != "lm_head" or not cfg.lora_r, "reward_params lm_head measures the LM head, and "
         "LoRA freezes the head (its adapters sit in the decoder): with lora_r > 0 use reward_params all"),
        (cfg.parallelism != "fsdp" or not cfg.lora_r, "parallelism fsdp shards a full fine-tune; with LoRA "
         "use ddp (the frozen base is then replicated and only the adapter is trained)"),
        (cfg.parallelism != "fsdp" or cfg.reward != "vigor" or cfg.reward_params == "lm_head" or
         cfg.grad_norm_method == "per_layer", "parallelism fsdp needs grad_norm_method per_layer: "
         "torch.func's vmap cannot take per-sample gradients of sharded parameters"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for spec in [cfg.train_data, *cfg.eval_data]:
        if not isinstance(spec, dict) or "path" not in spec or set(spec) - DATA_KEYS:
            raise ConfigError(f"a data setting must be a mapping with 'path' and keys from "
                              f"{sorted(DATA_KEYS)}, got {spec!r}")


# --- Appendix 2: processes: one, or N under `torchrun --nproc_per_node N vigor.py` (DDP or FSDP2) ----------
def setup_device(cfg):
    """(device, dtype). Under torchrun (WORLD_SIZE set) also joins the process group: nccl on CUDA with one
    GPU per process (cuda:LOCAL_RANK), gloo on CPU. Settings are checked first, so every rank fails alike."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    world, local = int(os.environ.get("WORLD_SIZE", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device} asked for but CUDA is not available")
    if cfg.parallelism == "fsdp" and not world:
        raise ConfigError("parallelism fsdp shards the model over processes: launch with "
                          "torchrun --nproc_per_node N vigor.py ... (N = 1 works)")
    if world:
        if cfg.prompts_per_step % world:
            raise ConfigError(f"prompts_per_step {cfg.prompts_per_step} is the global batch: it must be a "
                              f"multiple of the {world} processes (each rank takes an equal share)")
        if name.startswith("cuda:"):
            raise ConfigError("under torchrun each process takes cuda:LOCAL_RANK: set device auto or cuda, "
                              "not cuda:N")
        if name == "cuda":
            if local >= torch.cuda.device_count():
                raise ConfigError(f"torchrun started a process for GPU {local}, but "
                                  f"{torch.cuda.device_count()} are visible")
            name = f"cuda:{local}"
            torch.cuda.set_device(name)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if name != "cpu" else "gloo")
    device = torch.device(name)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.dtype]
    return device, dtype


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_sum(t):
    """A tensor summed over every rank (itself on one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def sum_over_ranks(named):
    """{name: 0-d tensor} summed over every rank in one all-reduce (unchanged on one process)."""
    return dict(zip(named, all_sum(torch.stack(list(named.values())))))


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] for small picklable objects (texts, metrics, RNG states)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_columns(columns):
    """{name: [n] tensor or list} of every rank, concatenated in rank order (ranks hold equal shares)."""
    parts = all_gather(columns)
    return {k: torch.cat([p[k] for p in parts]) if torch.is_tensor(v) else [x for p in parts for x in p[k]]
            for k, v in columns.items()}


def barrier():
    if dist.is_initialized():
        dist.barrier()


def my_batches(n, batch_size):
    """Indices of this rank's items when n items go in batches of batch_size: batches r, r + N, r + 2N, ..."""
    rank, world = rank_and_world()
    mine = []
    for start in range(rank * batch_size, n, world * batch_size):
        mine.extend(range(start, min(start + batch_size, n)))
    return mine


def parallelize(cfg, policy, ref, dtype):
    """The module the update's forward and backward go through (generation and the reward pass use `policy`):
    one process, the policy; under torchrun, ddp: a DistributedDataParallel wrapper (each rank holds the whole
    model); fsdp: FSDP2 shards each decoder layer, then the rest, of policy and reference in place (1/N of the
    weights, gradients, AdamW states per rank; a layer is all-gathered for its forward and backward, in the
    compute dtype). Both average the ranks' gradients."""
    if not dist.is_initialized():
        return policy
    if cfg.parallelism == "ddp":  # the weights are broadcast from rank 0 (a LoRA init is random)
        on_gpu = [policy.device] if policy.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(policy, device_ids=on_gpu)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for model in (policy, ref):  # the same casts: at step 0 the reference computes what the policy does
        for layer in model.get_decoder().layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return policy


def fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model):
    """FSDP: every layer's full weights for generation and the reward pass (no-op otherwise), gathered once up
    front: ranks whose completions differ in length run different numbers of forwards, without collectives."""
    shards = fsdp_modules(model)
    for m in shards:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for m in shards:  # back to FSDP's defaults: the root's weights are kept for the backward that follows
            m.set_reshard_after_forward(m is not model, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)
            m.reshard()


def gradient_sync(wrapped, now):
    """DDP all-reduces gradients in every backward; on all but the last micro-batch, `no_sync` skips that."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not now:
        return wrapped.no_sync()
    return contextlib.nullcontext()


# --- Appendix 3: the run folder, metrics files and checkpoints ----------------------------------------------
@contextlib.contextmanager
def atomic(path):
    """Write `path` (a file or a folder) as the yielded `path.tmp`, which then replaces `path` in one rename:
    a kill at any moment leaves the old `path` or the complete new one."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    yield tmp
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_text_atomically(path, text):
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path, rows):
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def truncate_jsonl(path, last_step):
    """Keep the lines (judged by their parsed fields, never their text) of the steps up to the checkpoint's,
    not the final evaluation's: a resumed run redoes the rest. No checkpoint (last_step 0): none is kept."""
    if os.path.isfile(path):
        lines = open(path).readlines()
        keep = [line for line, row in zip(lines, map(json.loads, lines))
                if last_step and row["step"] <= last_step and not row.get("final")]
        write_text_atomically(path, "".join(keep))


def sharded_checkpoint(path, policy, optimizer, load=False):
    """FSDP: every rank writes (or reads back) its own shards of the weights and AdamW states, with
    torch.distributed.checkpoint; no rank ever holds the whole model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(policy, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if not load:
        return dcp.save(state, checkpoint_id=path)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_checkpoint(run_dir, step, policy, tok, optimizer, scheduler, state):
    """Atomic: write checkpoint-N.tmp, rename it, repoint `latest` (a kill at any moment leaves it naming a
    complete checkpoint). Weights in safetensors (FSDP: DCP shards in sharded/), the rest tensors and plain
    types (weights_only=True loading). Rank 0 writes all but the shards; every rank's RNG state is kept."""
    rank = rank_and_world()[0]
    name, sharded = f"checkpoint-{step}", bool(fsdp_modules(policy))
    rngs = all_gather({"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(policy.device)}
                                                        if policy.device.type == "cuda" else {})})
    folder = os.path.join(run_dir, name)
    # rank 0 makes the folder appear at once (atomic); under FSDP the other ranks add their shards to its .tmp
    with atomic(folder) if rank == 0 else contextlib.nullcontext(folder + ".tmp") as tmp:
        if rank == 0:

            tok.save_pretrained(tmp)
            if not sharded:
                policy.save_pretrained(tmp)
        if sharded:
            barrier()  # the folder is fresh before any rank writes into it
            sharded_checkpoint(os.path.join(tmp, "sharded"), policy, optimizer)
        if rank > 0:
            return
        trainer_state = {"optimizer": None if sharded else optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": rngs, "step": step, "state": state}
        torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    write_text_atomically(os.path.join(run_dir, "latest"), name)
    for old in os.listdir(run_dir):
        if old.startswith("checkpoint-") and old != name:
            shutil.rmtree(os.path.join(run_dir, old), ignore_errors=True)


def load_checkpoint(ckpt, policy, optimizer, scheduler):
    """Restore what `save_checkpoint` wrote (a non-sharded policy's weights are in already): (step, state).
    The same number of processes must resume it: each rank's RNG is restored."""
    (rank, world), device = rank_and_world(), policy.device
    saved = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # a list since torchrun came
    if len(rngs) != world:
        raise ConfigError(f"{ckpt} was written by {len(rngs)} process(es), this run has {world}: resume it "
                          f"with the same number (torchrun --nproc_per_node {len(rngs)}, or no torchrun for "
                          "1), since each rank's sampling generator is restored")
    if saved["optimizer"] is None:  # FSDP
        sharded_checkpoint(os.path.join(ckpt, "sharded"), policy, optimizer, load=True)
    else:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(rngs[rank]["torch"])
    if "cuda" in rngs[rank] and device.type == "cuda":
        torch.cuda.set_rng_state(rngs[rank]["cuda"], device)
    return saved["step"], saved["state"]


def save_final(folder, policy, tok):
    """final/ in save_pretrained format on rank 0; FSDP first gathers the whole weights to rank 0's CPU memory
    (every rank joins), so `from_pretrained(folder)` loads it like any model."""
    full = None
    if fsdp_modules(policy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank_and_world()[0] == 0:
        policy.save_pretrained(folder, state_dict=full)
        tok.save_pretrained(folder)
    barrier()  # the folder is complete when any rank returns


def latest_checkpoint(run_dir):
    path = os.path.join(run_dir, "latest")
    return os.path.join(run_dir, open(path).read().strip()) if os.path.isfile(path) else None


def check_run_dir(cfg: Config):
    """The run folder's path, after checking that an existing one holds this same run (to resume): a run
    folder is never overwritten, and a folder that is not one is never written into."""
    run_dir = os.path.join(cfg.out_dir, cfg.run_name)
    saved = os.path.join(run_dir, "config.json")
    if os.path.isfile(saved):
        if not cfg.resume:
            raise ConfigError(f"run folder {run_dir} exists and resume is off: choose another --run_name or "
                              "delete the folder")
        old = json.load(open(saved))
        diff = sorted(k for k, v in dataclasses.asdict(cfg).items() if k != "resume" and old.get(k) != v)
        if diff:  # a finished run is not extended: its cosine schedule ends at its own last step
            what = "; a run's steps are fixed (its lr schedule spans them): to train longer, start a new run"
            raise ConfigError(f"run folder {run_dir} holds a run with other settings ({', '.join(diff)})"
                              f"{what * ('steps' in diff)}; choose another --run_name or delete the folder")
    elif os.path.isdir(run_dir) and os.listdir(run_dir):
        raise ConfigError(f"{run_dir} exists and is not a vigor run folder (no config.json); refusing to "
                          "write there")
    return run_dir


def write_config(run_dir, cfg):
    saved = os.path.join(run_dir, "config.json")
    if not os.path.isfile(saved):
        os.makedirs(run_dir, exist_ok=True)
        write_text_atomically(saved, json.dumps(dataclasses.asdict(cfg), indent=2))


def prompt_batch(n_prompts, step, per_step, seed):
    """Indices of the prompts of one step: a fresh permutation each epoch, a pure function of the step
    (so a resumed run sees the same prompts as an uninterrupted one)."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n_prompts)
        out.append(torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch))[i].item())
    return out


# --- Tools 1: analyses of run folders, and the study: the paper's tables in miniature ----------------------
def read_jsonl(path):
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: is this a run folder?")
    return [json.loads(line) for line in open(path)]


def print_table(title, header, rows):
    """Print a markdown table under a title; return the text printed."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [title, "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    print("\n" + "\n".join(lines))
    return "\n".join(lines)


def logged_completions(run_dir, key):
    """(G, the completions.jsonl lines that hold `key`) of a run folder."""
    G = json.load(open(os.path.join(run_dir, "config.json")))["num_generations"]
    rows = [r for r in read_jsonl(os.path.join(run_dir, "completions.jsonl")) if key in r]
    if not rows:
        raise DataError(f"{run_dir} logged no {key} (grad_norm: reward vigor; correct: an answer_column)")
    return G, rows


def length_bias(run_dir, bins=4):
    """Does raw ||g|| shrink like 1/sqrt(T) with length while sqrt(T)*||g|| stays flat (paper)? Compared
    inside each group (completions of one prompt), so a prompt's difficulty cannot stand in for its length:
    a norm is divided by its group's geometric mean, and the slope of log-norm on log T, pooled over groups
    after removing each group's mean, estimates the exponent (paper: -0.5 raw, 0 corrected)."""
    G, rows = logged_completions(run_dir, "grad_norm")
    t = torch.tensor([float(r["length"]) for r in rows], dtype=torch.float64).view(-1, G)
    norm = torch.tensor([r["grad_norm"] for r in rows], dtype=torch.float64).log().view(-1, G)
    varied = t.amax(1) > t.amin(1)  # a group of equal lengths tells nothing
    if not varied.any():
        raise DataError(f"{run_dir}: no group has completions of different lengths")
    x, y = ((v - v.mean(1, keepdim=True))[varied].flatten() for v in (t.log(), norm))  # log T, log ||g||
    t = t[varied].flatten()
    slope = ((x * y).sum() / (x * x).sum()).item()
    order = t.argsort(stable=True)
    parts = [order[b * len(t) // bins:(b + 1) * len(t) // bins] for b in range(bins)]
    table = [(f"{t[p[0]]:.0f}-{t[p[-1]]:.0f}", len(p), y[p].mean().exp().item(),  # geometric means
              (y[p] + x[p] / 2).mean().exp().item()) for p in parts]
    print_table(f"length bias within groups, {run_dir}: slope of log ||g|| on log T {slope:+.2f} raw, "
                f"{slope + 0.5:+.2f} with sqrt(T) (paper: -0.5, 0)",
                ["T (tokens)", "completions", "raw ||g|| / group mean", "sqrt(T)*||g|| / group mean"], table)
    return slope, table


def correct_by_rank(scores, correct, G):
    """[groups, G]: is each group's completion at each rank of the score correct (column 0: the best-scored),
    with training's ranks and ties (`rank_rewards`): each group puts one completion at each rank."""
    rewards = rank_rewards(scores, G).view(-1, G)
    from_best = ((1 - rewards) * (G - 1) / 2).round().long()  # R = +1 -> 0, R = -1 -> G-1
    return torch.zeros_like(rewards).scatter_(1, from_best, correct.view(-1, G).float())


def rank_correctness(run_dir, fraction=0.2):
    """Fraction correct at each within-group rank of the run's score (1 = best): the first step's rollouts
    (sampled from the model before any update), the first and the last `fraction` of the steps."""
    G, rows = logged_completions(run_dir, "correct")
    steps = sorted({r["step"] for r in rows})
    k = max(1, int(len(steps) * fraction))

    def by_rank(chosen):
        rows_of = [r for r in rows if r["step"] in chosen]
        return correct_by_rank(torch.tensor([r["score"] for r in rows_of]),
                               torch.tensor([float(r["correct"]) for r in rows_of]), G).mean(0).tolist()
    table = {when: by_rank(chosen)
             for when, chosen in (("step 1", steps[:1]), ("early", steps[:k]), ("late", steps[-k:]))}
    print_table(f"rank vs correctness, {run_dir} (early/late: first/last {fraction:.0%} of steps)",
                ["rank (1 = best score)", *table], list(zip(range(1, G + 1), *table.values())))
    return table


STUDY = {"vigor": {}, "vigor_no_sqrt_t": {"sqrt_t": False}, "vigor_no_rank": {"rank": False},
         "self_certainty": {"reward": "self_certainty"}, "gt": {"reward": "gt"},
         "random": {"reward": "random"}}
ABLATIONS = ("vigor_no_sqrt_t", "vigor_no_rank")  # run at the regime's own lr only
REGIME_CONFIGS = {"base": [], "sft": ["tiny_configs/sft.yaml"]}  # read before the study's own flags


@dataclass
class StudySettings:
    seeds: str = arg("7,8,9", "comma-separated seeds; every row of the study runs once per seed")
    regimes: str = arg("base,sft", "comma-separated values of `task`; each regime's own settings (sft: "
                       "tiny_configs/sft.yaml) come before the study's flags")
    rows: str = arg(",".join(STUDY), f"comma-separated rows, from {', '.join(STUDY)}")
    lrs: str = arg("2e-4,1e-4,5e-5,2e-5,1e-5", "comma-separated learning rates: every row runs at each, "
                   "the ablations only at the regime's own `lr` (the chosen one, marked in the tables)")


def listed(text, kind, flag):
    """The values of a comma-separated setting (none for ''), or a ConfigError that names its flag."""
    try:
        return [kind(v) for v in text.split(",") if v]
    except ValueError:
        raise ConfigError(f"--{flag} takes comma-separated {kind.__name__}s, got {text!r}") from None


def lr_text(lr):
    return f"{lr:.1e}".replace(".0e", "e")  # 2e-04, 5e-05, 2.5e-05


def mean_sd(values, scale=100.0, fmt=".1f"):
    """'mean ± sd' of one number over seeds (sd 0 for a single seed); fractions are shown in points."""
    t = torch.tensor(values, dtype=torch.float64) * scale
    sd = t.std().item() if len(t) > 1 else 0.0
    return f"{t.mean().item():{fmt}} ± {sd:{fmt.lstrip('+')}}"


def per_seed_text(values, scale=100.0, fmt="+.1f"):
    return ", ".join(f"{v * scale:{fmt}}" for v in values)


def holds(values):
    """The strict verdict on per-seed values: yes if positive on every seed, NO if on none, else mixed."""
    return "mixed" if min(values) <= 0 < max(values) else "yes" if min(values) > 0 else "NO"


def study(argv):
    """The paper's comparison in miniature, as a dose-response grid: per regime (the tiny model's warm start,
    `task`), every row at every lr of the grid (the ablations at the regime's own lr) over the seeds,
    evaluated before and after RL on the first eval set (reported). Writes study.md (`study_tables`, also
    printed). Finished runs are reused, a stopped one resumed (`study_run`): a study can be run in parts. (The
    batch grid, each row at 16, 64 and 128 prompts per step, ran on commit b6df794: --prompts_per_steps.)"""
    settings = parse_command_line(argv, "python vigor.py study", StudySettings, Config)[0]
    seeds, lrs = listed(settings.seeds, int, "seeds"), listed(settings.lrs, float, "lrs")
    rows, regimes = settings.rows.split(","), settings.regimes.split(",")
    if set(rows) - set(STUDY) or set(regimes) - set(REGIME_CONFIGS):
        raise ConfigError(f"study: rows come from {list(STUDY)}, regimes from {list(REGIME_CONFIGS)}")
    text = ""
    for regime in regimes:
        base = regime_config(regime, argv)
        runs = defaultdict(list)  # (row, lr) -> its run folders, one per seed
        for seed, lr in [(seed, lr) for seed in seeds for lr in sorted(set(lrs) | {base.lr}, reverse=True)]:
            for name in [name for name in rows if name not in ABLATIONS or lr == base.lr]:
                runs[name, lr].append(study_run(make_config({
                    **dataclasses.asdict(base), **STUDY[name], "task": regime, "seed": seed, "lr": lr,
                    "run_name": f"study-{regime}-{name}-lr{lr_text(lr)}-s{seed}"})))
        if rank_and_world()[0] == 0:  # under torchrun, rank 0 alone writes the tables
            reported = eval_set_name(base.eval_data[0])
            text += study_tables(regime, runs, seeds, base.eval_samples, reported, base.lr)
    if rank_and_world()[0] == 0:
        write_text_atomically(os.path.join(base.out_dir, "study.md"), text)


def study_run(cfg):
    """One run of the study, trained (or resumed from its last checkpoint), or reused once it has ended
    (its final evaluation logged; a folder of other settings is refused): its folder."""
    run_dir = check_run_dir(cfg)
    path = os.path.join(run_dir, "metrics.jsonl")
    done = os.path.isfile(path) and any(row.get("final") for row in read_jsonl(path))
    print(f"\n=== {cfg.run_name}" + ": finished, reused" * done)
    return run_dir if done else train(cfg)["run_dir"]


def regime_config(regime, argv):
    """A regime's settings in the study: its own config files (REGIME_CONFIGS), then the study's flags."""
    files = [a for path in REGIME_CONFIGS[regime] for a in ("--config", os.path.join(HERE, path))]
    return parse_command_line(files + argv, "python vigor.py study", StudySettings, Config)[1]


def study_tables(regime, runs, seeds, k, reported, chosen):
    """The tables of one regime from its run folders, {(row, lr): one per seed}: the starting model, every
    cell (reward x lr), and the paper's claims at each lr: their text."""
    logs = {cell: [read_jsonl(os.path.join(d, "metrics.jsonl")) for d in dirs] for cell, dirs in runs.items()}
    test = f"eval/{reported}/"
    lrs = sorted({lr for _, lr in logs}, reverse=True)
    names = list(dict.fromkeys(name for name, _ in logs))
    cells = [(name, lr) for name in names for lr in lrs if (name, lr) in logs]
    col = {lr: lr_text(lr) + " (chosen)" * (lr == chosen) for lr in lrs}

    def over_seeds(cell, value_of, *fmt):  # mean_sd of value_of(one seed's metrics lines)
        return mean_sd([value_of(log) for log in logs[cell]], *fmt)

    def gain(key):  # the final model's minus the starting model's, on the reported set
        return lambda log: log[-1][test + key] - log[0][test + key]
    gains = {cell: [gain("accuracy")(log) for log in logs[cell]] for cell in cells}
    with contextlib.redirect_stdout(io.StringIO()):  # the tables of each run would drown the summary
        ranks = {cell: [rank_correctness(d) for d in runs[cell]] for cell in cells}
        slopes = {cell: [length_bias(d)[0] for d in runs[cell]] for cell in cells
                  if cell[0].startswith("vigor") and cell[1] == chosen}
    keys = ["accuracy", "first_line", "stopped", f"mean@{k}", f"pass@{k}"]
    text = print_table(f"{regime}: the starting model before RL, % of the {reported} set (mean ± sd over "
                       f"seeds {seeds})", keys, [[over_seeds(cells[0], lambda log: log[0][test + key])
                                                  for key in keys]])

    def detail(cell):
        rank_1_and_g = [" / ".join(f"{100 * sum(r[when][i] for r in ranks[cell]) / len(seeds):.0f}"
                                   for i in (0, -1)) for when in ("step 1", "early")]
        return (cell[0], col[cell[1]], over_seeds(cell, lambda log: log[-1][test + "accuracy"]),
                mean_sd(gains[cell], 100, "+.1f"), over_seeds(cell, gain(f"mean@{k}"), 100, "+.1f"),
                over_seeds(cell, lambda log: window_mean(log, "kl"), 1, ".2g"), *rank_1_and_g,
                " -> ".join(over_seeds(cell, lambda log: window_mean(log, "completions/mean_length", last), 1,
                                       ".1f") for last in (False, True)))
    text += "\n\n" + print_table(
        f"{regime}: every cell on {reported}, mean ± sd over seeds: the final model (%; gains in points), "
        "KL to the reference, % of groups whose best- and worst-scored completions are correct (rank 1 / "
        "rank G), length",
        ["reward", "lr", "greedy, final", "gain", f"mean@{k} gain", "KL, last 20% of steps",
         "rank 1 / G, step 1", "rank 1 / G, first 20% of steps", "mean length, first -> last 20% of steps"],
        [detail(cell) for cell in cells])
    rows = []  # (claim, column, per seed, holds)
    for lr in [lr for lr in lrs if ("vigor", lr) in gains]:
        vigor = gains["vigor", lr]
        claims = [("vigor gains over the starting model", vigor)]
        claims += [(f"vigor gains more than {than} at the same lr",
                    [a - b for a, b in zip(vigor, gains[than, lr])])
                   for than in ("random", "self_certainty", *ABLATIONS) if (than, lr) in gains]
        claims.append(("vigor's rank 1 is more often correct than its rank G, first 20% of steps",
                       [r["early"][0] - r["early"][-1] for r in ranks["vigor", lr]]))
        rows += [(claim, col[lr], per_seed_text(values), holds(values)) for claim, values in claims]
    rows += [(f"{name}: raw ||g|| ~ T^-0.5 within groups, slope within 0.25 of -0.5", col[lr],
              per_seed_text(s, 1, "+.2f"), "yes" if abs(sum(s) / len(s) + 0.5) < 0.25 else "NO")
             for (name, lr), s in slopes.items()]
    text += "\n\n" + print_table(
        f"{regime}: the paper's claims at each lr; per seed: the gain, the difference of gains or of rank "
        "1's and rank G's accuracy (points), or the slope; holds: yes = on every seed, NO = on none",
        ["claim", "lr", f"per seed {seeds}", "holds"], rows)
    return text + "\n\n"


# --- Tools 2: does the reward know? Every score on the same rollouts of the starting model, no training -----
SIGNAL_SCORES = {"vigor": {}, "vigor_no_sqrt_t": {"sqrt_t": False}, "lm_head": {"reward_params": "lm_head"},
                 "self_certainty": {"reward": "self_certainty"}, "random": {"reward": "random"}}


@dataclass
class SignalSettings:
    prompts: int = arg(64, "prompts to sample G completions of (the first ones of training's order)", ">= 1")
    scores: str = arg(",".join(SIGNAL_SCORES), f"comma-separated scores, from {', '.join(SIGNAL_SCORES)} "
                      "(random: the chance line)")
    bootstrap: int = arg(2000, "bootstrap resamples of the groups for the 95% intervals", ">= 1")


def rank_gap(by_rank, resamples, seed):
    """Rank 1 minus rank G: the share of groups whose best-scored completion is correct minus the share whose
    worst-scored one is, with its 95% percentile bootstrap interval over groups (seeded: reproducible)."""
    gap = by_rank[:, 0] - by_rank[:, -1]  # [groups]: +1, 0 or -1
    draws = torch.randint(len(gap), (resamples, len(gap)), generator=torch.Generator().manual_seed(seed))
    low, high = torch.quantile(gap[draws].mean(1).double(), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return gap.mean().item(), low.item(), high.item()


def within_group_correlation(x, y, G):
    """Pearson correlation of x and y after removing each group's means (nan if either never varies)."""
    x, y = (v.double().view(-1, G) for v in (x, y))
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    return ((x * y).sum() / ((x * x).sum() * (y * y).sum()).sqrt()).item()


def signal(argv):
    """python vigor.py signal [--prompts 64] [--scores ...] [--setting value ...]: before any training, does a
    score rank a group's correct completions first? Every score (`compute_rewards`') of the same rollouts, G
    per prompt sampled once from the starting model with the run's settings, all graded: accuracy at each
    within-group rank, rank 1 minus rank G with a bootstrap interval over groups, the within-group correlation
    with length. Writes signal.json and completions.jsonl in <out_dir>/signal-<run_name>. (The cosine of each
    score's first update with gold answers', `update_directions` and `alignment`: commit b6df794.)"""
    settings, cfg = parse_command_line(argv, "python vigor.py signal", SignalSettings, Config)
    names = settings.scores.split(",")
    if set(names) - set(SIGNAL_SCORES):
        raise ConfigError(f"signal: scores come from {list(SIGNAL_SCORES)}")
    started, G = time.time(), cfg.num_generations
    cfg = dataclasses.replace(cfg, run_name=f"signal-{cfg.run_name}", parallelism="ddp")  # one process
    device, dtype = setup_device(cfg)
    questions, answers = load_prompts(cfg.train_data)
    if answers is None:
        raise DataError("signal grades every completion: set train_data.answer_column")
    base = tiny_base_model(cfg) if cfg.model == "tiny" else cfg.model
    run_dir = check_run_dir(cfg)
    torch.manual_seed(cfg.seed)  # as `train`: the same seed samples the same rollouts as its first step
    policy, tok, _ = load_policy(cfg, base, None, device, dtype, reference=False)
    prompts, answers = chat_prompts(cfg, tok, questions, answers)
    idx = prompt_batch(len(prompts), 0, settings.prompts, cfg.seed)
    prompts, answers = [prompts[i] for i in idx], [answers[i] for i in idx]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        policy.eval()
        rollouts = sample(cfg, policy, tok, prompts)
        correct = grade(rollouts, prompts, answers, cfg.answer_format)
        scored = {}
        for name in names:  # lora_r 0 in the copies: here lm_head is only a score, no frozen head is trained
            c = dataclasses.replace(cfg, lora_r=0, **SIGNAL_SCORES[name])
            twin = scored.get({"vigor": "vigor_no_sqrt_t", "vigor_no_sqrt_t": "vigor"}.get(name))
            scored[name] = ({"score": vigor_scores(twin["grad_norm"], rollouts.lengths, c.sqrt_t)} if twin
                            else compute_rewards(c, policy, rollouts))  # vigor's twins share one gradient norm
    groups, scores = correct.view(-1, G).sum(1), {name: scored[name]["score"] for name in names}
    report = {"prompts": len(prompts), "G": G, "accuracy": correct.mean().item(), "scores": {},
              "mixed_groups": int(((groups > 0) & (groups < G)).sum())}
    for name, score in scores.items():
        by_rank = correct_by_rank(score, correct, G)  # [groups, G]
        gap, low, high = rank_gap(by_rank, settings.bootstrap, cfg.seed)
        report["scores"][name] = {"accuracy_by_rank": by_rank.mean(0).tolist(),
                                  "rank_1_minus_rank_G": gap, "interval_95": [low, high],
                                  "length_correlation": within_group_correlation(score, rollouts.lengths, G)}
    report["wall_s"] = time.time() - started
    write_config(run_dir, cfg)
    write_text_atomically(os.path.join(run_dir, "signal.json"), json.dumps(report, indent=2))
    columns = {"prompt": [prompts[i] for i in rollouts.prompt_index], "completion": rollouts.completions,
               "length": rollouts.lengths, "truncated": rollouts.truncated, "correct": correct, **scores}
    write_text_atomically(os.path.join(run_dir, "completions.jsonl"),
                          "".join(json.dumps(r) + "\n" for r in completion_rows(0, columns)))
    print_table(f"does the score rank correct completions first? {len(prompts)} prompts x G = {G} sampled "
                f"once from {base}: {report['accuracy']:.1%} correct, {report['mixed_groups']} groups of "
                f"{len(prompts)} hold both correct and wrong completions (only they can rank anything); % "
                "correct at each within-group rank, rank 1 minus rank G with its 95% bootstrap interval over "
                "groups, the within-group correlation with length",
                ["score", *(f"rank {i + 1}" for i in range(G)), "rank 1 - rank G [95%]", "corr. with length"],
                [(name, *(f"{100 * a:.1f}" for a in r["accuracy_by_rank"]),
                  f"{100 * r['rank_1_minus_rank_G']:+.1f} [{100 * r['interval_95'][0]:+.1f}, "
                  f"{100 * r['interval_95'][1]:+.1f}]", f"{r['length_correlation']:+.2f}")
                 for name, r in report["scores"].items()])
    print(f"signal done in {report['wall_s']:.0f} s -> {run_dir}/signal.json")
    return report


# --- Tools 3: the reward inside TRL's GRPOTrainer -----------------------------------------------------------
class TRLReward:
    """VIGOR (or self-certainty) as a reward function for TRL's `GRPOTrainer` (pip install trl), given the
    model the trainer updates and its GRPOConfig: `GRPOTrainer(model=policy, args=args, reward_funcs=[vigor.
    TRLReward(policy, tokenizer, args)], ...)`. TRL passes the prompts, completions and completion ids (a
    group's G consecutive, each ending in its EOS; T counts it), not the model. `args` (or G alone) gives G,
    the eval G (num_generations_eval, when the model is in eval mode, as TRL) and chat_template_kwargs."""
    def __init__(self, model, tokenizer, args, reward="vigor", sqrt_t=True, rank=True, reward_params="all",
                 grad_norm_method="per_layer"):
        if reward == "gt":
            raise ConfigError("TRLReward computes the intrinsic rewards (vigor, self_certainty); for gold "
                              "answers give TRL a function that grades the completions")
        G = args if isinstance(args, int) else args.num_generations
        self.chat_template_kwargs = getattr(args, "chat_template_kwargs", None) or {}
        settings = {"reward": reward, "sqrt_t": sqrt_t, "rank": rank, "reward_params": reward_params,
                    "grad_norm_method": grad_norm_method}
        self.cfg = {True: make_config({**settings, "num_generations": G}),  # by model.training, as TRL
                    False: make_config({**settings, "num_generations": getattr(args, "num_generations_eval",
                                                                               None) or G})}
        self.model, self.tok, self.__name__ = model, tokenizer, reward  # TRL logs rewards/<__name__>

    def __call__(self, prompts, completions, completion_ids, **columns):
        cfg = self.cfg[self.model.training]
        G, n = cfg.num_generations, len(completion_ids)
        refuse_what_trl_reward_cannot_score(self.model, completions, columns)
        if not n or n % G:
            raise ConfigError(f"TRLReward got {n} completions, not a multiple of G = {G}: give it the "
                              "trainer's GRPOConfig (num_generations, num_generations_eval)")
        if isinstance(prompts[0], list):  # conversations: TRL renders the template with the generation prompt
            prompt_ids = self.tok.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True, **self.chat_template_kwargs)
            prompt_ids = prompt_ids["input_ids"]
        else:
            prompt_ids = self.tok(text=prompts)["input_ids"]
        rollouts = Rollouts.from_ids(prompt_ids, completion_ids, [False] * n, list(completions),
                                     list(range(n)), self.tok.pad_token_id or 0)
        # gradient checkpointing hooks the input embedding with requires_grad_(), which torch.func forbids
        # (transformers may register it several times): vmap runs without those hooks, put back afterwards
        hooks = self.model.get_input_embeddings()._forward_hooks
        lifted = {k: h for k, h in hooks.items() if cfg.grad_norm_method == "vmap" and
                  getattr(h, "__name__", "") == "make_inputs_require_grads"}

        was_training = self.model.training
        try:  # eval mode: no dropout, no gradient checkpointing (torch.func refuses both)
            self.model.eval()
            for k in lifted:
                del hooks[k]
            with torch.enable_grad():  # TRL scores under no_grad; per_layer takes one backward
                return compute_rewards(cfg, self.model, rollouts)["reward"].tolist()
        finally:
            hooks.update(lifted)
            self.model.train(was_training)


def refuse_what_trl_reward_cannot_score(model, completions, columns):
    """TRLReward needs the whole weights on this process (checked at each call: a trainer shards them after
    the adapter is made), and no tools: their schema sits in TRL's prompt, their results in a completion."""
    from torch.distributed.tensor import DTensor
    params = list(model.parameters())  # FSDP1 wrapping the root alone flattens the weights of the module held
    sharded = [name for name, yes in (  # ds_id: what ZeRO-3 puts on each weight it shards; DTensor: FSDP2's
        ("DeepSpeed ZeRO-3", any(hasattr(p, "ds_id") for p in params)),
        ("FSDP", any(isinstance(p, DTensor) or getattr(p, "_fsdp_flattened", False) for p in params) or
         not params or any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()))) if yes]
    if sharded:
        raise ConfigError(f"TRLReward needs each process to hold the whole weights, and {sharded[0]} shards "
                          "them: use DDP or one process (vigor.py's own trainer takes the norms under FSDP2)")
    trainer = getattr(columns.get("log_metric"), "__self__", None)  # a bound method of TRL's trainer
    tool_message = any(isinstance(c, list) and any(m.get("role") == "tool" for m in c) for c in completions)
    if getattr(trainer, "tools", None) or columns.get("environments") is not None or tool_message:
        raise ConfigError("TRLReward does not score runs with tools or environments: the prompt then holds "
                          "the tools' schema and a completion their results, which the model did not write")


# --- Tools 4: the classroom kit: a student copy with the method left blank, a grader per exercise ----------
EXERCISES = {  # number: (the functions the student writes, what they compute); check N: test_exercise_N_*
    1: (("token_logps", "completion_mean", "mean_nll"), "token log-probs and the mean NLL"),
    2: (("grad_norms",), "norms by torch.func"), 3: (("vigor_scores",), "the sqrt(T) score"),
    4: (("rank_rewards",), "rank rewards with ties"), 5: (("group_advantages",), "group advantages"),
    6: (("grpo_token_loss",), "the clipped GRPO loss with the k3 KL"),
    7: (("normalised_loss",), "the loss normalisations (stretch)"),
    8: (("linear_grad_sq_norms",), "ghost norms (stretch)")}
PART2 = {  # exercise: (run folder, the command that writes it, the study's gain: mean, sd of seeds 7-9)
    9: ("gt", "python vigor.py --config tiny_configs/gt.yaml", 32.1, 4.9),
    10: ("vigor", "python vigor.py", -0.1, 0.2),
    11: ("random", "python vigor.py --config tiny_configs/random.yaml", 0.5, 0.6),
    12: ("vigor_no_sqrt_t", "python vigor.py --config tiny_configs/no_sqrt_t.yaml", -0.7, 0.7),
    14: ("sft", "python vigor.py --config tiny_configs/sft.yaml", 2.3, 1.2),
}
HANDOUT_END = "# " + "=" * 40 + " HANDOUT_END "  # test_vigor.py's exercise checks end at this line


def blanked_source(source):
    """vigor.py's source with the body of every exercise function (its comments included) replaced by a
    NotImplementedError that names its exercise; the signature and the docstring (the contract) stay."""
    exercise_of = {name: n for n, (names, _) in EXERCISES.items() for name in names}
    lines, cuts = source.splitlines(keepends=True), []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name in exercise_of:
            first = node.body[0].end_lineno + 1 if ast.get_docstring(node) else node.body[0].lineno
            text = f"exercise {exercise_of[node.name]}: write {node.name} (its docstring says what it does)"
            cuts.append((first, node.end_lineno, " " * node.body[0].col_offset +
                         f"raise NotImplementedError({text!r})\n"))
    for start, end, stub in sorted(cuts, reverse=True):
        lines[start - 1:end] = [stub]
    return "".join(lines)


def handout(argv):
    """python vigor.py handout DIR: a student copy of the repository in a new folder DIR: vigor.py with the
    exercise functions left blank (`blanked_source`), the exercises' checks (test_vigor.py down to
    HANDOUT_END), requirements.txt, tiny_configs/, LICENSE, exercise 15's script, the README's Exercises
    section without its <details> blocks (answers, teacher's notes) and ANSWERS.md, the file to hand in."""
    if len(argv) != 1 or os.path.exists(argv[0]):
        raise ConfigError(f"python vigor.py handout DIR writes a new folder: DIR must not exist (got {argv})")
    out = argv[0]
    os.makedirs(os.path.join(out, ".ci"))
    for name in ("requirements.txt", "LICENSE", ".ci/real_signal_check", ".ci/smollm2.py"):
        shutil.copy(os.path.join(HERE, name), os.path.join(out, name))
    shutil.copytree(os.path.join(HERE, "tiny_configs"), os.path.join(out, "tiny_configs"))
    tests, readme = (open(os.path.join(HERE, name)).read() for name in ("test_vigor.py", "README.md"))
    section = re.search(r"\n## Exercises\n(.*?)(?=\n## )", readme, re.S)[1]
    task = re.sub(r"\n<details>.*?</details>\n", "\n", section, flags=re.S)
    answers = "# Answers (name: )\n\n`python vigor.py check`, last line:\n\n`python vigor.py check runs`:\n\n"
    answers += "".join(f"### {n}. {title.rstrip('.?')}\nYour numbers (those it quotes, from your runs):\n"
                       "Your answer:\n\n" for n, title in re.findall(r"^(\d+)\. \*\*(.+?)\*\*", task, re.M))
    for name, text in [("vigor.py", blanked_source(open(os.path.join(HERE, "vigor.py")).read())),
                       ("test_vigor.py", tests[:tests.index(HANDOUT_END)]), ("ANSWERS.md", answers),
                       ("README.md", "# vigor.py: exercises\n" + task)]:
        write_text_atomically(os.path.join(out, name), text)
    print(f"wrote the student copy to {out}: exercises {', '.join(map(str, EXERCISES))}; hand in ANSWERS.md")


def check(argv):
    """python vigor.py check [N] [--json]: exercise N's checks (every exercise's with no N), test_exercise_N_*
    of test_vigor.py beside this file, in one pytest process: a line per exercise with each failing case's
    message (in full with N), then `K of M exercises pass`; exit status 1 unless all pass. --json prints one
    JSON object instead: exercises (number, title, functions, passed, cases: test, passed, message or null),
    passed, total. `python vigor.py check runs`: Part 2's runs (`check_runs`)."""
    if argv[:1] == ["runs"]:
        return check_runs(argv[1:])
    as_json, rest = "--json" in argv, [a for a in argv if a != "--json"]
    if len(rest) > 1 or rest and (not rest[0].isdigit() or int(rest[0]) not in EXERCISES):
        raise ConfigError(f"usage: python vigor.py check [N] [--json] | check runs (N: {list(EXERCISES)})")
    chosen = [int(rest[0])] if rest else list(EXERCISES)
    with tempfile.TemporaryDirectory() as tmp:  # pytest's JUnit XML: each case, its failure's message
        xml, k = os.path.join(tmp, "report.xml"), " or ".join(f"test_exercise_{n}_" for n in chosen)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", "-k", k, "test_vigor.py"], cwd=HERE, capture_output=True,
                              text=True, env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
        cases = list(ElementTree.parse(xml).getroot().iter("testcase")) if os.path.isfile(xml) else []
    if not cases:
        raise ConfigError(f"check: pytest ran no test\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def said(failure):  # the report's "E" lines (pytest cuts a long message attribute short)
        lines = (failure.text or "").splitlines()
        return "\n".join(re.sub(r"^E {1,7}", "", x) for x in lines if x[:2] == "E ") or failure.get("message")
    found = [(case.get("name"), next((said(f) for f in case if f.tag in ("failure", "error")), None))
             for case in cases]  # a case named test_vigor: the checks did not import, every exercise fails
    report = [{"number": n, "title": EXERCISES[n][1], "functions": list(EXERCISES[n][0]), "cases": [
        {"test": name, "passed": why is None, "message": why} for name, why in found
        if name.startswith((f"test_exercise_{n}_", "test_vigor"))]} for n in chosen]
    for r in report:
        r["passed"] = bool(r["cases"]) and all(c["passed"] for c in r["cases"])  # no case ran: no pass
    passed = sum(r["passed"] for r in report)
    if as_json:
        print(json.dumps({"exercises": report, "passed": passed, "total": len(report)}, indent=2))
    for r in [] if as_json else report:
        print(f"exercise {r['number']} ({r['title']}: {', '.join(r['functions'])}): "
              + ("pass" if r["passed"] else "FAIL"))
        for c in [c for c in r["cases"] if not c["passed"]]:
            message = c["message"] if rest else c["message"].split("\n")[0]  # all of it for one exercise
            print(f"  {c['test']}: " + message.replace("\n", "\n    "))
    if not as_json:
        print(f"{passed} of {len(report)} exercises pass")
    if passed < len(report):
        sys.exit(1)


def check_runs(argv):
    """python vigor.py check runs [--out_dir DIR]: each Part 2 run's gain (its final greedy accuracy on test
    minus its starting model's, points) against the study's seeds on the shipped model: inside their spread
    when within 2 sd of their mean (at least 1 point). A guide, not a grade: one seed can land outside."""
    out_dir = parse_command_line(argv, "python vigor.py check runs", Config)[0].out_dir
    rows = []
    for n, (name, command, mean, sd) in PART2.items():
        path = os.path.join(out_dir, name, "metrics.jsonl")
        log = read_jsonl(path) if os.path.isfile(path) else []
        if not log or not log[-1].get("final"):
            rows.append((n, name, "-", f"{mean:+.1f} ± {sd:.1f}", f"missing or unfinished: run `{command}`"))
            continue
        gain = 100 * (log[-1]["eval/test/accuracy"] - log[0]["eval/test/accuracy"])
        verdict = "inside" if abs(gain - mean) <= max(2 * sd, 1.0) else "OUTSIDE: check its settings, code"
        rows.append((n, name, f"{gain:+.1f}", f"{mean:+.1f} ± {sd:.1f}", verdict))
    print_table(f"Part 2's runs in {out_dir}: greedy gain on test, points (the study: mean ± sd over seeds "
                "7, 8, 9; inside = within 2 sd, at least 1 point)",
                ["exercise", "run", "your gain", "the study's", "verdict"], rows)
    return rows


def warmstart(argv):
    """python vigor.py warmstart OUT [--task sft] [--setting value ...]: the tiny model's warm start, trained
    by its recipe (`train_warmstart`) into a new folder OUT, with recipe.json (settings, key, weights' hash).
    The shipped tiny_configs/tiny-base and tiny-sft are this command's, with the default settings."""
    if not argv or argv[0].startswith("--") or os.path.exists(argv[0]):
        raise ConfigError(f"python vigor.py warmstart OUT [--setting value ...] writes a new folder OUT (got "
                          f"{argv[:1]}: {'it exists' if argv and os.path.exists(argv[0]) else 'no OUT'})")
    out, cfg = argv[0], parse_command_line(argv[1:], "python vigor.py warmstart OUT", Config)[0]
    started, (settings, key, arch) = time.time(), warmstart_recipe(cfg)
    model, tok = train_warmstart(cfg, arch, synthetic_split("warmstart"))
    with atomic(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        path = os.path.join(tmp, "tokenizer_config.json")  # transformers 5 writes a class 4.x does not know
        portable = {**json.load(open(path)), "tokenizer_class": "PreTrainedTokenizerFast"}
        write_text_atomically(path, json.dumps(portable, indent=2) + "\n")
        weights = hashlib.sha256(open(os.path.join(tmp, "model.safetensors"), "rb").read()).hexdigest()
        recipe = {"key": key, "settings": settings, "model.safetensors sha256": weights,
                  "built with": f"torch {torch.__version__}, Python {sys.version.split()[0]}"}
        write_text_atomically(os.path.join(tmp, "recipe.json"), json.dumps(recipe, indent=2) + "\n")
    print(f"wrote {out} in {time.time() - started:.0f} s: recipe key {key}, model.safetensors {weights}")


COMMANDS = {"length-bias": lambda dirs: [length_bias(d) for d in dirs],
            "rank-table": lambda dirs: [rank_correctness(d) for d in dirs],
            "study": study, "signal": signal, "warmstart": warmstart, "handout": handout, "check": check}


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        if args and args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
        else:
            train(load_config(args))
    except (ConfigError, DataError, BadStepError) as e:  # raised alike on every rank: rank 0 says it
        if int(os.environ.get("RANK", 0)):  # torchrun stops every process once one fails: wait for rank 0's
            time.sleep(30)  # exit to stop this one; a rank that failed alone still says why
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
