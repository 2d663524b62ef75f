"""Tests for vigor.py. Down to HANDOUT_END: the exercises' checks (`python vigor.py check`). After it, the
reference's own: gradient norms against a float64 autograd loop, the training loop end to end, resume after
SIGKILL, and every bad input. Run: pytest -q"""
import concurrent.futures
import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
import yaml
from transformers import Qwen2Config, Qwen2ForCausalLM

import vigor

HERE = os.path.dirname(os.path.abspath(__file__))


# ===========================================================================================================
# The exercises' checks. `python vigor.py check N` runs test_exercise_N_*; `python vigor.py handout` gives
# students this file down to HANDOUT_END. They compare with numbers written here or with properties of the
# student's own functions, so nothing above HANDOUT_END computes an answer; every failure says in words what
# is wrong. The reference's own tests (independent float64 loops, the whole run) come after HANDOUT_END.
# ===========================================================================================================
def agree(got, want, what, rtol=1e-5, atol=1e-6):
    """got equals want (numbers or a tensor) in float64, whatever floating dtype got has; else `what`, then
    expected against got."""
    assert torch.is_tensor(got) and got.is_floating_point(), f"{what}: expected a floating-point tensor, got {got!r}"
    want = torch.as_tensor(want, dtype=torch.float64)
    torch.testing.assert_close(got.detach().double(), want, rtol=rtol, atol=atol, msg=lambda m: (
        f"{what}\n  expected {[round(v, 6) for v in want.flatten().tolist()]}\n"
        f"  got      {[round(v, 6) for v in got.detach().double().flatten().tolist()]}\n{m}"))


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits are given: [1, L, V], the same for every row."""
    def __init__(self, logits):
        super().__init__()
        self.z = logits

    def forward(self, input_ids, **kwargs):
        return types.SimpleNamespace(logits=self.z.expand(len(input_ids), -1, -1))


def test_exercise_1_token_logps_shift_and_mean_nll_by_hand():
    """Prompt [2], completion [0, 1], then a pad that carries no loss; vocabulary of 3."""
    z = torch.tensor([[[0.0, math.log(3), 0.0], [math.log(2), 0.0, 0.0], [0.0, 0.0, 9.0], [1.0, 2.0, 3.0]]])
    ids, mask = torch.tensor([[2, 0, 1, 0]]), torch.tensor([[0, 1, 1, 0]])
    agree(vigor.token_logps(z, ids), [[math.log(1 / 5), math.log(1 / 4), -math.log(2 + math.exp(9))]],
          "exercise 1 (token_logps): the logits at position t predict token t+1, so column t is log p(token t+1); "
          "here [log 1/5, log 1/4, log 1/(2 + e^9)], shape [1, 3]")
    agree(vigor.mean_nll(z, ids, mask), [(math.log(5) + math.log(4)) / 2],
          "exercise 1 (mean_nll): l = the mean over the completion's T = 2 tokens of -log p, here (log 5 + log 4) / 2 "
          "(not the sum, and the prompt and padding carry no loss)")


def test_exercise_1_completion_mean_of_each_row_and_of_an_empty_row():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
    masks = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])  # T = 2, T = 1, no completion token
    agree(vigor.completion_mean(per_token, masks), [1.5, 6.0, 0.0],
          "exercise 1 (completion_mean): each row's mean over the positions whose next token is a completion token "
          "(mask[:, 1:]): [1.5, 6.0], and 0.0 for a row with no completion token (not nan)")


def test_exercise_1_token_logps_keep_float32_precision_under_bf16_logits():
    """Under bf16 autocast (the Qwen2.5 configs on a GPU) the logits are bf16: the log-softmax must be computed
    in float32 (or finer), or it loses two digits. Property: the same numbers as from a float32 copy."""
    z = (torch.sin(torch.arange(2 * 6 * 50).view(2, 6, 50) * 0.37) * 12).to(torch.bfloat16)
    ids = torch.arange(12).view(2, 6) * 3 % 50
    got = vigor.token_logps(z, ids)
    assert got.dtype in (torch.float32, torch.float64), (
        f"exercise 1 (token_logps): bf16 logits must give float32 (or float64) log-probs, got {got.dtype}")
    agree(got, vigor.token_logps(z.float(), ids), "exercise 1 (token_logps): bf16 logits gave other log-probs than "
          "a float32 copy of the same logits: compute the log-softmax in float32 (upcast first)", atol=1e-5)


def test_exercise_1_policy_logps_use_the_sampling_temperature():
    z = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]])
    logps, logits = vigor.policy_logps(FixedLogits(z), torch.tensor([[0, 1, 2]]), temperature=2.0)
    agree(logps, [[-math.log(math.exp(1) + 1 + math.exp(-0.5)), 1.5 - math.log(1 + math.exp(0.5) + math.exp(1.5))]],
          "exercise 1 (token_logps, through policy_logps): log p of tokens 1 and 2 from the logits of positions 0 "
          "and 1 divided by the temperature 2")


def test_exercise_1_self_certainty_by_hand():
    """Self-certainty, the mean of logsumexp(z) - mean(z) over completion positions, uses completion_mean."""
    z = torch.tensor([[[0.0, 0.0, 0.0], [math.log(4), 0.0, 0.0], [5.0, 1.0, 0.0]]])
    ids, mask = torch.tensor([[1, 2, 0]]), torch.tensor([[0, 1, 1]])
    agree(vigor.self_certainty(FixedLogits(z), ids, mask), [(math.log(3) + math.log(6) - math.log(4) / 3) / 2],
          "exercise 1 (completion_mean, through self_certainty): the mean over the completion positions 0 and 1")


def exercise_model(tied):
    """A tiny Qwen2 whose weights are a fixed formula, not random draws: the same on every machine."""
    config = Qwen2Config(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied, attn_implementation="eager")
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.sin(torch.arange(p.numel()) * 0.7 + i).view_as(p) * (1.0 if p.dim() == 1 else 0.3))
    return model


def exercise_batch():
    """5 right-padded rows: (prompt, completion) lengths (3, 5), (6, 1), (2, 9), (4, 4), (5, 2); pad id 0."""
    ids, mask = torch.zeros(5, 13, dtype=torch.long), torch.zeros(5, 13, dtype=torch.long)
    for i, (p, c) in enumerate([(3, 5), (6, 1), (2, 9), (4, 4), (5, 2)]):
        ids[i, :p + c] = torch.tensor([1 + (5 * i + 7 * j + i * j) % 36 for j in range(p + c)])
        mask[i, p:p + c] = 1
    return ids, mask


# ||grad l|| of each row of exercise_batch() on exercise_model(tied), from a float64 loop of plain autograd, one
# completion at a time (the reference's test_grad_norms_match_float64_autograd_loop checks these numbers)
EXERCISE_NORMS = {True: [1.69718, 4.16056, 2.25387, 1.98369, 2.97375],
                  False: [1.69596, 4.17653, 2.30812, 1.99458, 2.96794]}
EXERCISE_MLP_NORMS = [0.00375072, 0.0166824, 0.0153276, 0.008116, 0.0115853]  # untied, only the MLPs trainable


@pytest.mark.parametrize("tied", [True, False])
def test_exercise_2_grad_norms_per_completion(tied):
    model, (ids, mask) = exercise_model(tied), exercise_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = vigor.grad_norms(model, ids, mask)
    agree(got, EXERCISE_NORMS[tied], "exercise 2 (grad_norms): each completion's own ||grad_theta l||, l its "
          "mean NLL over its completion tokens (not the norm of the batch's summed gradient)", rtol=1e-4)
    assert not got.requires_grad, "exercise 2 (grad_norms): the norms must be constants (detached, no graph): " \
        "the reward is stop-gradient"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), \
        "exercise 2 (grad_norms): the model's parameters changed"
    assert all(p.grad is None for p in model.parameters()), "exercise 2 (grad_norms): a parameter's .grad was left set"


def test_exercise_2_grad_norms_over_the_trainable_parameters_only():
    model, (ids, mask) = exercise_model(False), exercise_batch()
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    agree(vigor.grad_norms(model, ids, mask), EXERCISE_MLP_NORMS, "exercise 2 (grad_norms): with only the MLP "
          "weights trainable (requires_grad), the norm is over them; frozen parameters are constants", rtol=1e-4)


def test_exercise_2_grad_norms_one_batched_torch_func_call_per_chunk():
    """The exercise asks for torch.func (vmap over per-sample grads): the model's forward runs once per chunk
    of chunk_size rows (once for all rows when None), never once per completion."""
    model, (ids, mask) = exercise_model(True), exercise_batch()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    full = vigor.grad_norms(model, ids, mask)
    assert len(calls) == 1, f"exercise 2 (grad_norms): the model's forward ran {len(calls)} times for 5 rows: " \
        "the exercise asks for one batched torch.func call (vmap of grad), not a loop over completions"
    calls.clear()
    agree(vigor.grad_norms(model, ids, mask, chunk_size=2), full, "exercise 2 (grad_norms): chunk_size only "
          "splits the work (vmap's chunk_size): the norms must not change", rtol=1e-5)
    assert len(calls) == 3, f"exercise 2 (grad_norms): chunk_size=2 over 5 rows should run the forward 3 times " \
        f"(chunks of 2, 2, 1), it ran {len(calls)}"
    pad = torch.full((5, 7), 5)  # junk ids after every row's last real token, masked out
    agree(vigor.grad_norms(model, torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1)), full,
          "exercise 2 (grad_norms): padding after the completion must change nothing", rtol=1e-5)


def test_exercise_3_vigor_scores_sqrt_t():
    norms, lengths = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([4, 9])
    agree(vigor.vigor_scores(norms, lengths), [-4.0, -9.0],
          "exercise 3 (vigor_scores): S = -sqrt(T) * ||g||: T = 4, 9 and ||g|| = 2, 3 give -4, -9")
    agree(vigor.vigor_scores(norms.float(), lengths, sqrt_t=False), [-2.0, -3.0],
          "exercise 3 (vigor_scores): with sqrt_t=False, S = -||g||")
    with pytest.raises(ValueError):  # the type is the contract, not the words
        vigor.vigor_scores(norms, torch.tensor([0, 3]))
        pytest.fail("exercise 3 (vigor_scores): a completion with T = 0 must raise a ValueError")


def test_exercise_4_rank_rewards_with_ties_by_position():
    # group 1: distinct scores; group 2: 3, 1, 2, 2: the tie (positions 2, 3) ranks the earlier one lower
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    agree(vigor.rank_rewards(scores, 4), [1 / 3, -1, 1, -1 / 3, 1, -1, -1 / 3, 1 / 3],
          "exercise 4 (rank_rewards): R = 2 rank / (G - 1) - 1 inside each group of 4 (rank 0 = the lowest "
          "score); of two equal scores the earlier ranks lower")
    agree(vigor.rank_rewards(torch.zeros(3), 3), [-1.0, 0.0, 1.0],
          "exercise 4 (rank_rewards): three equal scores rank by position: -1, 0, +1")


def test_exercise_4_rank_rewards_inside_each_group_as_places_not_sorting_indices():
    agree(vigor.rank_rewards(torch.tensor([30.0, 10.0, 20.0, 0.3, 0.1, 0.2]), 3), [1, -1, 0, 1, -1, 0],
          "exercise 4 (rank_rewards): each score's place in its own group's order (30, 10, 20 -> ranks 2, 0, 1; "
          "not the indices that sort them, 1, 2, 0), and the second group's small scores still reach +1")


def test_exercise_5_group_advantages_unbiased_std_and_equal_rewards():
    r = torch.tensor([1.0, -1.0, 1 / 3, -1 / 3, 0.5, 0.5, 0.5, 0.5])
    sd = math.sqrt((1 + 1 + 1 / 9 + 1 / 9) / 3)  # unbiased: divided by G - 1 = 3
    agree(vigor.group_advantages(r, 4), [1 / (sd + 1e-4), -1 / (sd + 1e-4), 1 / 3 / (sd + 1e-4),
                                         -1 / 3 / (sd + 1e-4), 0, 0, 0, 0],
          "exercise 5 (group_advantages): (R - the group's mean) / (the group's unbiased std + 1e-4); a group of "
          "equal rewards gets 0")


def test_exercise_6_grpo_token_loss_kl_zero_at_the_reference_and_the_upper_clip():
    logps = torch.log(torch.tensor([[0.5, 0.2]]))
    loss, kl, clipped = vigor.grpo_token_loss(logps, logps, logps, torch.tensor([2.0]), 0.2, 0.2, beta=0.1)
    agree(kl, [[0.0, 0.0]], "exercise 6 (grpo_token_loss): KL_k3 is 0 where logp equals the reference's")
    agree(loss, [[-2.0, -2.0]], "exercise 6 (grpo_token_loss): at ratio 1 and KL 0 the loss is -A = -2")
    old = logps - torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5, A = +1
    loss, kl, clipped = vigor.grpo_token_loss(logps, old, logps + 0.3, torch.tensor([1.0]), 0.2, 0.2, beta=0.0)
    agree(loss, [[-1.2, -0.5]], "exercise 6 (grpo_token_loss): A = +1: ratio 1.5 is clipped to 1 + 0.2, ratio 0.5 "
          "is not (the min keeps the unclipped -0.5)")
    assert [[bool(c) for c in row] for row in clipped.tolist()] == [[True, False]], \
        f"exercise 6 (grpo_token_loss): `clipped` marks the tokens whose gradient the clip removed: expected " \
        f"[[True, False]], got {clipped.tolist()}"
    agree(kl, [[math.exp(0.3) - 0.3 - 1] * 2], "exercise 6 (grpo_token_loss): KL_k3 = exp(ref - logp) - (ref - "
          "logp) - 1, here with ref - logp = 0.3")


def test_exercise_6_grpo_token_loss_lower_clip_and_asymmetric_epsilon():
    """eps 0.2, eps_high 0.3. Row 0 (A = -1): ratios 0.75, 0.5 fall below 1 - eps and are clipped to 0.8 (no
    gradient), 1.5 is not (the min keeps -1.5 A). Row 1 (A = +1): 1.25 is inside 1 + eps_high = 1.3, 1.5 is
    clipped to 1.3, 0.5 is not."""
    ratio = torch.tensor([[0.75, 0.5, 1.5], [1.25, 1.5, 0.5]], dtype=torch.float64)
    logps = torch.zeros_like(ratio, requires_grad=True)
    loss, _, clipped = vigor.grpo_token_loss(logps, logps.detach() - ratio.log(), logps.detach(),
                                             torch.tensor([-1.0, 1.0], dtype=torch.float64), 0.2, 0.3, beta=0.0)
    agree(loss, [[0.8, 0.8, 1.5], [-1.25, -1.3, -0.5]], "exercise 6 (grpo_token_loss): -min(r A, clip(r, 1 - eps, "
          "1 + eps_high) A) with eps 0.2 below and eps_high 0.3 above")
    assert [[bool(c) for c in row] for row in clipped.tolist()] == [[True, True, False], [False, True, False]], \
        f"exercise 6 (grpo_token_loss): clipped tokens: expected [[True, True, False], [False, True, False]], got " \
        f"{clipped.tolist()}"
    loss.sum().backward()
    agree(logps.grad, [[0, 0, 1.5], [-1.25, 0, -0.5]], "exercise 6 (grpo_token_loss): d loss / d logp is -r A "
          "where the min keeps the unclipped term, 0 where the clip acts")


def test_exercise_6_kl_penalty_enters_the_loss_and_its_gradient():
    """With A = 0 the loss is beta * KL_k3 alone; with d = logp - ref: KL = exp(-d) + d - 1 and its gradient
    beta (1 - exp(-d)) pulls logp back toward the reference from either side."""
    d = torch.tensor([[0.5, -0.3, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).log()
    logps = (ref + d).requires_grad_(True)
    loss, kl, _ = vigor.grpo_token_loss(logps, logps.detach(), ref, torch.zeros(1, dtype=torch.float64), 0.2, 0.2,
                                        beta=0.1)
    want = [[math.exp(-x) + x - 1 for x in (0.5, -0.3, 0.0)]]
    agree(kl, want, "exercise 6 (grpo_token_loss): KL_k3 = exp(ref - logp) - (ref - logp) - 1 (the k3 estimator "
          "of KL(policy || reference), >= 0)")
    agree(loss, [[0.1 * v for v in want[0]]], "exercise 6 (grpo_token_loss): with A = 0 the loss is + beta * KL")
    loss.sum().backward()
    agree(logps.grad, [[0.1 * (1 - math.exp(-x)) for x in (0.5, -0.3, 0.0)]],
          "exercise 6 (grpo_token_loss): the KL term's gradient, beta (1 - exp(ref - logp))")


def test_exercise_7_dapo_bnpo_and_grpo_normalise_rows_of_different_lengths_differently():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # 3 tokens and 1 token; the 9s are padding
    for loss_type, want, how in [("dapo", 2.5, "the token sum / the step's 4 tokens"),
                                 ("grpo", 3.0, "each row's token mean (6/3, 4/1), summed / the step's 2 rows"),
                                 ("bnpo", 2.5, "the micro-batch's token mean / the step's 1 micro-batch")]:
        agree(vigor.normalised_loss(per_token, mask, loss_type, n_tokens=4, n_seqs=2, n_batches=1), want,
              f"exercise 7 (normalised_loss): {loss_type} is {how}")
    parts = [vigor.normalised_loss(per_token[i:i + 1], mask[i:i + 1], "bnpo", 4, 2, n_batches=2) for i in range(2)]
    agree(torch.stack(parts), [1.0, 2.0], "exercise 7 (normalised_loss): bnpo in 2 micro-batches of one row: each "
          "micro-batch's own token mean / 2, (6/3)/2 and (4/1)/2")
    for loss_type in ("dapo", "grpo"):  # micro-batches' shares use the step's counts: they add up to the whole
        parts = [vigor.normalised_loss(per_token[i:i + 1], mask[i:i + 1], loss_type, 4, 2, 2) for i in range(2)]
        agree(sum(parts), vigor.normalised_loss(per_token, mask, loss_type, 4, 2, 1), f"exercise 7 "
              f"(normalised_loss): {loss_type}'s micro-batch shares use the step's counts, so they add up to the "
              "whole step's loss")


@pytest.mark.parametrize("L", [2, 40])  # short rows and long rows: either way of computing must be right
def test_exercise_8_linear_grad_sq_norms_by_hand(L):
    """Row 0: a_t = (1, 0, ...) and g_t = (1, 0, ...) at every position: sum_t g_t a_t^T has one entry, L, so
    the squared norm is L^2 (not the L of summing each position's square). Row 1: a_t = ones(6) and g_t =
    c_t ones(5), c_t = (-1)^t (t + 1): 30 (sum_t c_t)^2."""
    a, g = torch.zeros(2, L, 6, dtype=torch.float64), torch.zeros(2, L, 5, dtype=torch.float64)
    a[0, :, 0], g[0, :, 0] = 1.0, 1.0
    c = torch.tensor([(-1) ** t * (t + 1) for t in range(L)], dtype=torch.float64)
    a[1], g[1] = 1.0, c[:, None].expand(L, 5)
    agree(vigor.linear_grad_sq_norms(a, g), [L ** 2, 30 * c.sum().item() ** 2],
          f"exercise 8 (linear_grad_sq_norms): ||sum_t g_t a_t^T||^2 per row, with the cross terms between "
          f"positions (L = {L}; row 0: {L ** 2}, row 1: 30 (sum c)^2)")


@pytest.mark.parametrize("tied", [True, False])
def test_exercise_8_per_layer_norms_equal_the_exact_norms(tied):
    """per_layer_grad_norms (not an exercise) builds every Linear weight's norm from linear_grad_sq_norms."""
    agree(vigor.per_layer_grad_norms(exercise_model(tied), *exercise_batch()), EXERCISE_NORMS[tied],
          "exercise 8 (linear_grad_sq_norms, through per_layer_grad_norms): the ghost norms of a whole model "
          "must equal its exact per-completion norms", rtol=1e-4)


# ======================================== HANDOUT_END ========================================================
# The reference's own tests.
# small enough for a 2-core CPU: the shipped tiny model, 4 prompts x G=4, 6 steps
QUICK = {"steps": 6, "prompts_per_step": 4, "num_generations": 4, "save_every": 2,
         "lr": 1e-4, "max_completion_length": 12,
         "eval_data": [{"path": "synthetic", "split": "test", "answer_column": "answer", "limit": 16}]}
TIMING = ("time/", "step_time", "gen/tokens_per_s")
# .ci/run runs every test in a virtualenv made by the README's first command alone, then installs the optional
# packages (trl, reasoning-gym) and runs these again: every test that skips without one is named here
OPTIONAL_TESTS = "stock_trl or readme_trl or real_signal_panel"


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory):
    """One out_dir for the whole session, so the tiny model's warm start is built once."""
    return str(tmp_path_factory.mktemp("runs"))


def quick(out_dir, **over):
    return vigor.make_config({**QUICK, "out_dir": out_dir, **over})


def cli(out_dir, **over):
    args = [sys.executable, os.path.join(HERE, "vigor.py")]
    for k, v in {**QUICK, "out_dir": out_dir, **over}.items():
        args += [f"--{k}", json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)]
    return args


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def without_timing(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def tiny_model(tied, seed=0, vocab=37):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, attn_implementation="eager")
    return Qwen2ForCausalLM(cfg).eval()


def padded_batch(vocab=37, seed=1):
    """Right-padded rows of different prompt and completion lengths."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (6, 1), (2, 9), (4, 4), (5, 2)]  # (prompt, completion) lengths
    L = max(p + c for p, c in shapes) + 2
    ids, mask = torch.zeros(len(shapes), L, dtype=torch.long), torch.zeros(len(shapes), L, dtype=torch.long)
    for i, (p, c) in enumerate(shapes):
        ids[i, :p + c] = torch.randint(1, vocab, (p + c,), generator=g)
        mask[i, p:p + c] = 1
    return ids, mask


def loop_norms_float64(model, ids, mask):
    """Independent reference: one completion at a time, plain autograd, float64, no padding at all."""
    m = type(model)(model.config).double().eval()
    m.load_state_dict(model.state_dict())
    for (n, p), (_, q) in zip(m.named_parameters(), model.named_parameters()):
        p.requires_grad_(q.requires_grad)
    out = []
    for row, mrow in zip(ids, mask):
        n = int(mrow.nonzero().max()) + 1
        x, w = row[:n][None], mrow[1:n].double()
        m.zero_grad()
        logp = torch.log_softmax(m(input_ids=x).logits[0, :-1], -1).gather(-1, x[0, 1:, None])[:, 0]
        (-(logp * w).sum() / w.sum()).backward()
        out.append(math.sqrt(sum((p.grad ** 2).sum().item() for p in m.parameters() if p.grad is not None)))
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# gradient norms
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_grad_norms_match_float64_autograd_loop(tied):
    model = tiny_model(tied)
    ids, mask = padded_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = vigor.grad_norms(model, ids, mask)
    want = loop_norms_float64(model, ids, mask)
    assert got.dtype == torch.float32 and got.shape == (len(ids),)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=0), (got, want)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "parameters changed"
    assert all(p.grad is None for p in model.parameters()), ".grad was left set"
    assert not got.requires_grad, "the reward must be a constant (stop-gradient)"


@pytest.mark.parametrize("tied", [True, False])
def test_exercise_norms_written_into_the_checks_are_the_float64_loops(tied):
    """The numbers exercise 2's and 8's checks compare with, from the independent loop."""
    want = loop_norms_float64(exercise_model(tied), *exercise_batch())
    assert torch.allclose(torch.tensor(EXERCISE_NORMS[tied], dtype=torch.float64), want, rtol=1e-5), want
    model = exercise_model(False)
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    want = loop_norms_float64(model, *exercise_batch())
    assert torch.allclose(torch.tensor(EXERCISE_MLP_NORMS, dtype=torch.float64), want, rtol=1e-5), want


def test_grad_norms_chunked_equals_unchunked_and_padding_is_inert():
    model = tiny_model(True)
    ids, mask = padded_batch()
    full = vigor.grad_norms(model, ids, mask)
    assert torch.allclose(vigor.grad_norms(model, ids, mask, chunk_size=2), full, rtol=1e-5)
    more_pad = torch.cat([ids, torch.full((len(ids), 7), 5)], 1)  # junk after the last real token
    assert torch.allclose(vigor.grad_norms(model, more_pad, torch.cat([mask, torch.zeros_like(more_pad[:, :7])], 1)),
                          full, rtol=1e-5)


def test_grad_norms_over_trainable_parameters_only():
    """LoRA-style: frozen parameters are constants, the norm is over the trainable ones."""
    model = tiny_model(False)
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" in name)
    ids, mask = padded_batch()
    got = vigor.grad_norms(model, ids, mask)
    assert torch.allclose(got.double(), loop_norms_float64(model, ids, mask), rtol=1e-4)
    model.requires_grad_(True)
    assert (vigor.grad_norms(model, ids, mask) > got).all()


@pytest.mark.parametrize("tied", [True, False])
def test_per_layer_norms_equal_torch_func_reference(tied):
    model = tiny_model(tied)
    ids, mask = padded_batch()
    ids[0, -1] = ids[0, 0]  # a repeated token id inside one row exercises the embedding's same-id pairs
    want = vigor.grad_norms(model, ids, mask)
    got = vigor.per_layer_grad_norms(model, ids, mask)
    assert torch.allclose(got, want, rtol=1e-4), (got, want)
    assert torch.allclose(got.double(), loop_norms_float64(model, ids, mask), rtol=1e-4)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("tied", [True, False])
def test_per_layer_norms_give_the_padding_token_no_embedding_gradient(tied):
    """Qwen2's embedding has padding_idx = pad_token_id, and nn.Embedding gives that row no gradient: a completion
    that samples the pad token mid-text must not count it in the embedding's (or the tied head's) norm."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=tied, pad_token_id=3)).eval()
    assert model.get_input_embeddings().padding_idx == 3
    ids, mask = padded_batch()
    ids[0, 4], ids[2, 6], ids[2, 8] = 3, 3, 3  # the pad id inside completions, twice in one row
    want = loop_norms_float64(model, ids, mask)
    assert torch.allclose(vigor.per_layer_grad_norms(model, ids, mask).double(), want, rtol=1e-4)
    assert torch.allclose(vigor.grad_norms(model, ids, mask).double(), want, rtol=1e-4)


def lora_model(tied):

    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_model(tied), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # LoRA B starts at zero; random B makes every LoRA parameter's gradient non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_lora_norms_are_over_lora_parameters_only(tied):
    model = lora_model(tied)
    ids, mask = padded_batch()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    want = []
    for row, m in zip(ids, mask):  # plain loop: autograd.grad over the LoRA parameters, in float64
        n = int(m.nonzero().max()) + 1
        x, w = row[:n][None], m[1:n].double()
        model.double()
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1], -1).gather(-1, x[0, 1:, None])[:, 0]
        grads = torch.autograd.grad(-(logp * w).sum() / w.sum(), [p for p in model.parameters() if p.requires_grad])
        want.append(math.sqrt(sum((g ** 2).sum().item() for g in grads)))
    model.float()
    want = torch.tensor(want, dtype=torch.float64)
    assert torch.allclose(vigor.grad_norms(model, ids, mask).double(), want, rtol=1e-4)
    assert torch.allclose(vigor.per_layer_grad_norms(model, ids, mask).double(), want, rtol=1e-4)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_reward_pass_works_with_gradient_checkpointing_on(monkeypatch, out_dir, lora_r):
    """Checkpointing acts in train mode, where torch.func refuses its saved-tensor hooks (and per_layer would see
    every layer run twice): a step must score its completions in eval mode, then update with checkpointing."""
    cfg = quick(out_dir, gradient_checkpointing=True, lora_r=lora_r, num_generations=4, prompts_per_step=1)
    policy, tok, ref = vigor.load_policy(cfg, vigor.tiny_base_model(cfg), None, torch.device("cpu"), torch.float32)
    assert (ref is None) == bool(lora_r)
    ids, mask = padded_batch(vocab=len(tok))
    policy.train()  # as an update leaves it: checkpointing is active
    with pytest.raises(RuntimeError, match="saved tensor hooks"):
        vigor.grad_norms(policy, ids, mask)
    policy.eval()
    assert torch.allclose(vigor.grad_norms(policy, ids, mask), vigor.per_layer_grad_norms(policy, ids, mask), rtol=1e-4)
    attention, runs_in_train_mode = policy.get_decoder().layers[0].self_attn, []
    attention.register_forward_pre_hook(lambda mod, inputs: runs_in_train_mode.append(1) if mod.training else None)
    policy.train()
    _, columns = sgd_step(cfg, policy, ref, one_group(), monkeypatch)  # the reward pass comes first
    assert torch.isfinite(columns["grad_norm"]).all()
    assert len(runs_in_train_mode) == 2, "one micro-batch: a forward, then its recomputation in the backward"


FAMILIES = {  # decoder families users try in 2026, as tiny random configs of the architectures transformers ships
    "Qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),  # RMSNorm over each head: q_norm, k_norm
    "Llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "SmolLM3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "Gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 16}),  # (1 + w), scaled rows
}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_layer_norms_are_exact_on_every_decoder_family(family, tied):
    import transformers
    config, model_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    arch = getattr(transformers, config)(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=tied, attn_implementation="eager", **extra)
    model = getattr(transformers, model_class)(arch).eval()
    ids, mask = padded_batch()
    ids[0, -1] = ids[0, 0]
    want = loop_norms_float64(model, ids, mask)
    assert torch.allclose(vigor.per_layer_grad_norms(model, ids, mask).double(), want, rtol=1e-4)
    assert torch.allclose(vigor.grad_norms(model, ids, mask).double(), want, rtol=1e-4)
    for name, p in model.named_parameters():  # the RMSNorms alone: in the whole model's norm they hide
        p.requires_grad_("norm" in name)
    want = loop_norms_float64(model, ids, mask)
    assert torch.allclose(vigor.per_layer_grad_norms(model, ids, mask).double(), want, rtol=1e-4)


def test_per_layer_refuses_parameters_it_cannot_handle():
    model = tiny_model(False)
    model.extra = torch.nn.Parameter(torch.zeros(3))  # a parameter outside Linear / RMSNorm / embedding
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="grad_norm_method=vmap"):
        vigor.per_layer_grad_norms(model, ids, mask)

    class Shifted(torch.nn.Embedding):  # an embedding that changes the rows it looks up: no rule for it
        def forward(self, ids):
            return super().forward(ids) + 1.0
    model = tiny_model(False)
    model.model.embed_tokens.__class__ = Shifted
    with pytest.raises(ValueError, match="grad_norm_method=vmap for this model .Qwen2ForCausalLM"):
        vigor.per_layer_grad_norms(model, ids, mask)


CPU_OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: ...")


@pytest.mark.parametrize("method,error", [("vmap", torch.OutOfMemoryError("forced")), ("per_layer", CPU_OOM),
                                          ("lm_head", torch.OutOfMemoryError("forced"))])
def test_reward_pass_retries_smaller_chunks_after_oom(method, error):
    model = tiny_model(False)
    ids, mask = padded_batch()
    real = {"vmap": vigor.grad_norms, "per_layer": vigor.per_layer_grad_norms, "lm_head": vigor.lm_head_grad_norms}[method]
    seen = []

    def flaky(m, i, k):
        seen.append(len(i))
        if len(i) > 2:
            raise error
        return real(m, i, k)

    norms = vigor.chunked_scores(flaky, model, ids, mask, 8)
    assert seen == [5, 4, 2, 2, 1]  # 5 rows: chunk 8 fails, chunk 4 fails, then chunks of 2, 2, 1
    assert torch.allclose(norms, real(model, ids, mask), rtol=1e-4)
    assert vigor.auto_chunk_size(model, ids, method) == len(ids)  # a tiny model fits at once
    with pytest.raises(RuntimeError, match="not memory"):  # any other error is not retried
        vigor.chunked_scores(lambda *a: (_ for _ in ()).throw(RuntimeError("not memory")), model, ids, mask, 8)


def test_free_memory_needs_no_linux_only_call(monkeypatch):
    """macOS has no os.sysconf("SC_AVPHYS_PAGES") and Windows no os.sysconf: the reward pass's chunk size must
    come without it (psutil, which peft brings)."""
    import psutil
    model = tiny_model(False)
    ids, _ = padded_batch()
    monkeypatch.delattr(os, "sysconf", raising=False)
    free = min(psutil.virtual_memory().available, 2 * 2**30)  # a CPU's share is capped: a laptop's reward pass
    assert vigor.free_memory(torch.device("cpu")) == pytest.approx(free, rel=0.2)
    assert vigor.auto_chunk_size(model, ids, "vmap") == len(ids)


# ---------------------------------------------------------------------------------------------------
# formulas
# ---------------------------------------------------------------------------------------------------
def test_identical_completions_share_their_reward():
    rewards = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])
    out = vigor.share_identical(rewards, [[5, 1], [6, 1], [5, 1], [7, 1]], 4)
    assert torch.allclose(out, torch.tensor([-1 / 3, -1 / 3, -1 / 3, 1.0]))
    same = vigor.share_identical(rewards, [[5, 1]] * 4, 4)
    assert torch.equal(vigor.group_advantages(same, 4), torch.zeros(4))


def test_grpo_step_changes_parameters_and_lowers_loss():
    model = tiny_model(False).train()
    ids, mask = padded_batch()
    m, adv = mask[:, 1:].float(), torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0])
    with torch.no_grad():
        old = vigor.policy_logps(model, ids, 1.0)[0]

    def loss():
        per_token = vigor.grpo_token_loss(vigor.policy_logps(model, ids, 1.0)[0], old, old, adv, 0.2, 0.2, 0.01)[0]
        return (per_token * m).sum() / m.sum()

    before_params = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    l0 = loss()
    l0.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before_params, model.parameters()))
    assert loss().item() < l0.item()


def test_all_identical_group_causes_no_update(monkeypatch, out_dir):
    """G identical completions: whatever ranks the tie rule gives, advantages and the update are zero."""
    cfg = quick(out_dir, beta=0.0)
    model, tok = vigor.load_model(vigor.tiny_base_model(cfg), cfg, torch.device("cpu"), torch.float32)
    prompt = tok("3+4=")["input_ids"]
    completion = tok("7")["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + completion] * 4)
    mask = torch.tensor([[0] * len(prompt) + [1] * len(completion)] * 4)
    ro = vigor.Rollouts(ids, mask, torch.full((4,), len(completion)), torch.zeros(4, dtype=torch.bool), ["7"] * 4,
                        [0] * 4)
    monkeypatch.setattr(vigor, "sample_groups", lambda *a, **k: ro)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    metrics, rw = vigor.rl_step(cfg, model, model, tok, opt, sched, ["3+4="], ["7"])
    assert torch.equal(rw["advantage"], torch.zeros(4))
    assert metrics["frac_reward_zero_std"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_all_identical_group_moves_only_through_the_kl_term(monkeypatch):
    """G identical completions: the advantages are zero, and with beta > 0 the KL term still has a gradient once
    the policy differs from the reference; with beta 0, or a policy equal to its reference, nothing moves."""
    completion = [9, 10, 11, 0]
    rollouts = vigor.Rollouts.from_ids([[5, 6, 7]] * 4, [completion] * 4, [False] * 4, ["c"] * 4, [0] * 4, 0)
    moved = {}
    for beta, ref_seed in ((0.5, 1), (0.0, 1), (0.5, 0)):
        model = tiny_model(False)
        cfg = vigor.make_config({"num_generations": 4, "prompts_per_step": 1, "beta": beta})
        _, columns = sgd_step(cfg, model, tiny_model(False, seed=ref_seed).requires_grad_(False), rollouts,
                              monkeypatch)
        assert torch.equal(columns["advantage"], torch.zeros(4))
        moved[beta, ref_seed] = max((a - b).abs().max().item() for a, b in zip(model.parameters(),
                                                                              tiny_model(False).parameters()))
    assert moved[0.5, 1] > 1e-4 and moved[0.0, 1] == 0 and moved[0.5, 0] < 1e-7


def test_sampling_leaves_the_tokenizers_padding_side_alone(out_dir):
    """Generation pads prompts on the left for its own call; the tokenizer (saved in checkpoints) keeps its side."""
    cfg = quick(out_dir)
    model, tok = vigor.load_model(vigor.tiny_base_model(cfg), cfg, torch.device("cpu"), torch.float32)
    assert tok.padding_side == "right"
    rollouts = vigor.sample_groups(model, tok, ["3+4=", "12-3+1="], 1, 4, greedy=True)
    assert tok.padding_side == "right" and rollouts.input_ids[0, 0] != tok.pad_token_id  # right-padded rows


def argmax_decoding(model, tok, prompt, max_new_tokens):
    """Greedy decoding by hand: the argmax of the model's logits, token by token, until a stop token."""
    ids, stops = tok(prompt, add_special_tokens=False)["input_ids"], vigor.stop_token_ids(model, tok)
    out = []
    with torch.no_grad():
        while len(out) < max_new_tokens and not (out and out[-1] in stops):
            out.append(int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def test_generation_uses_the_runs_settings_whatever_the_checkpoint_holds(out_dir):
    """A checkpoint's generation_config.json with sampling defaults (Qwen2.5-Instruct ships a repetition penalty,
    temperature, top-p, top-k) must not reach the rollouts or greedy evaluation: greedy equals argmax decoding by
    hand, and the logits processors are only the run's, those of a checkpoint without such defaults."""
    cfg = quick(out_dir)
    model, tok = vigor.load_model(vigor.tiny_base_model(cfg), cfg, torch.device("cpu"), torch.float32)
    prompts = [r["prompt"] for r in vigor.synthetic_split("test")[:6]]
    seen, real = [], model._get_logits_processor

    def spy(*args, **kwargs):
        processors = real(*args, **kwargs)
        seen.append(sorted(type(p).__name__ for p in processors))
        return processors
    model._get_logits_processor = spy

    def both():
        greedy = vigor.sample_groups(model, tok, prompts, 1, 12, greedy=True)
        torch.manual_seed(3)
        return greedy, vigor.sample_groups(model, tok, prompts, 4, 12, temperature=0.9, top_k=50)
    clean = both()
    model.generation_config.update(repetition_penalty=1.3, temperature=0.3, top_p=0.5, top_k=3,
                                   no_repeat_ngram_size=2, min_new_tokens=6)
    leaky = both()
    assert seen[:2] == seen[2:] == [[], ["TemperatureLogitsWarper", "TopKLogitsWarper"]]
    for got in (clean, leaky):
        assert [r[m.bool()].tolist() for r, m in zip(got[0].input_ids, got[0].loss_mask)] == \
            [argmax_decoding(model, tok, p, 12) for p in prompts]
        assert torch.equal(got[1].input_ids, clean[1].input_ids), "sampling must not change either"
    assert model.generation_config.repetition_penalty == 1.3, "the checkpoint's own config is left as it was"


def test_truncated_completions_can_be_left_out_of_the_loss(monkeypatch, out_dir):
    cfg = quick(out_dir, mask_truncated_completions=True, beta=0.0)
    model, tok = vigor.load_model(vigor.tiny_base_model(cfg), cfg, torch.device("cpu"), torch.float32)
    ids, mask = padded_batch(vocab=len(tok))
    ro = vigor.Rollouts(ids[:4], mask[:4], mask[:4].sum(1), torch.ones(4, dtype=torch.bool), ["a", "b", "c", "d"],
                        [0] * 4)
    monkeypatch.setattr(vigor, "sample_groups", lambda *a, **k: ro)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    metrics, rw = vigor.rl_step(cfg, model, model, tok, opt, sched, ["x"], None)
    assert (rw["advantage"] != 0).any(), "the rewards differ, only the mask may stop the update"
    assert metrics["completions/clipped_ratio"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def one_group(seed=11, lengths=(2, 4, 7, 12)):
    """Rollouts of one prompt (ids 5 6 7) and G = 4 random completions of the given lengths, no stop token."""
    g, G = torch.Generator().manual_seed(seed), len(lengths)
    completions = [torch.randint(3, 37, (n,), generator=g).tolist() for n in lengths]
    return vigor.Rollouts.from_ids([[5, 6, 7]] * G, completions, [False] * G, ["c"] * G, [0] * G, 0)


def sgd_step(cfg, model, ref, rollouts, monkeypatch, lr=0.05):
    """One rl_step of `model` on fixed rollouts with plain SGD (the update is the clipped gradient x lr)."""
    monkeypatch.setattr(vigor, "sample_groups", lambda *a, **k: rollouts)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return vigor.rl_step(cfg, model, ref, None, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         ["p"], None)


def sequence_logps(model, rollouts):
    with torch.no_grad():
        return (vigor.token_logps(model(input_ids=rollouts.input_ids).logits, rollouts.input_ids) *
                rollouts.loss_mask[:, 1:]).sum(1)


@pytest.mark.parametrize("sqrt_t", [True, False])
def test_lowest_length_corrected_norm_gets_reward_plus_one_and_the_update_favours_it(monkeypatch, sqrt_t):
    """End to end through rl_step: the completion with the smallest sqrt(T)*||g|| (||g|| from the independent
    float64 loop) gets reward +1 and the largest advantage; without sqrt(T) the smallest raw ||g|| does, a
    different completion here; the update raises that completion's log-probability."""
    model, rollouts = tiny_model(False), one_group()
    ref = tiny_model(False).requires_grad_(False)
    norms = loop_norms_float64(model, rollouts.input_ids, rollouts.loss_mask)
    lengths = rollouts.lengths.double()
    best = int((lengths.sqrt() * norms if sqrt_t else norms).argmin())
    assert best == (2 if sqrt_t else 3), "the fixed group must separate the two rules"
    cfg = vigor.make_config({"num_generations": 4, "prompts_per_step": 1, "beta": 0.0, "sqrt_t": sqrt_t})
    before = sequence_logps(model, rollouts)
    _, columns = sgd_step(cfg, model, ref, rollouts, monkeypatch)
    assert torch.allclose(columns["grad_norm"].double(), norms, rtol=1e-4)
    assert columns["reward"][best] == 1 and columns["advantage"][best] == columns["advantage"].max() > 0
    assert sorted(columns["reward"].tolist()) == pytest.approx([-1, -1 / 3, 1 / 3, 1])
    gained = sequence_logps(model, rollouts) - before
    assert gained[best] > 0 and gained[columns["reward"].argmin()] < 0


def test_the_reference_stays_the_initial_model_under_full_fine_tuning(monkeypatch, out_dir):
    cfg = quick(out_dir, beta=0.1, num_generations=4, prompts_per_step=1)
    policy, tok, ref = vigor.load_policy(cfg, vigor.tiny_base_model(cfg), None, torch.device("cpu"), torch.float32)
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    assert ref is not policy and not any(p.requires_grad for p in ref.parameters())
    rollouts = one_group()
    first, _ = sgd_step(cfg, policy, ref, rollouts, monkeypatch)
    second, _ = sgd_step(cfg, policy, ref, rollouts, monkeypatch)
    assert any(not torch.equal(initial[k], v) for k, v in policy.state_dict().items()), "the policy must move"
    assert all(torch.equal(initial[k], v) for k, v in ref.state_dict().items()), "the reference moved"
    assert first["kl"] == 0 and second["kl"] > 0  # measured against the initial model, not the moving policy


def test_two_iterations_reuse_the_sampling_log_probs_and_clip(monkeypatch):
    """num_iterations 2 on fixed rollouts: iteration 1 sees ratio 1 exactly (no clip); iteration 2 compares the
    moved policy with the same sampling-time log-probs, and its clip flags follow the rule by hand."""
    model, rollouts = tiny_model(False), one_group()
    seen, real = [], vigor.grpo_token_loss

    def recording(logps, old, ref, adv, eps, eps_high, beta):
        out = real(logps, old, ref, adv, eps, eps_high, beta)
        seen.append((logps.detach().clone(), old.detach().clone(), adv, out[2]))
        return out
    monkeypatch.setattr(vigor, "grpo_token_loss", recording)
    cfg = vigor.make_config({"num_generations": 4, "prompts_per_step": 1, "num_iterations": 2, "beta": 0.0,
                             "epsilon": 0.02, "epsilon_high": 0.05})
    metrics, _ = sgd_step(cfg, model, tiny_model(False).requires_grad_(False), rollouts, monkeypatch, lr=1.0)
    assert len(seen) == 2  # one micro-batch, two iterations
    (logps1, old1, adv, clipped1), (logps2, old2, _, clipped2) = seen
    mask = rollouts.loss_mask[:, 1:].bool()
    assert torch.allclose(logps1, old1, atol=1e-6) and not clipped1.any() and metrics["clip_ratio/region_mean"] == 0
    assert torch.equal(old1, old2), "the old log-probs are the sampling policy's, computed once"
    ratio = torch.exp(logps2 - old2)
    assert (ratio[mask] - 1).abs().max() > 0.05, "lr 1 must move the policy past the clip range"
    a = adv[:, None].expand_as(ratio)
    want = ((a > 0) & (ratio > 1.05)) | ((a < 0) & (ratio < 0.98))
    assert torch.equal(clipped2[mask], want[mask]) and want[mask].any()


def fixed_step_params(monkeypatch, loss_type, micro):
    model, rollouts = tiny_model(False), one_group()
    cfg = vigor.make_config({"num_generations": 4, "prompts_per_step": 1, "beta": 0.5, "loss_type": loss_type,
                             "micro_batch_size": micro, "max_grad_norm": 1e6})
    metrics, _ = sgd_step(cfg, model, tiny_model(False, seed=1).requires_grad_(False), rollouts, monkeypatch)
    return [p.detach().clone() for p in model.parameters()], metrics


def test_bnpo_is_the_mean_of_micro_batch_token_means(monkeypatch):
    """bnpo over one micro-batch of the 4 rows (lengths 2..12) is dapo's update; over micro-batches of one row
    each it is grpo's (each row's token mean, averaged), and the two differ."""
    (bnpo_4, _), (dapo, _) = fixed_step_params(monkeypatch, "bnpo", 4), fixed_step_params(monkeypatch, "dapo", 4)
    (bnpo_1, _), (grpo, _) = fixed_step_params(monkeypatch, "bnpo", 1), fixed_step_params(monkeypatch, "grpo", 4)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(bnpo_4, dapo))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(bnpo_1, grpo))
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(bnpo_4, bnpo_1))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_micro_batches_only_split_the_work(monkeypatch, loss_type):
    """The same fixed rollouts in one micro-batch of 4 or four of 1: the same update (the loss normalisers
    count the whole step), beta and the KL term included (the reference is another model)."""
    (one, m1), (four, m4) = fixed_step_params(monkeypatch, loss_type, 4), fixed_step_params(monkeypatch, loss_type, 1)
    assert m1["kl"] > 0 and m1["loss"] == pytest.approx(m4["loss"], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one, four))


def test_kl_and_entropy_metrics_are_means_over_completion_tokens(monkeypatch):
    """The step's kl and entropy, recomputed by hand from the two models' tempered log-probs over the completion
    tokens only (never the prompt): the loss mask is the completion's, shifted to the predicting positions. The
    entropy is the sampling distribution's (logits / temperature), as TRL logs it."""
    model, rollouts = tiny_model(False), one_group()
    ref = tiny_model(False, seed=1).requires_grad_(False)
    ids, mask, temperature = rollouts.input_ids, rollouts.loss_mask[:, 1:].double(), 0.7
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double() / temperature
        logp, ref_logp = (vigor.token_logps(m(input_ids=ids).logits.double() / temperature, ids) for m in (model, ref))
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    token_entropy = -(logits[:, :-1].softmax(-1) * logits[:, :-1].log_softmax(-1)).sum(-1)
    cfg = vigor.make_config({"num_generations": 4, "prompts_per_step": 1, "beta": 0.1, "temperature": temperature})
    metrics, _ = sgd_step(cfg, model, ref, rollouts, monkeypatch)
    assert metrics["kl"] == pytest.approx(((kl * mask).sum() / mask.sum()).item(), rel=1e-4)
    assert metrics["entropy"] == pytest.approx(((token_entropy * mask).sum() / mask.sum()).item(), rel=1e-4)


def test_completion_without_a_stop_token_is_cut_at_the_limit_and_keeps_its_last_token():

    tok = vigor.char_tokenizer()
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         eos_token_id=tok.eos_token_id)).eval()
    x = tok.convert_tokens_to_ids("x")

    def always_x(module, inputs, logits):  # the model never writes a stop token
        out = torch.full_like(logits, -1e4)
        out[:, -1, x] = 1e4
        return out
    model.lm_head.register_forward_hook(always_x)
    ro = vigor.sample_groups(model, tok, ["1+2=", "10-3="], 1, 5, greedy=True)
    assert ro.completions == ["xxxxx", "xxxxx"] and ro.lengths.tolist() == [5, 5] and ro.truncated.all()
    for row, mask, prompt in zip(ro.input_ids, ro.loss_mask, ["1+2=", "10-3="]):
        n = len(prompt)
        assert row[:n].tolist() == tok(prompt)["input_ids"] and row[n:n + 5].tolist() == [x] * 5
        assert mask.tolist()[:n + 5] == [0] * n + [1] * 5  # T = the limit, the last token counted


# ---------------------------------------------------------------------------------------------------
# data, grading, models
# ---------------------------------------------------------------------------------------------------
def test_grading_synthetic_gsm8k_and_boxed():
    assert vigor.is_correct("12,9,11", "11") and not vigor.is_correct("12,9,10", "11")
    assert vigor.extract_answer("12,9,11") == "11"
    assert vigor.is_correct("so she pays 1,000 dollars", "She pays 500*2 = 1000\n#### 1,000")
    assert vigor.is_correct("She pays 1000.\n#### 1000\nThe answer is: 1000", "#### 1,000", "gsm8k")
    assert vigor.is_correct("#### $1,000 dollars\n#### 5", "#### 1000", "gsm8k")  # the first ####, its number
    assert not vigor.is_correct("#### 5\n#### 1000", "#### 1000", "gsm8k")
    assert vigor.is_correct("The answer is $\\boxed{\\frac{1}{2}}$.", "\\boxed{\\dfrac{1}{2}}", "boxed")
    assert vigor.extract_answer("\\boxed{x^{2}+1}", "boxed") == "x^{2}+1"
    assert vigor.extract_answer("first \\boxed{3}, then \\boxed{4}", "boxed") == "4"  # the last box
    assert vigor.extract_answer("#### 5\n#### 6", "gsm8k") == "5" and vigor.extract_answer("3 then 4") == "4"

    assert not vigor.is_correct("no number here", "#### 4")
    for row in vigor.synthetic_split("test")[:50]:  # a gold solution grades as correct against its answer
        assert vigor.is_correct(row["solution"], row["answer"])


def test_signed_zeros_are_zero_and_integers_compare_exactly_at_any_size():
    for zero in ("-0", "-0.0", "+0", "0.0", "0"):
        for fmt, text in (("last_number", f"so {zero}"), ("gsm8k", f"#### {zero}"), ("boxed", f"\\boxed{{{zero}}}")):
            if not (fmt == "gsm8k" and zero == "+0"):  # lm-eval's strict match reads no sign but minus
                assert vigor.is_correct(text, "0", fmt) and vigor.is_correct("0", zero), (zero, fmt)
    big = 2**53 + 1  # 9007199254740993: as a float it is 9007199254740992
    assert not vigor.is_correct(str(big), str(big - 1)) and not vigor.is_correct(str(big - 1), str(big))
    assert vigor.is_correct(f"#### {big:,}", str(big), "gsm8k") and vigor.is_correct(str(10**30 + 7), str(10**30 + 7))
    assert not vigor.is_correct(str(10**30 + 7), str(10**30 + 8))
    assert vigor.is_correct("1000.0", "#### 1,000") and vigor.is_correct("-12", "-12.0") and not vigor.is_correct("12", "-12")


def test_synthetic_splits_are_disjoint():
    splits = [{r["prompt"] for r in vigor.synthetic_split(s)} for s in ("warmstart", "train", "test", "validation")]
    assert [len(x) for x in splits] == [4000, 2000, 1000, 500]
    assert all(not (a & b) for i, a in enumerate(splits) for b in splits[i + 1:])
    with pytest.raises(vigor.DataError, match="splits"):
        vigor.synthetic_split("dev")


def test_no_answer_in_the_asked_format_is_wrong():
    cut = "Tom has 3 apples and buys 4 more, so 3 + 4 = 7 and then he gives"  # truncated: no final answer
    for fmt in ("boxed", "gsm8k"):
        assert not vigor.is_correct(cut, "#### 7", fmt) and not vigor.is_correct(cut, "7", fmt)
    assert vigor.is_correct(cut, "7", "last_number"), "last_number is the synthetic task's format"
    assert vigor.is_correct("First 3 + 4 = 8, no: 7. \\boxed{7}", "#### 7", "boxed")  # wrong number, then boxed
    assert not vigor.is_correct("\\boxed{8} ... 7", "#### 7", "boxed")
    assert vigor.is_correct("so $\\boxed{1,000}$", "Total: 500 * 2\n#### 1,000", "boxed")  # GSM8K gold, boxed
    assert vigor.is_correct("\\boxed{\\frac12}", "0.5", "boxed")
    assert not vigor.is_correct("\\boxed{7", "7", "boxed"), "an unclosed box is no answer"
    for fmt in ("boxed", "gsm8k", "last_number"):
        assert not vigor.is_correct("", "7", fmt)
    assert not vigor.is_correct("\\boxed{}", "7", "boxed") and not vigor.is_correct("#### ", "7", "gsm8k")


def test_answer_format_follows_the_prompt():
    authors = "Let's think step by step and output the final answer within \\boxed{}."
    assert vigor.answer_format(f"<system>{authors}<user>What is 3+4?") == "boxed"
    assert vigor.answer_format("Solve, then write #### and the number.\nWhat is 3+4?") == "gsm8k"
    assert vigor.answer_format("7+5-3=") == "last_number"
    assert vigor.answer_format("7+5-3=", "boxed") == "boxed"
    ro = vigor.Rollouts(None, None, None, None, ["12,7", "\\boxed{7}", "so 7", "\\boxed{7}"], [0, 0, 1, 1])
    prompts = ["3+4=", "Answer in \\boxed{}: 3+4="]
    assert vigor.grade(ro, prompts, ["7", "7"]).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert vigor.grade(ro, prompts, ["7", "7"], "boxed").tolist() == [0.0, 1.0, 0.0, 1.0]


MATH500_STYLE = [  # (bare gold answer as in MATH-500's `answer` column, an equal boxed answer, a different one)
    ("\\frac{14}{3}", "\\dfrac{14}{3}", "\\frac{13}{3}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})", "(3, \\frac{\\pi}{3})"),
    ("p - q", "p-q", "q - p"),
    ("x^2+7x+10", "x^2 + 7x + 10", "x^2+7x+12"),
    ("\\text{Evelyn}", "\\text{Evelyn}", "\\text{Bob}"),
    ("[-2, 7)", "[-2,7)", "[-2,7]"),
    ("(-\\infty, 3]", "(-\\infty,3]", "(-\\infty,3)"),
    ("30^\\circ", "30^\\circ", "60^\\circ"),
    ("2\\sqrt{5}", "2\\sqrt5", "\\sqrt{5}"),
    ("-\\frac{1}{2}", "-0.5", "\\frac12"),
    ("\\{1, 2\\}", "\\{1,2\\}", "\\{1,3\\}"),
    ("10\\%", "10\\%", "20\\%"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\3\\end{pmatrix}"),
    ("(1,23)", "(1, 23)", "(12,3)"),
]


@pytest.mark.parametrize("gold, same, other", MATH500_STYLE)
def test_bare_latex_gold_answers_are_read_whole(gold, same, other):
    assert vigor.is_correct(f"Thus the answer is $\\boxed{{{same}}}$.", gold, "boxed")
    assert not vigor.is_correct(f"Thus the answer is $\\boxed{{{other}}}$.", gold, "boxed")
    assert vigor.is_correct(f"\\boxed{{{same}}}", f"We find ... so \\boxed{{{gold}}}.", "boxed")  # MATH solution


def test_latex_answers_are_graded_by_math_verify():
    assert vigor.is_correct("so $\\boxed{0.5}$", "\\boxed{\\frac{1}{2}}", "boxed")
    assert vigor.is_correct("$\\boxed{\\sqrt{4}}$", "2 so \\boxed{2}", "boxed")
    assert not vigor.is_correct("$\\boxed{\\frac{1}{3}}$", "\\boxed{\\frac{1}{2}}", "boxed")


@pytest.mark.parametrize("completion, gold", [("\\boxed{1/2}", "0.5"), ("\\boxed{3/4}", "0.75"),
                                               ("\\boxed{2,1}", "1,2"), ("\\boxed{0.75}", "\\frac{3}{4}")])
def test_equal_plain_answers_are_graded_equal(completion, gold):
    """Plain answers that math-verify says are equal: a fraction and a decimal, an unordered list."""
    assert vigor.is_correct(completion, gold, "boxed")


def test_plain_numbers_and_the_synthetic_lists_stay_right_without_math_verify(monkeypatch):
    """The synthetic task's `12,9` is a list of running totals, never 12.9; two plain numbers are compared as
    floats alone (the fast path of every synthetic grade: math-verify is never asked)."""
    assert not vigor.is_correct("\\boxed{12,9}", "9", "boxed") and not vigor.is_correct("\\boxed{12,9}", "12.9", "boxed")
    assert not vigor.is_correct("\\boxed{1,2}", "1,2,3", "boxed")
    monkeypatch.setitem(sys.modules, "math_verify", None)  # importing it now fails
    assert vigor.is_correct("7+5-3=12,9", "9") and not vigor.is_correct("12,9", "12")
    assert vigor.is_correct("#### 1,000", "1000.0", "gsm8k") and not vigor.is_correct("#### 2", "-2", "gsm8k")
    rows = vigor.synthetic_split("test")[:50]
    ro = vigor.Rollouts(None, None, None, None, [r["solution"] for r in rows] + ["12,9"] * 50, list(range(50)) * 2)
    grades = vigor.grade(ro, [r["prompt"] for r in rows], [r["answer"] for r in rows])
    assert grades[:50].all() and grades[50:].sum() == sum(r["answer"] == "9" for r in rows)


def chat_tokenizer():
    """A character tokenizer with Qwen-style turn markers and chat template, built here (no hub)."""
    tok = vigor.char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_generation_stops_at_the_chat_templates_end_of_turn():
    tok = chat_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert vigor.end_of_turn_id(tok) == im_end and vigor.end_of_turn_id(vigor.char_tokenizer()) is None
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id)).eval()
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("~")  # a stop the model never writes
    script = [tok.convert_tokens_to_ids(c) for c in "42"] + [im_end] + [tok.convert_tokens_to_ids("x")] * 20
    calls = []

    def force_next_token(module, inputs, logits):  # the model "writes" 4, 2, <|im_end|>, then x x x ...
        out = torch.full_like(logits, -1e4)
        out[:, -1, script[min(len(calls), len(script) - 1)]] = 1e4
        calls.append(1)
        return out
    model.lm_head.register_forward_hook(force_next_token)
    prompts = [vigor.format_prompt(tok, "What is 6*7?"), vigor.format_prompt(tok, "And 7*6?")]
    ro = vigor.sample_groups(model, tok, prompts, 1, 16, greedy=True)
    assert ro.completions == ["42", "42"] and ro.lengths.tolist() == [3, 3] and not ro.truncated.any()
    assert ro.input_ids[0, ro.loss_mask[0].bool()].tolist()[-1] == im_end  # counted in T, as the EOS is
    assert len(calls) == 3, "generate stopped at <|im_end|> instead of running to the length limit"


def test_lm_head_closed_form_equals_grad_norms_of_the_head():
    model = tiny_model(False)
    ids, mask = padded_batch()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "lm_head.weight")
    want = vigor.grad_norms(model, ids, mask)
    assert torch.allclose(vigor.lm_head_grad_norms(model, ids, mask), want, rtol=1e-4)
    assert torch.allclose(want.double(), loop_norms_float64(model, ids, mask), rtol=1e-4)


def test_local_files_any_format_and_column_errors(tmp_path):
    rows = [{"question": "1+2=", "gold": "3"}, {"question": "4-1=", "gold": "3"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "p.csv").write_text("question,gold\n1+2=,3\n4-1=,3\n")
    for path in (jsonl, tmp_path / "p.csv"):
        prompts, answers = vigor.load_prompts({"path": str(path), "prompt_column": "question", "answer_column": "gold"})
        assert prompts == ["1+2=", "4-1="] and answers == ["3", "3"]
    with pytest.raises(vigor.DataError, match=r"column 'problem' not in .*\['question', 'gold'\]"):
        vigor.load_prompts({"path": str(jsonl), "prompt_column": "problem"})
    with pytest.raises(vigor.DataError, match="dataset file not found"):
        vigor.load_prompts({"path": str(tmp_path / "missing.jsonl")})
    (tmp_path / "empty.csv").write_text("question,gold\n")
    with pytest.raises(vigor.DataError, match="no rows|could not load"):
        vigor.load_prompts({"path": str(tmp_path / "empty.csv"), "prompt_column": "question"})
    (tmp_path / "bad.jsonl").write_text('{"question": "1+2="\n')
    with pytest.raises(vigor.DataError, match="could not load"):
        vigor.load_prompts({"path": str(tmp_path / "bad.jsonl"), "prompt_column": "question"})


def test_from_pretrained_folder_and_missing_folder(tmp_path, out_dir):
    cfg = quick(out_dir)
    model = tiny_model(False, vocab=len(vigor.char_tokenizer()))
    model.save_pretrained(tmp_path / "m")
    vigor.char_tokenizer().save_pretrained(tmp_path / "m")
    loaded, tok = vigor.load_model(str(tmp_path / "m"), cfg, torch.device("cpu"), torch.float32)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight) and tok.decode(tok("7+5=")["input_ids"]) == "7+5="
    with pytest.raises(vigor.ConfigError, match="model folder not found"):
        vigor.load_model(str(tmp_path / "nope"), cfg, torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------
def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1e-5\nnum_generations: 4\ntrain_data: {path: x.jsonl, prompt_column: q}\n")
    cfg = vigor.load_config(["--config", str(f), "--num_generations", "6", "--sqrt_t=false"])
    assert cfg.lr == 1e-5 and cfg.num_generations == 6 and cfg.sqrt_t is False
    assert cfg.train_data == {"path": "x.jsonl", "prompt_column": "q"}


@pytest.mark.parametrize("args, message", [
    (["--bogus", "1"], "unknown setting.*valid settings: run_name"),
    (["--num_generations", "two"], "must be int"),
    (["--num_generations", "1"], "must be >= 2"),
    (["--lr", "-0.1"], "lr must be > 0"),
    (["--top_p", "1.5"], r"top_p must be in \(0, 1\]"),
    (["--reward", "magic"], "reward must be one of"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
    (["--train_data", "{prompt_column: q}"], "must be a mapping with 'path'"),
    (["--steps"], "needs a value"),
    (["--reward_params", "lm_head", "--lora_r", "8"], "LoRA freezes the head.*use reward_params all"),
])
def test_config_errors_are_clear(args, message):
    with pytest.raises(vigor.ConfigError, match=message):
        vigor.load_config(args)


def test_malformed_config_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: [1,\n")
    with pytest.raises(vigor.ConfigError, match="not valid YAML"):
        vigor.load_config(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(vigor.ConfigError, match="must hold a mapping"):
        vigor.load_config(["--config", str(tmp_path / "list.yaml")])


# ---------------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------------
def test_main_job_end_to_end_writes_the_run_folder(out_dir):
    proc = subprocess.run(cli(out_dir, run_name="e2e"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "before RL" in proc.stdout and "after RL" in proc.stdout
    run = os.path.join(out_dir, "e2e")
    assert {"config.json", "metrics.jsonl", "completions.jsonl", "final", "latest", "checkpoint-6"} <= set(os.listdir(run))
    metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
    steps = [m for m in metrics if "kl" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "kl", "entropy", "clip_ratio/region_mean", "grad_norm", "learning_rate", "step_time",
                "time/generate", "time/reward", "time/update", "time/reference", "vigor/grad_norm_raw"):
        assert all(math.isfinite(m[key]) for m in steps), key
    assert "eval/test/accuracy" in metrics[0] and metrics[-1].get("final")
    comp = read_jsonl(os.path.join(run, "completions.jsonl"))
    assert len(comp) == 6 * 4 * 4 and {"grad_norm", "score", "reward", "advantage", "correct"} <= set(comp[0])
    for m in steps:  # TRL's reward_std: the std of the step's rewards; ours within groups, under its own name
        rewards = torch.tensor([r["reward"] for r in comp if r["step"] == m["step"]], dtype=torch.float64)
        assert m["reward_std"] == pytest.approx(rewards.std().item(), rel=1e-5)
        assert m["reward_std/within_group"] == pytest.approx(rewards.view(-1, 4).std(1).mean().item(), rel=1e-5)
    assert os.path.isfile(os.path.join(run, "final", "model.safetensors"))


def test_same_seed_same_metrics(out_dir):
    a = vigor.train(quick(out_dir, run_name="det_a", steps=3))
    b = vigor.train(quick(out_dir, run_name="det_b", steps=3))
    ma, mb = (read_jsonl(os.path.join(out_dir, n, "metrics.jsonl")) for n in ("det_a", "det_b"))
    assert without_timing(ma) == without_timing(mb) and a["after"] == b["after"]


def killed_after_a_checkpoint(cmd, run):
    """Start `cmd` in its own process group and SIGKILL the whole group (torchrun and its workers too, like a
    lost node) once `run` has a checkpoint; returns the checkpoint the kill left."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and vigor.latest_checkpoint(run) is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return vigor.latest_checkpoint(run)


def test_resume_after_sigkill_matches_uninterrupted_run(out_dir):
    over = dict(steps=8, save_every=2, log_completions_every=1)
    full = subprocess.run(cli(out_dir, run_name="whole", **over), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    killed_at = killed_after_a_checkpoint(cli(out_dir, run_name="killed", **over), os.path.join(out_dir, "killed"))
    assert killed_at is not None and not killed_at.endswith("checkpoint-8"), "the kill came too late to test resume"
    again = subprocess.run(cli(out_dir, run_name="killed", **over), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout
    for name in ("metrics.jsonl", "completions.jsonl"):
        want, got = (read_jsonl(os.path.join(out_dir, r, name)) for r in ("whole", "killed"))
        assert without_timing(got) == without_timing(want), name


def test_resume_keeps_every_logged_line_whose_text_says_final(tmp_path, out_dir):
    """The issue's reproduction: prompts like 'final 3+4=' (the Qwen configs' system prompt says 'final answer'),
    a finished run resumed: completions.jsonl and metrics.jsonl come back whole, one final line."""
    data = tmp_path / "final.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"final {a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(8) for b in range(5)))
    cfg = quick(out_dir, run_name="final-text", steps=3, save_every=1, train_data={"path": str(data)})
    vigor.train(cfg)
    run = os.path.join(out_dir, "final-text")
    logged, rows = open(os.path.join(run, "completions.jsonl")).read(), read_jsonl(os.path.join(run, "completions.jsonl"))
    assert len(rows) == 3 * 4 * 4 and all(r["prompt"].startswith("final ") for r in rows)
    vigor.train(cfg)  # the same command again: a resume of the finished run
    assert open(os.path.join(run, "completions.jsonl")).read() == logged
    metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
    assert [(m["step"], bool(m.get("final"))) for m in metrics] == [(0, False), (1, False), (2, False), (3, False),
                                                                      (3, True)]


def test_a_run_killed_before_its_first_checkpoint_logs_its_start_once(monkeypatch, out_dir):
    """Killed after the step-0 evaluation was logged, before any checkpoint: the resumed run redoes that
    evaluation, and metrics.jsonl holds one line per step and one final line."""
    cfg = quick(out_dir, run_name="early-kill", steps=2, save_every=1)
    real = vigor.rl_step
    monkeypatch.setattr(vigor, "rl_step", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        vigor.train(cfg)
    run = os.path.join(out_dir, "early-kill")
    assert [m["step"] for m in read_jsonl(os.path.join(run, "metrics.jsonl"))] == [0]
    monkeypatch.setattr(vigor, "rl_step", real)
    vigor.train(cfg)
    assert [(m["step"], bool(m.get("final"))) for m in read_jsonl(os.path.join(run, "metrics.jsonl"))] == [
        (0, False), (1, False), (2, False), (2, True)]


def test_partial_checkpoint_write_leaves_previous_usable(monkeypatch, out_dir, capsys):
    """A kill while checkpoint-3 is being written (its weights are on disk, its trainer state is not) leaves
    `latest` on the complete checkpoint-2, and the same command resumes from it to the uninterrupted result."""
    cfg = quick(out_dir, run_name="partial", steps=3, save_every=1)
    run, real_save = os.path.join(out_dir, "partial"), torch.save

    def killed_while_writing_checkpoint_3(obj, path, *a, **k):
        if "checkpoint-3" in str(path):
            raise KeyboardInterrupt
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", killed_while_writing_checkpoint_3)
    with pytest.raises(KeyboardInterrupt):
        vigor.train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert os.path.isfile(os.path.join(run, "checkpoint-3.tmp", "model.safetensors"))  # half written
    assert vigor.latest_checkpoint(run).endswith("checkpoint-2") and not os.path.exists(os.path.join(run, "checkpoint-3"))
    state_file = os.path.join(run, "checkpoint-2", "trainer_state.pt")
    saved = torch.load(state_file, weights_only=True)  # written before several processes: one RNG state, no list
    torch.save({**saved, "rng": saved["rng"][0]}, state_file)
    again = vigor.train(cfg)  # resumes after step 2 and redoes step 3
    assert "resuming" in capsys.readouterr().out and not os.path.exists(os.path.join(run, "checkpoint-3.tmp"))
    whole = vigor.train(quick(out_dir, run_name="partial-whole", steps=3, save_every=1))
    assert again["after"] == whole["after"]
    want, got = (read_jsonl(os.path.join(out_dir, r, "metrics.jsonl")) for r in ("partial-whole", "partial"))
    assert without_timing(got) == without_timing(want)


def test_existing_run_folder_is_never_overwritten(out_dir, tmp_path):
    cfg = quick(out_dir, run_name="guard")
    vigor.write_config(vigor.check_run_dir(cfg), cfg)
    with pytest.raises(vigor.ConfigError, match="other settings \\(lr\\)"):
        vigor.check_run_dir(quick(out_dir, run_name="guard", lr=0.5))
    with pytest.raises(vigor.ConfigError, match="resume is off"):
        vigor.check_run_dir(quick(out_dir, run_name="guard", resume=False))
    with pytest.raises(vigor.ConfigError, match=r"\(steps\); a run's steps are fixed.*start a new run; choose another "
                       "--run_name"):  # a finished run is not extended
        vigor.check_run_dir(quick(out_dir, run_name="guard", steps=QUICK["steps"] + 10))
    os.makedirs(os.path.join(out_dir, "stranger"))
    open(os.path.join(out_dir, "stranger", "notes.txt"), "w").write("mine")
    with pytest.raises(vigor.ConfigError, match="not a vigor run folder"):
        vigor.train(quick(out_dir, run_name="stranger"))
    assert os.listdir(os.path.join(out_dir, "stranger")) == ["notes.txt"]
    # bad input fails before any run folder exists, so the corrected command just works
    with pytest.raises(vigor.DataError, match="dataset file not found"):
        vigor.train(quick(out_dir, run_name="typo", train_data={"path": str(tmp_path / "typo.jsonl")}))
    with pytest.raises(vigor.ConfigError, match="model folder not found"):
        vigor.train(quick(out_dir, run_name="typo", model=str(tmp_path / "no-model")))
    assert not os.path.exists(os.path.join(out_dir, "typo"))


def test_nan_rewards_are_skipped_then_the_run_stops(monkeypatch, out_dir):
    monkeypatch.setattr(vigor, "grad_norms", lambda m, i, k, *c: torch.full((len(i),), float("nan")))
    with pytest.raises(vigor.BadStepError, match="3 steps in a row were skipped .*grad_norm.*NaN"):
        vigor.train(quick(out_dir, run_name="nan", max_bad_steps=3))
    rows = read_jsonl(os.path.join(out_dir, "nan", "metrics.jsonl"))
    assert [r["skipped_steps"] for r in rows if "skipped" in r] == [1, 2]  # the third raised before logging


def test_nan_loss_skips_the_step_without_touching_parameters(monkeypatch, out_dir):
    cfg = quick(out_dir, run_name="nanloss")
    real = vigor.grpo_token_loss
    monkeypatch.setattr(vigor, "grpo_token_loss", lambda *a: (real(*a)[0] * float("nan"), *real(*a)[1:]))
    model, tok = vigor.load_model(vigor.tiny_base_model(cfg), cfg, torch.device("cpu"), torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(vigor.BadStepError, match="NaN"):
        vigor.rl_step(cfg, model, model, tok, opt, sched, ["3+4=", "1-1="], None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_nan_in_a_later_iteration_keeps_the_earlier_iterations_update(monkeypatch):
    """num_iterations 2, NaN in the second: the step is skipped, saying which iteration; the weights are those
    after the first iteration's update (the same as a run of one iteration), the scheduler stepped once."""
    done, real = [], vigor.grpo_token_loss
    for iterations in (1, 2):
        model, rollouts = tiny_model(False), one_group()
        cfg = vigor.make_config({"num_generations": 4, "prompts_per_step": 1, "num_iterations": iterations})
        calls = []

        def nan_in_iteration_2(*a):
            calls.append(1)
            loss, *rest = real(*a)
            return (loss * float("nan") if len(calls) == 2 else loss, *rest)
        monkeypatch.setattr(vigor, "grpo_token_loss", nan_in_iteration_2)
        monkeypatch.setattr(vigor, "sample_groups", lambda *a, **k: rollouts)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        try:
            vigor.rl_step(cfg, model, tiny_model(False).requires_grad_(False), None, opt, sched, ["p"], None)
        except vigor.BadStepError as e:
            assert iterations == 2 and "NaN/inf in iteration 2 of 2" in str(e)
        else:
            assert iterations == 1
        done.append(([p.detach().clone() for p in model.parameters()], sched.last_epoch))
    (one, stepped_one), (two, stepped_two) = done
    assert stepped_one == stepped_two == 1 and all(torch.allclose(a, b, atol=1e-7) for a, b in zip(one, two))
    assert not all(torch.equal(a, b) for a, b in zip(one, tiny_model(False).parameters()))  # it did update


def test_long_prompts_are_skipped_and_counted(tmp_path, out_dir, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in ["1+2=", "9" * 40 + "=", "4-1="]))
    cfg = quick(out_dir, run_name="long", steps=1, max_prompt_length=10,
                train_data={"path": str(data), "answer_column": ""})
    vigor.train(cfg)
    assert "2 training prompts (1 skipped" in capsys.readouterr().out
    with pytest.raises(vigor.DataError, match="longer than max_prompt_length"):
        vigor.train(quick(out_dir, run_name="long2", max_prompt_length=2, train_data={"path": str(data)}))


def test_cli_reports_errors_without_traceback(out_dir):
    proc = subprocess.run(cli(out_dir, run_name="bad", top_p=2), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: top_p must be in (0, 1]")


def test_rewards_to_compare_and_eval_samples(out_dir):
    for reward, over in [("self_certainty", {}), ("gt", {}), ("vigor", {"reward_params": "lm_head", "rank": False})]:
        out = vigor.train(quick(out_dir, run_name=f"r-{reward}", reward=reward, steps=2, eval_samples=2, **over))
        after = out["after"]
        assert 0 <= after["eval/test/mean@2"] <= after["eval/test/pass@2"] <= 1
        rows = read_jsonl(os.path.join(out_dir, f"r-{reward}", "completions.jsonl"))
        if reward == "gt":
            assert all(r["score"] == float(r["correct"]) for r in rows)
        if reward == "vigor":  # w/o rank: rewards are the scores themselves (unless identical texts share)
            assert any(r["reward"] == r["score"] for r in rows) and all(r["reward"] < 0 for r in rows)
    with pytest.raises(vigor.DataError, match="needs answers"):
        vigor.train(quick(out_dir, run_name="gt-none", reward="gt", train_data={"path": "synthetic", "answer_column": ""}))


def test_length_bias_is_measured_within_groups(tmp_path):
    """||g|| = c / sqrt(T) inside every group, but long completions belong to hard prompts (large c): pooled
    over prompts, raw ||g|| would *grow* with T; within groups the slope must be exactly -0.5."""
    (tmp_path / "config.json").write_text(json.dumps({"num_generations": 4}))
    groups = [(100.0, [10, 20, 30, 40]), (1.0, [2, 3, 4, 6]), (10.0, [2, 3, 30, 40]), (5.0, [5, 5, 5, 5])]
    rows = [{"step": 1, "length": T, "grad_norm": c / math.sqrt(T)} for c, lengths in groups for T in lengths]
    (tmp_path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    slope, table = vigor.length_bias(str(tmp_path), bins=2)
    assert slope == pytest.approx(-0.5) and sum(r[1] for r in table) == 12  # the equal-length group tells nothing
    assert all(r[3] == pytest.approx(1.0) for r in table) and table[0][2] > 1 > table[1][2]


def test_analyses_and_study_as_a_grid_of_learning_rates(out_dir, capsys, monkeypatch):
    """A two-point lr grid: one row per (reward, lr), the ablations at the regime's own lr only, the claims
    judged at each lr. Run again, every finished run is reused (train is never called: same tables); a run
    stopped after its last checkpoint but before its final evaluation is resumed, alone."""
    sets = [{"path": "synthetic", "split": "test", "limit": 16}, {"path": "synthetic", "split": "validation", "limit": 8}]
    rows = "vigor,vigor_no_rank,self_certainty,gt,random"
    args = ["study", "--seeds", "7", "--out_dir", out_dir, "--steps", "3", "--num_generations", "4",
            "--prompts_per_step", "4", "--max_completion_length", "12", "--rows", rows, "--eval_samples", "2",
            "--eval_every", "1", "--eval_data", json.dumps(sets), "--lr", "1e-4", "--lrs", "1e-4,5e-5"]
    vigor.main(args)
    printed = capsys.readouterr().out
    table = open(os.path.join(out_dir, "study.md")).read()
    for regime in ("base", "sft"):
        part = table.split(f"{regime}: the starting model")[1].split("sft: the starting model")[0]
        cells = part.split("every cell")[1].split("\n\n")[0]
        for name in rows.split(","):
            for lr in ("1e-04 (chosen)", "5e-05"):
                expected = 0 if (name, lr) == ("vigor_no_rank", "5e-05") else 1  # ablations: the chosen lr only
                assert cells.count(f"| {name} | {lr} |") == expected, (regime, name, lr)
        claims = part.split("the paper's claims at each lr")[1]
        for lr in ("1e-04 (chosen)", "5e-05"):
            for claim in ("vigor gains over the starting model", "vigor gains more than random at the same lr",
                          "vigor gains more than self_certainty at the same lr",
                          "vigor's rank 1 is more often correct than its rank G"):
                assert re.search(rf"\| {re.escape(claim)}[^|]* \| {re.escape(lr)} \| [^|]+ \| (yes|NO|mixed) \|", claims), (claim, lr)
        assert "| vigor gains more than vigor_no_rank at the same lr | 1e-04 (chosen) |" in claims
        assert part.count("| 5e-05 | ") >= 3
        run = os.path.join(out_dir, f"study-{regime}-gt-lr5e-05-s7")
        saved = json.load(open(os.path.join(run, "config.json")))
        assert saved["task"] == regime and saved["lr"] == 5e-5
        log = read_jsonl(os.path.join(run, "metrics.jsonl"))
        assert [m["step"] for m in log if "eval/validation/accuracy" in m] == [0, 1, 2, 3]  # every eval_every
    for text in ("the starting model before RL", "pass@2", "rank 1 / G, step 1", "KL, last 20% of steps", "every cell on test"):
        assert text in table and text in printed, text
    run = os.path.join(out_dir, "study-base-vigor-lr1e-04-s7")
    slope, bias = vigor.length_bias(run)
    assert len(bias) == 4 and 0 < sum(r[1] for r in bias) <= 3 * 4 * 4 and math.isfinite(slope)
    ranks = vigor.rank_correctness(run)
    assert set(ranks) == {"step 1", "early", "late"} and len(ranks["early"]) == 4
    with pytest.raises(vigor.DataError, match="logged no grad_norm"):
        vigor.length_bias(os.path.join(out_dir, "study-base-gt-lr1e-04-s7"))
    with pytest.raises(vigor.ConfigError, match="rows come from"):
        vigor.study(["--rows", "vigor,oracle"])
    with pytest.raises(vigor.ConfigError, match="--lrs takes comma-separated floats"):
        vigor.study(["--lrs", "1e-4,fast"])
    trained, real = [], vigor.train
    monkeypatch.setattr(vigor, "train", lambda cfg: trained.append(cfg.run_name) or real(cfg))
    vigor.main(args)
    assert trained == [] and open(os.path.join(out_dir, "study.md")).read() == table
    stopped = os.path.join(out_dir, "study-sft-random-lr5e-05-s7", "metrics.jsonl")
    lines = open(stopped).readlines()
    with open(stopped, "w") as f:
        f.writelines(lines[:-1])  # the final evaluation's line: the run stopped after its last checkpoint
    vigor.main(args)
    assert trained == ["study-sft-random-lr5e-05-s7"] and json.loads(open(stopped).readlines()[-1])["final"]


def test_each_regime_reads_its_own_settings_before_the_studys_flags():
    sft_lr = yaml.safe_load(open(os.path.join(HERE, "tiny_configs", "sft.yaml"))).get("lr", vigor.Config().lr)
    assert vigor.regime_config("base", []).lr == vigor.Config().lr
    assert vigor.regime_config("sft", []).lr == float(sft_lr) and vigor.regime_config("sft", []).task == "sft"
    assert vigor.regime_config("sft", ["--lr", "3e-5", "--seeds", "7"]).lr == 3e-5  # the study's flags win


def test_claims_verdict_is_strict():
    assert [vigor.holds(v) for v in ([0.1, 0.2], [0.1, 0.0], [-0.1, 0.0], [0.0, 0.0])] == ["yes", "mixed", "NO", "NO"]


def test_ci_reruns_every_test_that_skips_without_an_optional_package():
    import inspect
    needs = [name for name, fn in globals().items() if name.startswith("test_") and
             name != "test_ci_reruns_every_test_that_skips_without_an_optional_package" and
             "pytest.importorskip(" in inspect.getsource(fn)]
    assert len(needs) == 3 and all(any(w in name for w in OPTIONAL_TESTS.split(" or ")) for name in needs), needs
    assert 'OPTIONAL_TESTS = "' in open(__file__).read() and "OPTIONAL_TESTS" in open(os.path.join(HERE, ".ci", "run")).read()


def test_correct_by_rank_uses_trainings_ranks_and_ties():
    """Each group puts one completion at each rank; ties go by position, the earlier one ranking lower."""
    scores = torch.tensor([0.1, 0.9, 0.5, 0.5,    # group 1
                           2.0, 1.0, 3.0, 0.0])   # group 2
    correct = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0])
    # group 1 best to worst: 0.9 (0), 0.5 second (0), 0.5 first (1), 0.1 (1); group 2: 3.0 (0), 2.0 (1), 1.0 (1), 0.0 (0)
    assert vigor.correct_by_rank(scores, correct, 4).tolist() == [[0, 0, 1, 1], [0, 1, 1, 0]]
    assert vigor.correct_by_rank(scores, correct, 4).mean(0).tolist() == [0.0, 0.5, 1.0, 0.5]


def test_rank_gap_and_its_bootstrap_interval_by_hand():
    """Every group's rank 1 correct and rank G wrong: a gap of 1 with a zero-width interval. Otherwise the
    interval is seeded (the same seed gives the same interval) and holds the gap."""
    perfect = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 6)
    assert vigor.rank_gap(perfect, 500, seed=7) == (1.0, 1.0, 1.0)
    mixed = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    gap, low, high = vigor.rank_gap(mixed, 2000, seed=7)  # gaps 1, -1, 0, 1, 0, 1: mean 1/3
    assert gap == pytest.approx(1 / 3) and -1 <= low < gap < high <= 1
    assert vigor.rank_gap(mixed, 2000, seed=7) == (gap, low, high)


def test_within_group_correlation_removes_each_groups_means():
    lengths = torch.tensor([1.0, 2, 3, 4, 101, 102, 103, 104])  # group 2 is 100 longer: between-group, removed
    assert vigor.within_group_correlation(-lengths + torch.tensor([0.0] * 4 + [500.0] * 4), lengths, 4) == pytest.approx(-1)
    assert vigor.within_group_correlation(torch.tensor([1.0, -1, -1, 1] * 2), lengths, 4) == pytest.approx(0)
    assert math.isnan(vigor.within_group_correlation(torch.ones(8), lengths, 4))


def signal_args(out_dir, **over):
    size = {"num_generations": 4, "max_completion_length": 12, "prompts": 4, "eval_samples": 0,
            "out_dir": out_dir, **over}
    return [a for k, v in size.items() for a in (f"--{k}", str(v))]


def test_signal_scores_are_compute_rewards_on_rollouts_sampled_once(monkeypatch, out_dir):
    """Every score is compute_rewards' score on the one set of rollouts (sampled once); recomputed here on the
    same rollouts and weights, the deterministic scores match exactly; random is the run's seeded draw."""
    samples, real = [], vigor.sample_groups
    monkeypatch.setattr(vigor, "sample_groups", lambda *a, **k: samples.append(real(*a, **k)) or samples[-1])
    report = vigor.signal(signal_args(out_dir, run_name="once"))
    assert len(samples) == 1
    run = os.path.join(out_dir, "signal-once")
    rows = read_jsonl(os.path.join(run, "completions.jsonl"))
    assert len(rows) == 16 and json.load(open(os.path.join(run, "signal.json")))["scores"].keys() == report["scores"].keys()
    cfg = vigor.make_config(json.load(open(os.path.join(run, "config.json"))))
    model, _ = vigor.load_model(vigor.tiny_base_model(cfg), cfg, torch.device("cpu"), torch.float32)
    for name, over in vigor.SIGNAL_SCORES.items():
        if name != "random":
            want = vigor.compute_rewards(dataclasses.replace(cfg, **over), model, samples[0])["score"]
            assert [r[name] for r in rows] == pytest.approx(want.tolist(), rel=1e-6), name
    assert [r["completion"] for r in rows] == samples[0].completions
    again = vigor.signal(signal_args(out_dir, run_name="once"))  # same settings: the same numbers
    assert again["scores"] == report["scores"]
    with pytest.raises(vigor.ConfigError, match="scores come from"):
        vigor.signal(signal_args(out_dir, scores="vigor,oracle"))
    with pytest.raises(vigor.DataError, match="set train_data.answer_column"):
        vigor.signal(signal_args(out_dir, train_data="{path: synthetic, answer_column: ''}"))


def test_real_signal_panel_applies_its_rule_and_pools_groups(tmp_path):
    """.ci/real_signal_panel's table from finished runs (STOP=table runs no panel task): the screen's range, its
    one widening, chain_sum kept whatever its screen, prompts by the power rule, the order by mixed groups,
    unfinished tasks listed, underpowered ones marked, and the pooled rank 1 - rank G over every task's groups
    (each group's best and worst scored completion found here by argmax/argmin: no ties in these scores); the
    record alone gives the same table once the run folders are gone."""
    pytest.importorskip("reasoning_gym")
    screens = {"basic_arithmetic": (0.0, 0), "chain_sum": (0.01, 1), "count_bits": (0.3, 8), "gcd": (0.5, 5),
               "decimal_arithmetic": (0.0, 0), "decimal_chain_sum": (0.03, 2), "gsm_symbolic": (0.0, 0),
               "lcm": (0.7, 4), "leg_counting": (0.1, 3), "number_format": (0.9, 2), "products": (0.05, 3)}
    gen, names, gaps = torch.Generator().manual_seed(0), list(vigor.SIGNAL_SCORES), {n: [] for n in vigor.SIGNAL_SCORES}

    def fake_run(name, report, rows=()):
        os.makedirs(tmp_path / "runs" / f"signal-{name}")
        for file, text in (("signal.json", json.dumps(report)), ("cost.json", '{"wall_s": 90, "peak_rss_gb": 2.5}'),
                           ("completions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))):
            (tmp_path / "runs" / f"signal-{name}" / file).write_text(text)
    for task, (accuracy, mixed) in screens.items():
        fake_run(f"screen-{task}", {"prompts": 16, "G": 8, "accuracy": accuracy, "mixed_groups": mixed, "scores": {}})
    for task, groups, intervals in (("count_bits", 40, [0.05, 0.3]), ("gcd", 12, [-0.4, -0.1])):
        correct, scores = torch.rand(groups, 8, generator=gen) < 0.4, {n: torch.rand(groups, 8, generator=gen) for n in names}
        for n in names:
            gaps[n] += [float(c[s.argmax()]) - float(c[s.argmin()]) for c, s in zip(correct, scores[n])]
        rows = [{"correct": float(correct[g, i]), **{n: scores[n][g, i].item() for n in names}}
                for g in range(groups) for i in range(8)]
        fake_run(f"panel-{task}", {"prompts": groups, "G": 8, "accuracy": 0.4, "mixed_groups": groups, "scores": {
            n: {"rank_1_minus_rank_G": 0.1, "interval_95": intervals} for n in names}}, rows)
    env = {**os.environ, "STOP": "table", "RECORD": str(tmp_path / "record.json"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    subprocess.run(["bash", os.path.join(HERE, ".ci", "real_signal_panel"), str(tmp_path)], env=env, check=True)
    table = (tmp_path / "panel.md").read_text()
    assert "11 of 18 arithmetic tasks have plain-number answers; range 2%-80% keeps 7" in table  # 4 < 6: widened
    assert "screened out: basic_arithmetic 0.0%, decimal_arithmetic 0.0%, gsm_symbolic 0.0%, number_format 90.0%" in table
    tasks = [line.split(" | ")[0][2:] for line in table.splitlines()[4:11]]
    assert tasks == ["count_bits", "gcd", "lcm", "leg_counting", "products", "decimal_chain_sum", "chain_sum"]
    assert "| lcm | 70.0% / 4 | 128 | not run |" in table and "| gcd | 50.0% / 5 | 12 | 40.0% | 12 (underpowered) |" in table
    assert "| count_bits | 30.0% / 8 | 40 | 40.0% | 40 | +10.0 [+5.0, +30.0]" in table and "1.5 min, 2.5 GB |" in table
    assert "| chain_sum | 1.0% / 1 | 128 | not run |" in table and "| products | 5.0% / 3 | 128 | not run |" in table
    for n in names:
        row = next(line for line in table.splitlines() if line.startswith(f"| {n} | 1 above zero, 1 below, 0 include it"))
        low, high = map(float, re.search(r"\[([-+\d.]+), ([-+\d.]+)\]", row).groups())
        assert f"{100 * sum(gaps[n]) / 52:+.1f} [" in row and low < 100 * sum(gaps[n]) / 52 < high, row
    assert sorted(os.listdir(tmp_path / "runs")) == sorted([f"signal-screen-{t}" for t in screens] +
                                                           ["signal-panel-count_bits", "signal-panel-gcd"])
    record = json.loads((tmp_path / "record.json").read_text())  # the runs' numbers, kept: the same table
    assert record["panel-gcd"]["scores"]["vigor"]["per_group"] == gaps["vigor"][40:] and len(record) == 13
    shutil.rmtree(tmp_path / "runs")
    subprocess.run(["bash", os.path.join(HERE, ".ci", "real_signal_panel"), str(tmp_path)], env=env, check=True)
    assert (tmp_path / "panel.md").read_text() == table


def tiny_shipped():
    return vigor.load_model(vigor.tiny_base_model(vigor.Config()), vigor.Config(), torch.device("cpu"), torch.float32)[0]


def test_signal_agrees_with_the_rank_table_of_trainings_first_step(out_dir):
    """Same seed and settings: signal's rollouts are those of training's step 1 (no update has happened), so
    its VIGOR table is the rank table of step 1."""
    cfg = quick(out_dir, run_name="first-step", steps=1, eval_samples=0)
    vigor.train(cfg)
    step_1 = vigor.rank_correctness(os.path.join(out_dir, "first-step"))["step 1"]
    report = vigor.signal(signal_args(out_dir, run_name="first-step"))  # its prompts: step 1's (4 of them)
    assert report["scores"]["vigor"]["accuracy_by_rank"] == pytest.approx(step_1)
    logged = [r["completion"] for r in read_jsonl(os.path.join(out_dir, "first-step", "completions.jsonl"))]
    assert logged == [r["completion"] for r in read_jsonl(os.path.join(out_dir, "signal-first-step", "completions.jsonl"))]


def first_step(cfg, rollouts, monkeypatch, answers=None):
    """(the model before, its metrics and columns) of one rl_step of a fresh tiny model on fixed rollouts, with
    SGD (the update is the clipped gradient x lr) and a reference that is a copy of the policy."""
    monkeypatch.setattr(vigor, "sample_groups", lambda *a, **k: rollouts)
    model = tiny_model(False)
    before, opt = copy.deepcopy(model), torch.optim.SGD(model.parameters(), lr=0.01)
    metrics, columns = vigor.rl_step(cfg, model, copy.deepcopy(model).requires_grad_(False), None, opt,
                                     torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                                     list("abcd")[:len(rollouts.input_ids) // cfg.num_generations], answers)
    moved = torch.cat([(p - q).detach().flatten() for p, q in zip(model.parameters(), before.parameters())])
    return before, metrics, columns, moved


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_in_the_update_so_step_0_kl_is_0_and_the_ratio_1(tmp_path, monkeypatch, capsys, disable):
    """A checkpoint with attention_dropout 0.1 (a float the attention function reads in train mode) and
    resid/embd dropout (nn.Dropout modules): by default (disable_dropout) the update's first iteration sees the
    model that sampled, the old log-probs (num_iterations 2) and the reference: ratio and k3 exactly 1 and 0.
    disable_dropout false keeps dropout, and then they differ."""
    from transformers import Phi3Config, Phi3ForCausalLM
    tok = vigor.char_tokenizer()
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       attention_dropout=0.1, resid_pdrop=0.1, embd_pdrop=0.1, pad_token_id=0,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    seen, loss = [], vigor.grpo_token_loss
    monkeypatch.setattr(vigor, "grpo_token_loss", lambda logps, old, ref, *a: seen.append((logps.detach(), old, ref))
                        or loss(logps, old, ref, *a))
    cfg = quick(str(tmp_path / "runs"), model=str(tmp_path / "m"), reward="random", steps=1, num_iterations=2,
                eval_samples=0, disable_dropout=disable, micro_batch_size=64)
    vigor.train(cfg)
    logps, old, ref = seen[0]  # the first iteration's micro-batch: the policy has not moved yet
    kl = read_jsonl(os.path.join(str(tmp_path / "runs"), "vigor", "metrics.jsonl"))[1]["kl"]
    said = "disable_dropout: 18 dropout rates of the policy and the reference set to 0" in capsys.readouterr().out
    if disable:
        assert torch.equal(logps, old) and torch.equal(logps, ref) and kl == 0 and said
    else:
        assert not torch.equal(logps, old) and kl > 0 and not said


def test_eval_sets_are_named_by_their_split_or_file():
    assert vigor.eval_set_name({"path": "synthetic", "split": "validation"}) == "validation"
    assert vigor.eval_set_name({"path": "synthetic"}) == "train"  # the split load_rows reads by default
    assert vigor.eval_set_name({"path": "/data/gsm8k/test.jsonl", "split": "test"}) == "test.jsonl"


def test_base_documents_end_in_eos_only_at_their_end():
    tok, rows = vigor.char_tokenizer(), vigor.synthetic_split("warmstart")
    gold = {r["prompt"]: r for r in rows}
    rng, lines_per_doc, wrong, total = random.Random(0), [], 0, 0
    cfg = vigor.Config(wrong_share=0.4, prompt_weight=0.25)
    for length in [64] * 20 + [4000]:  # long rows: documents are rarely cut, their lengths can be counted
        ids, weights = vigor.warmstart_sequence(cfg, rows, rng, tok, length)
        assert len(ids) == len(weights) == length  # packed rows, no padding
        docs = tok.decode(ids).split("<eos>")
        for doc in docs[:-1]:  # the last one is cut at the row's end
            lines = doc.split("\n")
            lines_per_doc.append(len(lines))
            for line in lines:
                prompt, solution = line.split("=")[0] + "=", line.split("=")[1]
                assert re.fullmatch(r"-?\d+(,-?\d+)*", solution) and prompt in gold, line
                right = gold[prompt]["answer"]
                wrong += solution.split(",")[-1] != right
                assert abs(int(solution.split(",")[-1]) - int(right)) <= 1
                total += 1
        in_prompt = True  # rows start with a document; the problems' text (up to '=') weighs 0.25, the rest 1
        for t, w in zip(ids, weights):
            assert w == (0.25 if in_prompt else 1.0)
            char = tok.convert_ids_to_tokens(t)
            in_prompt = char in ("\n", "<eos>") or (in_prompt and char != "=")
    assert 2.5 < sum(lines_per_doc) / len(lines_per_doc) < 3.5 and max(lines_per_doc) > 5  # geometric, mean 3
    assert 0.3 < wrong / total < 0.5
    ids, weights = vigor.warmstart_sequence(vigor.Config(task="sft"), rows, rng, tok, 64)  # one example, EOS last
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id and "\n" not in tok.decode(ids)
    assert weights[:tok.decode(ids).index("=") + 1] == [0.0] * (tok.decode(ids).index("=") + 1) and weights[-1] == 1.0


def test_the_answer_only_share():
    """direct_share: the share of solutions that are the answer alone (`9`), not the running totals (`12,9`)."""
    tok, rows = vigor.char_tokenizer(), vigor.synthetic_split("warmstart")
    for direct in (0.0, 0.5):
        ids, _ = vigor.warmstart_sequence(vigor.Config(direct_share=direct), rows, random.Random(1), tok, 20000)
        alone = []
        for line in tok.decode(ids).replace("<eos>", "\n").split("\n")[1:-1]:  # whole lines only
            prompt, solution = line.split("=")
            if len(re.findall("[+-]", prompt)) > 1:  # 3 numbers or more: the two formats differ
                alone.append("," not in solution)
        assert not any(alone) if direct == 0 else 0.4 < sum(alone) / len(alone) < 0.6


def test_model_tiny_is_the_shipped_warm_start_and_a_changed_recipe_is_refused(tmp_path):
    """model tiny loads tiny_configs/tiny-<task>/ as shipped (no training); its recipe.json's key is the recipe's
    (settings, data, architecture, code); another recipe setting, or other code of the recipe, is refused with
    the command that builds it; a docstring or a comment is not the recipe."""
    from safetensors.torch import load_file
    for task in ("base", "sft"):
        folder = vigor.tiny_base_model(vigor.Config(task=task))
        assert folder == os.path.join(HERE, "tiny_configs", f"tiny-{task}")
        recipe = json.load(open(os.path.join(folder, "recipe.json")))
        weights = open(os.path.join(folder, "model.safetensors"), "rb").read()
        assert recipe["model.safetensors sha256"] == __import__("hashlib").sha256(weights).hexdigest()
        tokenizer = json.load(open(os.path.join(folder, "tokenizer_config.json")))  # a class transformers 4.x has too
        assert tokenizer["tokenizer_class"] == "PreTrainedTokenizerFast"
        model, _ = vigor.load_model(folder, vigor.Config(), torch.device("cpu"), torch.float32)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in load_file(os.path.join(folder, "model.safetensors")).items())
    for over in ({"doc_problems": 2.0}, {"wrong_share": 0.1}, {"prompt_weight": 0.5}, {"direct_share": 0.25},
                 {"warmstart_steps": 30}, {"warmstart_lr": 1e-3}):
        with pytest.raises(vigor.ConfigError, match=f"differs in: {list(over)[0]}.*python vigor.py warmstart OUT"):
            vigor.tiny_base_model(vigor.Config(**over))
    source = open(vigor.__file__).read()
    commented = source.replace('    """One sequence of the warm start', '    # a comment\n    """A sequence of the warm start', 1)
    changed = source.replace("ids[-1] = tok.eos_token_id  # the document", "ids[-1] = tok.pad_token_id  # the document", 1)
    assert commented != source and changed != source
    for name, text in (("commented", commented), ("changed", changed)):  # a copy of vigor.py beside the shipped folders
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tiny_configs").symlink_to(os.path.join(HERE, "tiny_configs"))
        (folder / "vigor.py").write_text(text)
        spec = importlib.util.spec_from_file_location(f"vigor_{name}", folder / "vigor.py")
        copy_of_vigor = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copy_of_vigor)
        if name == "changed":
            with pytest.raises(copy_of_vigor.ConfigError, match="differs in: the code of warmstart_sequence"):
                copy_of_vigor.tiny_base_model(copy_of_vigor.Config())
        else:
            assert copy_of_vigor.tiny_base_model(copy_of_vigor.Config()) == str(folder / "tiny_configs" / "tiny-base")


def test_warmstart_command_builds_a_reduced_warm_start_that_trains(tmp_path, capsys):
    """python vigor.py warmstart OUT (a few steps here): the same weights twice, a recipe.json whose key
    is its settings', and a model that `--model OUT` trains on; an existing OUT is refused."""
    from safetensors.torch import load_file
    for out in ("a", "b"):
        vigor.main(["warmstart", str(tmp_path / out), "--warmstart_steps", "3"])
    a, b = (load_file(str(tmp_path / out / "model.safetensors")) for out in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    recipe = json.load(open(tmp_path / "a" / "recipe.json"))
    assert recipe["key"] == vigor.warmstart_recipe(vigor.Config(warmstart_steps=3))[1] != vigor.warmstart_recipe(vigor.Config())[1]
    assert recipe["settings"]["warmstart_steps"] == 3 and f"recipe key {recipe['key']}" in capsys.readouterr().out
    assert json.load(open(tmp_path / "a" / "tokenizer_config.json"))["tokenizer_class"] == "PreTrainedTokenizerFast"
    with pytest.raises(SystemExit):
        vigor.main(["warmstart", str(tmp_path / "a")])
    assert "OUT (got" in capsys.readouterr().err
    summary = vigor.train(quick(str(tmp_path / "runs"), model=str(tmp_path / "a"), steps=1, eval_samples=0))
    assert summary["after"]["eval/test/accuracy"] >= 0


def test_random_control_rewards_are_seeded_and_reproducible(out_dir):
    cfg = quick(out_dir, reward="random")
    rollouts, model, draws = one_group(), tiny_model(True), []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        draws.append(vigor.compute_rewards(cfg, model, rollouts)["score"])
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert ((0 <= draws[0]) & (draws[0] < 1)).all() and draws[0].std() > 0
    for name in ("rand_a", "rand_b"):
        vigor.train(quick(out_dir, run_name=name, reward="random", steps=2))
    a, b = (read_jsonl(os.path.join(out_dir, n, "completions.jsonl")) for n in ("rand_a", "rand_b"))
    assert [r["reward"] for r in a] == [r["reward"] for r in b] and len({r["score"] for r in a}) == len(a)


def test_lora_run_with_checkpointing_resumes_exactly(monkeypatch, out_dir):
    over = dict(lora_r=4, gradient_checkpointing=True, grad_norm_method="per_layer", steps=4, save_every=2)
    vigor.train(quick(out_dir, run_name="lora", **over))
    run = os.path.join(out_dir, "lora")
    assert os.path.isfile(os.path.join(run, "final", "adapter_model.safetensors"))
    whole = [m for m in read_jsonl(os.path.join(run, "metrics.jsonl"))]
    steps = [m for m in whole if "kl" in m]
    assert len(steps) == 4 and steps[0]["kl"] == 0.0 and steps[-1]["kl"] > 0  # reference = adapter off
    real, calls = vigor.rl_step, []

    def interrupted(*a, **k):  # stop the run during step 3, after the step-2 checkpoint
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(vigor, "rl_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vigor.train(quick(out_dir, run_name="lora-cut", **over))
    monkeypatch.setattr(vigor, "rl_step", real)
    vigor.train(quick(out_dir, run_name="lora-cut", **over))
    assert without_timing(read_jsonl(os.path.join(out_dir, "lora-cut", "metrics.jsonl"))) == without_timing(whole)


@pytest.mark.parametrize("method", ["vmap", "per_layer"])
def test_bf16_autocast_run_keeps_float32_master_weights(monkeypatch, out_dir, method):
    """The CUDA default path (bf16 compute, fp32 weights) exercised on the CPU: the dtypes of the policy that
    trains, at every step, and of the weights it saves; the reference is the starting policy, computed alike,
    so the first step's KL is exactly 0 (a bf16 reference gave 0.004 per token)."""
    cfg = quick(out_dir, run_name=f"bf16-{method}", dtype="bfloat16", grad_norm_method=method, steps=2)
    seen, real_step = [], vigor.rl_step

    def recording(cfg_, policy, ref, *a, **k):
        seen.append(({p.dtype for p in policy.parameters()}, {p.dtype for p in ref.parameters()}))
        return real_step(cfg_, policy, ref, *a, **k)
    monkeypatch.setattr(vigor, "rl_step", recording)
    out = vigor.train(cfg)
    assert len(seen) == 2
    for policy_dtypes, ref_dtypes in seen:
        assert policy_dtypes == ref_dtypes == {torch.float32}
    from safetensors.torch import load_file
    final = load_file(os.path.join(out_dir, f"bf16-{method}", "final", "model.safetensors"))
    start = load_file(os.path.join(vigor.tiny_base_model(cfg), "model.safetensors"))
    assert {t.dtype for t in final.values()} == {torch.float32} and any(not torch.equal(final[k], start[k]) for k in final)
    steps = [m for m in read_jsonl(os.path.join(out_dir, f"bf16-{method}", "metrics.jsonl")) if "kl" in m]
    assert len(steps) == 2 and all(math.isfinite(m["vigor/grad_norm_raw"]) for m in steps)
    assert steps[0]["kl"] == 0 and steps[1]["kl"] > 0
    assert 0 <= out["after"]["eval/test/accuracy"] <= 1
    model, ids, mask = tiny_model(True), *padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # both methods agree under autocast too
        assert torch.allclose(vigor.per_layer_grad_norms(model, ids, mask), vigor.grad_norms(model, ids, mask), rtol=3e-2)


def load_bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench", os.path.join(HERE, ".ci", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_reward_table_agrees_with_the_authors_loop(capsys):
    bench = load_bench()
    bench.bench(["--parts", "reward", "--reps", "1"])
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in capsys.readouterr().out.splitlines() if "|" in r}
    for name in ("torch.func vmap, chunk_size 8", "per-layer, one backward (per_layer)"):
        assert float(rows[name][-1].strip(" |")) < 1e-5, rows[name]  # float32 on CPU: equal up to rounding
    methods = {name: row for name, row in rows.items() if name != "method" and not name.startswith("---")}
    with pytest.raises(vigor.ConfigError, match=r"--shapes: unknown \['7b'\]; valid: tiny, 0.5b, 1.5b"):
        bench.bench(["--shapes", "tiny,7b"])
    with pytest.raises(vigor.ConfigError, match=r"--parts: unknown \['rewards'\]; valid: reward, untied"):
        bench.bench(["--parts", "rewards"])
    proc = subprocess.run([sys.executable, os.path.join(HERE, ".ci", "bench.py"), "--shapes", "7b"], capture_output=True,
                          text=True, timeout=300)  # the script, as the README runs it: one error line
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: --shapes: unknown"), proc.stderr[-2000:]
    floor_ms = float(methods["floor: one batched forward+backward"][1])

    assert floor_ms > 0 and len(methods) == 6
    for name, row in methods.items():  # each "x floor" is that method's time over the floor's, as printed
        assert float(row[2]) == pytest.approx(float(row[1]) / floor_ms, rel=0.01, abs=0.006), name


CONFIG_FILES_SET = {  # what each small config file is for, checked against what it sets
    "no_sqrt_t.yaml": {"sqrt_t": False, "rank": True, "reward": "vigor"},
    "no_rank.yaml": {"rank": False, "sqrt_t": True, "reward": "vigor"},
    "lm_head_only.yaml": {"reward_params": "lm_head", "reward": "vigor"},
    "self_certainty.yaml": {"reward": "self_certainty"},
    "gt.yaml": {"reward": "gt"},
    "quick.yaml": {"steps": 10, "run_name": "quick"},
    "sft.yaml": {"task": "sft", "lr": 2e-5}}  # the calibrated step size of the fine-tuned regime


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(HERE, "tiny_configs")) if f.endswith(".yaml")))
def test_every_config_file_loads(name):
    cfg = vigor.load_config(["--config", os.path.join(HERE, "tiny_configs", name)])
    for key, value in CONFIG_FILES_SET.get(name, {}).items():
        assert getattr(cfg, key) == value, (name, key)

    if name.startswith("qwen"):
        assert cfg.lr == 2e-6 and cfg.beta == 0.01 and cfg.num_generations == 8 and "\\boxed{}" in cfg.system_prompt
        assert [d["path"] for d in cfg.eval_data] == ["HuggingFaceH4/MATH-500", "openai/gsm8k"]
    if name.startswith(("qwen", "smollm")):  # the answer format the system prompt asks for is the one graded
        assert vigor.answer_format(cfg.system_prompt, cfg.answer_format) == ("gsm8k" if "smollm" in name else "boxed")


TORCH_API_SINCE = {  # what vigor.py uses -> the first torch release that has it
    "torch.OutOfMemoryError": (2, 5), "fully_shard": (2, 6), "set_reshard_after_forward": (2, 7)}


def test_requirements_and_readme_state_the_oldest_torch_with_every_api_used():
    source = open(os.path.join(HERE, "vigor.py")).read()
    need = max(since for api, since in TORCH_API_SINCE.items() if api in source)
    floor = re.search(r"^torch>=(\d+)\.(\d+)", open(os.path.join(HERE, "requirements.txt")).read(), re.M)
    assert floor and (int(floor[1]), int(floor[2])) == need, f"requirements.txt must say torch>={need[0]}.{need[1]}"
    assert f"torch >= {need[0]}.{need[1]}" in open(os.path.join(HERE, "README.md")).read()
    assert tuple(int(x) for x in torch.__version__.split(".")[:2]) >= need


def test_chat_template_and_system_prompt_are_used():
    tok = vigor.char_tokenizer()
    assert vigor.format_prompt(tok, "1+2=", "Think.") == "Think.\n1+2="
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert vigor.format_prompt(tok, "1+2=", "Think.") == "<system>Think.<user>1+2=<assistant>"
    assert vigor.format_prompt(tok, "1+2=") == "<user>1+2=<assistant>"


# ---------------------------------------------------------------------------------------------------
# several processes: torchrun, gloo on the CPU (DDP and FSDP2)
# ---------------------------------------------------------------------------------------------------
def torchrun(args, nproc=2):
    """A command that runs `args` (a `cli` list: python, script, flags...) under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args[1:]]


def fixed_rollouts(prompts, G=4):
    """Rollouts that depend on the prompt alone: prompt "k" gets G completions of 2 + 4k + j tokens, so the ranks
    hold very different token counts (a per-rank loss normalisation would show)."""
    prompt_ids, completions = [], []
    for k in map(int, prompts):
        for j in range(G):
            T, g = 2 + 4 * k + j, torch.Generator().manual_seed(100 * k + j)
            prompt_ids.append([5, 6, 7 + k])
            completions.append(torch.randint(3, 37, (T,), generator=g).tolist())
    n = len(completions)
    return vigor.Rollouts.from_ids(prompt_ids, completions, [False] * n, ["c"] * n, [i // G for i in range(n)], 0)


def one_step_worker(parallelism, out):
    """`python test_vigor.py one-step ddp|fsdp OUT`, under torchrun or alone: one rl_step of each loss type on
    fixed rollouts of 4 prompts (this rank's share), SGD with lr 1 so the parameter change is the clipped
    gradient itself (AdamW's first step is lr * sign(g), which would hide a wrong gradient scale)."""
    vigor.sample_groups = lambda model, tok, prompts, *a, **k: fixed_rollouts(prompts)
    results = {}
    # bnpo normalises per micro-batch: with 4 rows per micro-batch, 1 and 2 processes hold the same micro-batches
    for loss_type, micro in (("dapo", 3), ("grpo", 3), ("bnpo", 4)):
        cfg = vigor.make_config({"parallelism": parallelism, "grad_norm_method": "per_layer", "prompts_per_step": 4,
                                 "num_generations": 4, "micro_batch_size": micro, "beta": 0.1, "max_grad_norm": 0.05,
                                 "loss_type": loss_type, "device": "cpu"})
        _, dtype = vigor.setup_device(cfg)
        rank, world = vigor.rank_and_world()
        policy, ref = tiny_model(True), tiny_model(True).requires_grad_(False)
        trainer = vigor.parallelize(cfg, policy, ref, dtype)
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        share = 4 // world
        m, _ = vigor.rl_step(cfg, policy, ref, None, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                             [str(k) for k in range(4)][rank * share:(rank + 1) * share], None, trainer)
        if parallelism == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            params = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
        else:
            params = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        results[loss_type] = (params, m)
    if rank == 0:
        torch.save(results, out)


def test_n_processes_make_the_update_of_one_process(tmp_path):
    run = lambda cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    got = {}
    for name, cmd in [("one", [sys.executable]), ("ddp", torchrun([sys.executable])), ("fsdp", torchrun([sys.executable]))]:
        proc = run([*cmd, os.path.join(HERE, "test_vigor.py"), "one-step", "ddp" if name == "one" else name,
                    str(tmp_path / name)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[name] = torch.load(tmp_path / name, weights_only=True)
    before = tiny_model(True).state_dict()
    for loss_type in ("dapo", "grpo", "bnpo"):
        want, m1 = got["one"][loss_type]
        moved = max((want[k] - before[k]).abs().max().item() for k in want)
        assert moved > 1e-3, "the step must move the parameters well beyond the tolerance"
        for name in ("ddp", "fsdp"):
            params, m = got[name][loss_type]
            assert max((params[k] - want[k]).abs().max().item() for k in want) < 1e-5, (name, loss_type)
            for key in ("loss", "kl", "grad_norm", "reward_std", "vigor/grad_norm_raw", "completions/mean_length"):
                assert m[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), (name, loss_type, key)


def test_torchrun_ddp_run_shares_prompts_and_evaluates_like_one_process(out_dir):
    over = dict(eval_batch_size=4, eval_samples=0)  # 16 eval prompts: 4 batches, 2 per rank
    one = vigor.train(quick(out_dir, run_name="one-eval", steps=0, **over))
    proc = subprocess.run(torchrun(cli(out_dir, run_name="ddp2", **over)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("VIGOR run done") == 1 and "x 2 processes (ddp)" in proc.stdout  # rank 0 alone prints
    run = os.path.join(out_dir, "ddp2")
    metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
    assert metrics[0] == {"step": 0, **one["before"]}  # greedy, same model, same batches: exactly equal
    comp = read_jsonl(os.path.join(run, "completions.jsonl"))
    cfg = quick(out_dir)
    prompts = vigor.load_prompts(cfg.train_data)[0]
    for step in range(1, 7):  # every step logs prompts_per_step * G completions: the global batch, both ranks
        rows = [c for c in comp if c["step"] == step]
        assert len(rows) == 4 * 4
        want = [prompts[i] for i in vigor.prompt_batch(len(prompts), step - 1, 4, cfg.seed)]
        assert [r["prompt"] for r in rows[::4]] == want
    assert [m["step"] for m in metrics if "kl" in m] == [1, 2, 3, 4, 5, 6]
    assert os.path.isfile(os.path.join(run, "final", "model.safetensors"))


def test_fsdp_run_resumes_after_sigkill_and_refuses_another_world_size(out_dir):
    over = dict(parallelism="fsdp", grad_norm_method="per_layer", steps=8, save_every=2, eval_samples=2)
    full = subprocess.run(torchrun(cli(out_dir, run_name="fsdp-whole", **over)), capture_output=True, text=True,
                          timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    killed_at = killed_after_a_checkpoint(torchrun(cli(out_dir, run_name="fsdp-killed", **over)),
                                          os.path.join(out_dir, "fsdp-killed"))
    assert killed_at is not None and not killed_at.endswith("checkpoint-8"), "the kill came too late to test resume"
    assert os.path.isdir(os.path.join(killed_at, "sharded"))  # DCP shards, no full model in the checkpoint
    again = subprocess.run(torchrun(cli(out_dir, run_name="fsdp-killed", **over)), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout
    for name in ("metrics.jsonl", "completions.jsonl"):
        want, got = (read_jsonl(os.path.join(out_dir, r, name)) for r in ("fsdp-whole", "fsdp-killed"))
        assert without_timing(got) == without_timing(want), name
    from transformers import AutoModelForCausalLM  # final/ is a from_pretrained folder, the same model both ways
    a, b = (AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, r, "final")) for r in ("fsdp-whole", "fsdp-killed"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    one = subprocess.run(torchrun(cli(out_dir, run_name="fsdp-whole", **over), nproc=1), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode != 0 and "written by 2 process(es), this run has 1" in one.stderr


@pytest.mark.parametrize("over, message", [
    ({"device": "cuda"}, "CUDA is not available"),
    ({"prompts_per_step": 3}, "must be a multiple of the 2 processes"),
    ({"parallelism": "fsdp", "lora_r": 4}, "with LoRA use ddp"),
    ({"parallelism": "fsdp"}, "needs grad_norm_method per_layer")])
def test_torchrun_bad_input_stops_every_rank_with_one_message(out_dir, over, message):
    t = time.time()
    proc = subprocess.run(torchrun(cli(out_dir, run_name="bad", **over)), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.count("error: ") == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert time.time() - t < 100 and not os.path.exists(os.path.join(out_dir, "bad"))


def test_torchrun_bad_input_is_said_when_rank_0_gets_there_last(out_dir, tmp_path):
    """torchrun ends every process once one exits with an error: a rank that fails first must not end rank 0
    before rank 0 has said why (here rank 0 starts 3 s late)."""
    late = tmp_path / "late_rank_0.py"
    late.write_text(f"import os, sys, time\nif os.environ['RANK'] == '0':\n    time.sleep(3)\n"
                    f"sys.path.insert(0, {HERE!r})\nimport vigor\nvigor.main()\n")
    args = cli(out_dir, run_name="bad", prompts_per_step=3)
    proc = subprocess.run(torchrun([args[0], str(late), *args[2:]]), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.count("error: ") == 1, proc.stderr[-2000:]
    assert "must be a multiple of the 2 processes" in proc.stderr


def test_fsdp_needs_torchrun(out_dir):
    with pytest.raises(vigor.ConfigError, match="torchrun --nproc_per_node N"):
        vigor.train(quick(out_dir, run_name="fsdp-alone", parallelism="fsdp", grad_norm_method="per_layer"))


# ---------------------------------------------------------------------------------------------------
# the reward inside TRL's GRPOTrainer (pip install trl; .ci/run installs it)
# ---------------------------------------------------------------------------------------------------
def trl_call(cfg, rollouts, tok):
    """What TRL hands a reward function for these rollouts: text prompts, texts, completion ids with the EOS."""
    prompts, completion_ids = [], []
    for row, mask in zip(rollouts.input_ids, rollouts.loss_mask):
        n = int(mask.nonzero().min())
        prompts.append(tok.decode(row[:n]))
        completion_ids.append(row[n:n + int(mask.sum())].tolist())
    return prompts, rollouts.completions, completion_ids


@pytest.mark.parametrize("over", [{}, {"sqrt_t": False}, {"rank": False}, {"reward_params": "lm_head"},
                                  {"grad_norm_method": "vmap"}, {"reward": "self_certainty"}])
def test_trl_adapter_rewards_equal_compute_rewards(out_dir, over):
    cfg = quick(out_dir, num_generations=4, **over)
    policy, tok = vigor.load_model(vigor.tiny_base_model(cfg), cfg, torch.device("cpu"), torch.float32)
    prompts = [r["prompt"] for r in vigor.synthetic_split("train")[:3]]
    torch.manual_seed(0)
    rollouts = vigor.sample_groups(policy, tok, prompts, 4, 12, temperature=1.0)
    want = vigor.compute_rewards(cfg, policy, rollouts)["reward"]
    reward = vigor.TRLReward(policy, tok, 4, **over)
    policy.train()
    got = reward(*trl_call(cfg, rollouts, tok), trainer_state=None)
    assert isinstance(got, list) and all(type(r) is float for r in got) and len(got) == 12
    assert torch.allclose(torch.tensor(got), want, rtol=1e-5, atol=1e-6), (got, want)
    assert policy.training and all(p.grad is None and p.requires_grad for p in policy.parameters())


def test_trl_adapter_refuses_what_it_cannot_do_correctly(out_dir):
    cfg = quick(out_dir)
    policy, tok = vigor.load_model(vigor.tiny_base_model(cfg), cfg, torch.device("cpu"), torch.float32)
    reward = vigor.TRLReward(policy, tok, 4)
    with pytest.raises(vigor.ConfigError, match="got 6 completions, not a multiple of G = 4"):
        reward(["1+2="] * 6, ["3"] * 6, [[5, 1]] * 6)
    with pytest.raises(vigor.ConfigError, match="num_generations .G. must be >= 2"):
        vigor.TRLReward(policy, tok, 1)
    with pytest.raises(vigor.ConfigError, match="num_generations .G. must be >= 2"):
        vigor.TRLReward(policy, tok, types.SimpleNamespace(num_generations=4, num_generations_eval=1))
    with pytest.raises(vigor.ConfigError, match="intrinsic rewards"):
        vigor.TRLReward(policy, tok, 4, reward="gt")
    with pytest.raises(vigor.DataError, match="a prompt has no tokens"):  # a standard dataset's "" and no BOS
        reward([""] * 4, [""] * 4, [[tok.eos_token_id]] * 4)
    conversation, tool_turn = [{"role": "user", "content": "1+2="}], {"role": "tool", "content": "3"}
    with pytest.raises(vigor.ConfigError, match="tools"):  # a completion that holds a tool's result
        reward([conversation] * 4, [[{"role": "assistant", "content": "call"}, tool_turn]] * 4, [[5, 1]] * 4)

    class Trainer:  # TRL hands reward functions bound methods of its trainer, whose tools render the prompt
        tools = [len]

        def log_metric(self, *args):
            pass
    with pytest.raises(vigor.ConfigError, match="tools"):
        reward(["1+2="] * 4, ["3"] * 4, [[5, 1]] * 4, log_metric=Trainer().log_metric)
    next(policy.parameters()).ds_id = 0  # what DeepSpeed ZeRO-3 puts on the weights it shards, after the adapter
    with pytest.raises(vigor.ConfigError, match="ZeRO-3"):
        reward(["1+2="] * 4, ["3"] * 4, [[5, 1]] * 4)


def test_trl_adapter_refuses_weights_that_fsdp_sharded_after_it_was_made(tmp_path):
    """FSDP2 shards the weights in place once the trainer is prepared: the adapter, made before, refuses them
    when it is called (one process, gloo)."""
    code = """
import torch, torch.distributed as dist, vigor, test_vigor
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo", rank=0, world_size=1)
model, tok = test_vigor.tiny_model(False, vocab=len(vigor.char_tokenizer())), vigor.char_tokenizer()
reward = vigor.TRLReward(model, tok, 4)
fully_shard(model)
try:
    reward(["1+2="] * 4, ["3"] * 4, [[5, 1]] * 4)
except vigor.ConfigError as e:
    print("refused:", e)
dist.destroy_process_group()
"""
    env = {**os.environ, "PYTHONPATH": HERE, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29700 + os.getpid() % 200)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert "refused: TRLReward needs each process to hold the whole weights, and FSDP shards them" in proc.stdout, \
        proc.stderr[-3000:]


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_trl_adapter_refuses_fsdp1_wrapping_the_root_alone(use_orig_params):
    """accelerate's FSDP1 may wrap only the root: the adapter holds the inner module, whose weights FSDP1 then
    marks as flattened (torch's own marker, use_orig_params) or takes away into its flat parameter (without).
    FSDP1 needs a GPU, so a stand-in does to the inner module what FSDP1 does."""
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened
    model, tok = tiny_model(False, vocab=len(vigor.char_tokenizer())), vigor.char_tokenizer()
    reward = vigor.TRLReward(model, tok, 4)
    assert len(reward(["1+2="] * 4, ["3"] * 4, [[5, 1]] * 4)) == 4
    for module in model.modules():
        for name, p in [(n, p) for n, p in module._parameters.items() if p is not None]:
            if use_orig_params:
                _set_fsdp_flattened(p)
            else:  # the module keeps a plain tensor where its parameter was
                del module._parameters[name]
                setattr(module, name, p.detach())
    with pytest.raises(vigor.ConfigError, match="hold the whole weights, and FSDP shards them"):
        reward(["1+2="] * 4, ["3"] * 4, [[5, 1]] * 4)


def test_trl_adapter_groups_evaluation_by_trls_eval_group_size(out_dir):
    """TRL groups evaluation completions by num_generations_eval, and tells evaluation by model.training."""
    cfg = quick(out_dir)
    policy, tok = vigor.load_model(vigor.tiny_base_model(cfg), cfg, torch.device("cpu"), torch.float32)
    prompts = [r["prompt"] for r in vigor.synthetic_split("train")[:3]]
    torch.manual_seed(0)
    rollouts = vigor.sample_groups(policy, tok, prompts, 2, 12, temperature=1.0)  # 3 groups of 2
    reward = vigor.TRLReward(policy, tok, types.SimpleNamespace(num_generations=4, num_generations_eval=2))
    policy.eval()
    got = reward(*trl_call(cfg, rollouts, tok))
    assert got == vigor.compute_rewards(quick(out_dir, num_generations=2), policy, rollouts)["reward"].tolist()
    assert not policy.training
    policy.train()
    with pytest.raises(vigor.ConfigError, match="got 6 completions, not a multiple of G = 4"):
        reward(*trl_call(cfg, rollouts, tok))


def test_trl_adapter_renders_prompts_with_trls_chat_template_kwargs(monkeypatch):
    """TRL renders conversational prompts with GRPOConfig's chat_template_kwargs (Qwen3's enable_thinking):
    the adapter scores that prompt, not the template's default one."""
    tok = chat_tokenizer()
    tok.chat_template += "{% if add_generation_prompt and enable_thinking is false %}<think></think>{% endif %}"
    model = tiny_model(False, vocab=len(tok))
    conversations = [[{"role": "user", "content": q}] for q in ("1+2=", "4-3+2=") for _ in range(4)]
    g = torch.Generator().manual_seed(0)
    completion_ids = [torch.randint(3, 90, (n,), generator=g).tolist() + [tok.eos_token_id] for n in range(1, 9)]
    cfg = vigor.make_config({"num_generations": 4, "grad_norm_method": "per_layer"})  # the adapter's defaults

    def scores_on(**kwargs):  # compute_rewards on the prompt ids rendered as TRL renders them
        ids = tok.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      **kwargs)["input_ids"]
        ro = vigor.Rollouts.from_ids(ids, completion_ids, [False] * 8, ["c"] * 8, list(range(8)), 0)
        return vigor.compute_rewards(cfg, model, ro)["score"].tolist()
    want, default = scores_on(enable_thinking=False), scores_on()
    seen, real = [], vigor.compute_rewards
    monkeypatch.setattr(vigor, "compute_rewards", lambda *a: seen.append(real(*a)["score"].tolist()) or real(*a))
    args = types.SimpleNamespace(num_generations=4, chat_template_kwargs={"enable_thinking": False})
    vigor.TRLReward(model, tok, args)(conversations, ["c"] * 8, completion_ids)
    assert seen == [want] and want != default


@pytest.mark.parametrize("checkpointing, method", [(True, "per_layer"), (True, "vmap"), (False, "per_layer")])
def test_stock_trl_grpo_trainer_trains_with_the_adapter(out_dir, tmp_path, checkpointing, method):
    pytest.importorskip("trl")
    import datasets
    from trl import GRPOConfig, GRPOTrainer
    cfg = quick(out_dir)
    policy, tok = vigor.load_model(vigor.tiny_base_model(cfg), cfg, torch.device("cpu"), torch.float32)
    before = [p.detach().clone() for p in policy.parameters()]
    evaluates = not checkpointing  # one variant also evaluates, with TRL's own eval group size
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, max_steps=2,
                      max_completion_length=12, learning_rate=1e-3, beta=0.01, loss_type="bnpo", temperature=0.9,
                      top_k=50, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
                      gradient_checkpointing=checkpointing, num_generations_eval=2, per_device_eval_batch_size=4,
                      eval_strategy="steps" if evaluates else "no", eval_steps=2)
    calls, reward = [], vigor.TRLReward(policy, tok, args, grad_norm_method=method)

    def recording(prompts, completions, completion_ids, **columns):
        calls.append((policy.training, completion_ids, reward(prompts, completions, completion_ids, **columns)))
        return calls[-1][2]
    recording.__name__ = "vigor"
    data = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in vigor.synthetic_split("train")[:8]])
    trainer = GRPOTrainer(model=policy, reward_funcs=[recording], args=args, train_dataset=data, processing_class=tok,
                          eval_dataset=data.select(range(2)) if evaluates else None)
    assert trainer.model is policy  # the adapter scores with the very model the trainer updates
    trainer.train()
    assert [training for training, _, _ in calls] == [True, True] + [False] * evaluates
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    distinct_groups = 0
    for training, completion_ids, rewards in calls:
        G = 4 if training else 2
        assert len(rewards) == 8 if training else 4
        assert all(c[-1] == tok.eos_token_id or len(c) == 12 for c in completion_ids)
        for g in range(0, len(rewards), G):  # a group's rewards: the rank values, identical ones share their mean
            ids, r = completion_ids[g:g + G], rewards[g:g + G]
            assert sum(r) == pytest.approx(0, abs=1e-6)
            assert all(r[i] == r[j] for i in range(G) for j in range(G) if ids[i] == ids[j])
            if len({tuple(c) for c in ids}) == G:
                distinct_groups += 1
                assert sorted(r) == pytest.approx(torch.linspace(-1, 1, G).tolist())
    assert distinct_groups > 0


def test_readme_trl_example_runs_as_written(tmp_path):
    """The README's "VIGOR in TRL" example, with only size settings changed (2 steps of 2 prompts, a short warm
    start), in a fresh folder."""
    pytest.importorskip("trl")
    code = re.search(r"## VIGOR in TRL.*?```python\n(.*?)```", open(os.path.join(HERE, "README.md")).read(), re.S)[1]
    sizes = {"max_steps=100": "max_steps=2", "16 * G": "2 * G"}
    for shown, small in sizes.items():
        assert code.count(shown) == 1, shown
        code = code.replace(shown, small)
    (tmp_path / "example.py").write_text(code + "\nprint('trained', trainer.state.global_step)\n")
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": HERE})
    assert proc.returncode == 0 and "trained 2" in proc.stdout, proc.stderr[-3000:]

# ---------------------------------------------------------------------------------------------------
# every command the README shows, run here (size settings appended) or named with what runs it
# ---------------------------------------------------------------------------------------------------
SIZE = ("--steps 2 --prompts_per_step 4 --num_generations 4 --max_completion_length 12 "
        "--eval_samples 2 --eval_data '[{path: synthetic, split: test, limit: 16}, "
        "{path: synthetic, split: validation, limit: 8}]'")  # size settings only
OFFLINE = "(needs network)"  # what a hub model or data set stops with on a machine with no hub
README_RUNS = [  # (README command(s), the command run here, folder, what its output must hold); in order per folder
    ("python vigor.py", f"python vigor.py {SIZE}", "main", "regime base: "),
    ("python vigor.py --config tiny_configs/gt.yaml", f"python vigor.py --config tiny_configs/gt.yaml {SIZE}", "main",
     "mean score (correctness)"),
    ("python vigor.py --help", "python vigor.py --help", "main", "--num_generations int"),
    ("python vigor.py --config tiny_configs/no_sqrt_t.yaml", f"python vigor.py --config tiny_configs/no_sqrt_t.yaml {SIZE}",
     "main", "VIGOR run done"),
    ("python vigor.py length-bias runs/vigor runs/vigor_no_sqrt_t",
     "python vigor.py length-bias runs/vigor runs/vigor_no_sqrt_t", "main", "length bias within groups"),
    ("python vigor.py --config tiny_configs/sft.yaml", f"python vigor.py --config tiny_configs/sft.yaml {SIZE}", "main",
     "regime sft: "),
    ("python vigor.py --config tiny_configs/random.yaml", f"python vigor.py --config tiny_configs/random.yaml {SIZE}",
     "main", "mean score (uniform noise)"),
    ("python vigor.py signal", f"python vigor.py signal --prompts 4 {SIZE}", "signal", "rank 1 - rank G [95%]"),
    ("python vigor.py signal --config tiny_configs/sft.yaml", f"python vigor.py signal --config tiny_configs/sft.yaml "
     f"--prompts 4 {SIZE}", "signal", "rank 1 - rank G [95%]"),
    ("python vigor.py study --seeds 7 --regimes base --rows gt,self_certainty,random --lrs 2e-4",
     f"python vigor.py study --seeds 7 --regimes base --rows gt,self_certainty,random --lrs 2e-4 {SIZE}", "study",
     "base: every cell on test"),
    ("python vigor.py study", f"python vigor.py study --seeds 7 {SIZE} --lrs 1e-5",
     "study", "sft: the paper's claims at each lr"),
    ("python vigor.py study --rows gt,random --eval_data '[{path: synthetic, split: validation}]' --out_dir runs-calibration",
     f"python vigor.py study --rows gt,random --eval_data '[{{path: synthetic, split: validation}}]' --out_dir runs-calibration "
     f"{SIZE} --eval_data '[{{path: synthetic, split: validation, limit: 16}}]' --seeds 7 --lrs 1e-5", "study",
     "every cell on validation"),
    ("python vigor.py study --seeds 7 --regimes base --rows vigor,self_certainty --lrs 2e-4",
     f"python vigor.py study --seeds 7 --regimes base --rows vigor,self_certainty --lrs 2e-4 {SIZE}", "study",
     "base: every cell on test"),
    ("python vigor.py length-bias runs/study-base-vigor-lr2e-04-s7", "python vigor.py length-bias runs/study-base-vigor-lr2e-04-s7",
     "study", "slope of log ||g||"),
    ("python vigor.py rank-table runs/study-base-vigor-lr2e-04-s7 runs/study-base-self_certainty-lr2e-04-s7",
     "python vigor.py rank-table runs/study-base-vigor-lr2e-04-s7 runs/study-base-self_certainty-lr2e-04-s7", "study",
     "rank vs correctness"),
    ("python vigor.py --config tiny_configs/quick.yaml", f"python vigor.py --config tiny_configs/quick.yaml {SIZE}",
     "classroom", "VIGOR run done"),
    ("python vigor.py handout DIR", "python vigor.py handout DIR", "classroom", "wrote the student copy to DIR"),
    (("python vigor.py check N", "python vigor.py check 2"), "python vigor.py check 2", "classroom",
     "exercise 2 (norms by torch.func: grad_norms): pass"),
    ("python vigor.py check", "python vigor.py check", "classroom", "exercise 8 (ghost norms (stretch): linear_grad_sq_norms): pass"),
    ("python vigor.py check --json", "python vigor.py check --json", "classroom", '"passed": 8,'),
    ("python vigor.py check runs", "python vigor.py check runs", "classroom",
     "missing or unfinished: run `python vigor.py --config tiny_configs/gt.yaml`"),
    ("python vigor.py --config tiny_configs/no_sqrt_t.yaml --steps 100 --seed 8",
     f"python vigor.py --config tiny_configs/no_sqrt_t.yaml --steps 100 --seed 8 {SIZE}", "examples", "VIGOR run done"),
    ("python vigor.py --train_data '{path: my_prompts.jsonl, prompt_column: question}' --lr 2e-5",
     f"python vigor.py --train_data '{{path: my_prompts.jsonl, prompt_column: question}}' --lr 2e-5 {SIZE}",
     "examples", "3 training prompts"),
    ("python vigor.py --config tiny_configs/smollm2-135m_gsm8k.yaml",
     "python vigor.py --config tiny_configs/smollm2-135m_gsm8k.yaml", "hub", OFFLINE),
    ("python vigor.py --config tiny_configs/qwen2.5-3b_math.yaml",
     "python vigor.py --config tiny_configs/qwen2.5-3b_math.yaml", "hub", OFFLINE),
    ("torchrun --nproc_per_node 8 vigor.py --config tiny_configs/qwen2.5-7b_math_8gpu.yaml",
     "torchrun --nproc_per_node 2 vigor.py --config tiny_configs/qwen2.5-7b_math_8gpu.yaml", "hub", OFFLINE),
    ("python vigor.py warmstart runs/my-base", "python vigor.py warmstart runs/my-base --warmstart_steps 3", "warmstart",
     "recipe key"),
    ("python vigor.py warmstart runs/my-sft --task sft", "python vigor.py warmstart runs/my-sft --task sft --warmstart_steps 3",
     "warmstart", "recipe key"),
    ("torchrun --nproc_per_node 8 vigor.py --config X",
     f"torchrun --nproc_per_node 2 vigor.py --config tiny_configs/quick.yaml {SIZE}", "torchrun", "x 2 processes (ddp)"),
]
README_ELSEWHERE = {}  # README commands that another test, CI or a GPU script runs (at other sizes): {command: what}


def readme_commands():
    """Every `python vigor.py ...` and `torchrun ... vigor.py ...` of README.md: code-block lines (comments
    dropped) and inline code; descriptions with '...' in them are not commands."""
    text = open(os.path.join(HERE, "README.md")).read()
    lines = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    lines += [re.sub(r"\s+", " ", span) for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))]
    found = set()
    for line in lines:
        command = re.search(r"\b((?:python|torchrun)\b.*\bvigor\.py\b.*)", line.split("  #")[0].strip())
        if command and "..." not in command[1]:
            found.add(command[1].strip())
    return found


def test_every_readme_command_is_run_by_a_test():
    commands = readme_commands()
    assert len(commands) >= 20 and "python vigor.py" in commands
    runs = {c for readme, *_ in README_RUNS for c in ([readme] if isinstance(readme, str) else readme)}
    assert not commands - runs - set(README_ELSEWHERE), "README commands that nothing runs"
    assert not runs - commands, "README_RUNS names a command the README no longer shows"
    for where in README_ELSEWHERE.values():
        assert where in globals() or os.path.isfile(os.path.join(HERE, where)), where


def test_readme_commands_run_as_written(tmp_path):
    """Each README command in a folder like a user's (the repository's tiny_configs beside it), with only size
    settings appended; commands that need the hub stop with a clear message here. Folders run two at a time,
    each process on one thread (two 2-thread processes on 2 cores take 3x as long as one, not 2x)."""
    python, script = shlex.quote(sys.executable), shlex.quote(os.path.join(HERE, "vigor.py"))
    torchrun = f"{python} -m torch.distributed.run --standalone"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # no hub, as CI

    def run_folder(folder):
        """The folder's commands in README order; returns (README command, output) of each one that failed."""
        cwd = tmp_path / folder
        cwd.mkdir()
        (cwd / "tiny_configs").symlink_to(os.path.join(HERE, "tiny_configs"))
        (cwd / "my_prompts.jsonl").write_text("".join(json.dumps({"question": q}) + "\n"
                                                      for q in ("1+2=", "7-3+1=", "9-9=")))
        failed = []
        for readme, command, _, expect in [run for run in README_RUNS if run[2] == folder]:
            shell = re.sub(r"^python vigor\.py", f"{python} {script}", command)
            shell = re.sub(r"^torchrun (.*?)vigor\.py", rf"{torchrun} \1{script}", shell)
            proc = subprocess.run(shell, shell=True, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
            out = proc.stdout + proc.stderr
            ok = (proc.returncode != 0 and out.count("error: ") == 1 and OFFLINE in out if expect == OFFLINE
                  else proc.returncode == 0 and expect in out)
            if not ok:
                failed.append((readme, out[-3000:]))
        return failed

    folders = list(dict.fromkeys(run[2] for run in README_RUNS))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        failed = [f for result in pool.map(run_folder, folders) for f in result]
    assert not failed, failed


# ---------------------------------------------------------------------------------------------------
# the classroom kit: the handout, the grader per exercise, Part 2's runs, the one-group view
# ---------------------------------------------------------------------------------------------------
def test_every_exercise_is_checked_above_handout_end_by_tests_that_compute_no_answer():
    handed, rest = open(os.path.join(HERE, "test_vigor.py")).read().split(vigor.HANDOUT_END)
    for n in vigor.EXERCISES:
        assert re.search(rf"^def test_exercise_{n}_", handed, re.M) and f"def test_exercise_{n}_" not in rest, n
    # in its code (not its words): no log-softmax, no autograd or torch.func, no ranks, no std, no Gram matrix
    import io
    import tokenize
    code = {t.string for t in tokenize.generate_tokens(io.StringIO(handed).readline)  # "@" of a matmul, not a decorator
            if t.type == tokenize.NAME or t.string == "@" and not t.line.lstrip().startswith("@")}
    assert not code & {"logsumexp", "log_softmax", "softmax", "autograd", "func", "vmap", "argsort", "sort", "std",
                       "var", "@", "matmul", "outer", "norm", "loop_norms_float64"}


def test_handout_blanks_each_exercise_keeps_its_docstring_and_refuses_an_existing_folder(tmp_path):
    import ast
    out = tmp_path / "handout"
    vigor.handout([str(out)])
    assert sorted(os.listdir(out)) == [".ci", "ANSWERS.md", "LICENSE", "README.md", "requirements.txt",
                                       "test_vigor.py", "tiny_configs", "vigor.py"]
    for task in ("base", "sft"):  # the shipped starting models travel with it, byte for byte: the expected values'
        shipped = os.path.join(HERE, "tiny_configs", f"tiny-{task}")
        for name in os.listdir(shipped):
            assert (out / "tiny_configs" / f"tiny-{task}" / name).read_bytes() == open(os.path.join(shipped, name), "rb").read()
    tests = open(os.path.join(HERE, "test_vigor.py")).read()
    assert (out / "test_vigor.py").read_text() == tests[:tests.index(vigor.HANDOUT_END)]

    def functions(path):  # module-level functions and methods (a blanked function's nested ones are gone)
        tree = ast.parse(open(path).read())
        nodes = tree.body + [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
        return {n.name: n for n in nodes if isinstance(n, ast.FunctionDef)}
    reference, student = functions(os.path.join(HERE, "vigor.py")), functions(out / "vigor.py")
    blanked = {name: n for n, (names, _) in vigor.EXERCISES.items() for name in names}
    assert reference.keys() == student.keys() and set(blanked) <= set(reference)
    source = (out / "vigor.py").read_text().splitlines()
    for name, node in student.items():
        if name in blanked:  # the docstring, then only the NotImplementedError that names the exercise
            assert ast.get_docstring(node) == ast.get_docstring(reference[name]) and len(node.body) == 2
            assert isinstance(node.body[1], ast.Raise) and f"exercise {blanked[name]}: write {name}" in ast.unparse(node)
            assert not [line for line in source[node.lineno - 1:node.end_lineno] if line.strip().startswith("#")], name
        else:
            assert ast.dump(node) == ast.dump(reference[name]), name
    readme, teacher = (out / "README.md").read_text(), open(os.path.join(HERE, "README.md")).read()
    assert "<details>" in teacher.split("## Exercises")[1].split("\n## ")[0], "the answers are for the teacher"
    assert not re.search(r"<details>|<!--|teacher|answer key", readme, re.I), "the README is the student's"
    for command in re.findall(r"`(python vigor\.py[^`]*)`", readme):  # every command it names is there
        words = shlex.split(command)
        assert words[2:3] == [] or words[2] in vigor.COMMANDS or words[2].startswith("--"), command
        assert all((out / w).exists() for w in words if w.startswith("tiny_configs/")), command
    assert all((out / script).is_file() for script in re.findall(r"bash (\S+)`", readme))
    answers = (out / "ANSWERS.md").read_text()
    assert all(f"\n### {n}. " in answers for n in [*vigor.PART2, 13, 15]), answers
    with pytest.raises(vigor.ConfigError, match="must not exist"):
        vigor.handout([str(out)])


def test_check_says_how_many_exercises_pass_with_each_failure_in_words_and_as_json(tmp_path):
    vigor.handout([str(tmp_path / "handout")])

    def check(cwd, *args):
        return subprocess.run([sys.executable, "vigor.py", "check", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=300)
    student, teacher = check(tmp_path / "handout", "--json"), check(HERE, "3")
    report = json.loads(student.stdout)
    assert student.returncode == 1 and (report["passed"], report["total"]) == (0, len(vigor.EXERCISES))
    for exercise in report["exercises"]:
        n, cases = exercise["number"], exercise["cases"]
        assert not exercise["passed"] and cases and exercise["functions"] == list(vigor.EXERCISES[n][0])
        assert all(c["test"].startswith(f"test_exercise_{n}_") and "NotImplementedError: exercise" in c["message"]
                   for c in cases), cases
    assert teacher.returncode == 0 and teacher.stdout.endswith("exercise 3 (the sqrt(T) score: vigor_scores): "
                                                               "pass\n1 of 1 exercises pass\n"), teacher.stdout
    (tmp_path / "handout" / "vigor.py").write_text(open(os.path.join(HERE, "vigor.py")).read().replace(
        "return -(lengths.float().sqrt() * norms if sqrt_t else norms)", "return -(lengths * norms)"))
    wrong = check(tmp_path / "handout", "3")
    assert wrong.returncode == 1 and "0 of 1 exercises pass" in wrong.stdout
    assert "S = -sqrt(T) * ||g||: T = 4, 9 and ||g|| = 2, 3 give -4, -9" in wrong.stdout and "expected" in wrong.stdout
    assert "Greatest absolute difference" in wrong.stdout  # with N, the whole report, however long
    with open(tmp_path / "handout" / "test_vigor.py", "a") as f:
        f.write("x = (\n")  # the checks themselves do not import: every exercise fails, saying why
    broken = json.loads(check(tmp_path / "handout", "--json").stdout)
    assert broken["passed"] == 0 and all("never closed" in e["cases"][0]["message"] for e in broken["exercises"])
    for args in (["9"], ["1", "2"], ["x"]):
        with pytest.raises(vigor.ConfigError, match="usage"):
            vigor.check(args)


def test_check_runs_says_where_each_part_2_run_lies(tmp_path, capsys):
    def run(name, start, end):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 0, "eval/test/accuracy": start}) + "\n")
            f.write(json.dumps({"step": 100, "final": True, "eval/test/accuracy": end}) + "\n")
    run("gt", 0.034, 0.034 + 0.30)  # +30.0: within 2 sd (4.9) of +32.1
    run("vigor", 0.034, 0.034 + 0.05)  # +5.0: far outside -0.1 ± 0.2
    run("random", 0.034, 0.034 + 0.014)  # +1.4: 0.9 from +0.5, within the 1-point floor
    os.makedirs(tmp_path / "sft")
    (tmp_path / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/test/accuracy": 0.4}) + "\n")
    verdicts = {row[1]: (row[2], row[4]) for row in vigor.check(["runs", "--out_dir", str(tmp_path)])}
    assert verdicts["gt"] == ("+30.0", "inside") and verdicts["random"] == ("+1.4", "inside")
    assert verdicts["vigor"][1].startswith("OUTSIDE")
    assert verdicts["sft"][1] == verdicts["vigor_no_sqrt_t"][1].replace("no_sqrt_t.yaml", "sft.yaml") == \
        "missing or unfinished: run `python vigor.py --config tiny_configs/sft.yaml`"
    part2 = open(os.path.join(HERE, "README.md")).read().split("**Part 2")[1].split("<details>")[0]
    for n, (_, command, mean, sd) in vigor.PART2.items():  # the README states the spread check runs uses
        gain = f"{mean:+.1f} ± {sd:.1f}".replace("-", "−")  # the README's minus sign
        assert re.search(rf"\n{n}\. .*?`{re.escape(command)}`.*?{re.escape(gain)}", part2, re.S), n


def test_every_run_summary_ends_with_one_group_of_its_last_logged_step(out_dir, capsys):
    run = vigor.train(quick(out_dir, run_name="one-group", steps=2))["run_dir"]
    table = capsys.readouterr().out.split("one group of step 2")[1]
    rows = [line.split(" | ") for line in table.splitlines() if re.match(r"\| \d", line)]
    last = [r for r in read_jsonl(os.path.join(run, "completions.jsonl")) if r["step"] == 2]
    groups = [last[i:i + 4] for i in range(0, len(last), 4)]
    shown = [g for g in groups if [int(r[0].strip("| ")) for r in rows] == [c["length"] for c in g]]
    assert len(rows) == 4 and shown, (rows, groups)
    for row, completion in zip(rows, shown[0]):
        assert float(row[1]) == pytest.approx(completion["grad_norm"], rel=1e-3)
        assert float(row[3]) == pytest.approx(completion["reward"], abs=1e-3) and row[5] in ("yes", "no")


if __name__ == "__main__" and sys.argv[1:2] == ["one-step"]:
    try:
        one_step_worker(*sys.argv[2:4])
    finally:  # gloo's threads outliving an undestroyed group can abort the exit (pytorch/pytorch#190489)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
