"""Train the embedded toy models on all four built-in tasks (word-level prompts, CPU).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_embedded.py toy-gpt2-2l
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_embedded.py toy-gpt2-4l
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_embedded.py toy-llama-4l
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_embedded.py toy-gemma2-4l --max-minutes 10

One model learns IOI, greater-than, induction and subject-verb agreement (``eap.tasks.TASKS``)
with the shared word-level tokenizer (:func:`eap.tasks.vocab.word_level_tokenizer`).

Recipe
------
* Data: clean prompts from each task's generator (``eap.tasks.<task>.generate``), the same code
  that builds the evaluation tasks. Held out of training, per task: IOI unordered name pairs;
  greater-than nouns and (century, start year) combinations; agreement (subject, attractor) noun pairs; induction uses
  fresh random sequences (other seeds). Each held-out set is split into a validation part (used
  only to decide when to stop) and a test part (used only for the card).
* Loss, per task, summed over the four tasks: next-token cross-entropy on every prompt position
  before the answer ("full LM loss"; none for induction, whose first half is random) plus
  cross-entropy at the answer against a SOFT target that bounds the metric away from
  saturation:
    IOI:          1 - d on IO, d on S                      -> optimum LD = log((1-d)/d)
    agreement:    (1 - d)/3 on each verb form that agrees, d/3 on each that does not
                                                            -> optimum LD = log((1-d)/d)
    greater-than: 1 - d_gt spread uniformly over years > YY, d_gt over years <= YY
                                                            -> optimum PD = 1 - 2 d_gt
    induction:    at every position of the repeat, label smoothing: 1 - d_ind on the next
                  token of the sequence, d_ind spread over the other V - 1 vocabulary tokens
                                                            -> optimum = log((1-d_ind)(V-1)/d_ind)
  The defaults (d = 0.05 for IOI, 0.03 for agreement, d_gt = 0.1, d_ind = 0.8, V = 375) give
  optima 2.94, 3.48, 0.8 and 4.5: near GPT-2 small's IOI logit difference (~3.5) and
  greater-than probability difference (0.82), far from the saturated regime a hard target
  drives the models to (LD 13+). A toy spreads part of the wrong-answer mass over the whole
  vocabulary instead of on the named wrong answer, so its IOI and agreement metrics land
  somewhat above these optima. (Induction's mass on the wrong tokens is spread over the whole
  vocabulary on purpose: spread over the sequence's own tokens instead, a 2-layer toy learns a
  competing copy-any-context-token mechanism that costs top-1 accuracy.)
* AdamW, linear warm-up, cosine decay to lr/10, no dropout, one torch thread, seeded. Stop
  at the first evaluation (every ``eval_every`` steps) at which every task's validation
  accuracy is >= ``stop_acc`` and its validation metric is inside the card range, but not
  before ``min_steps``; else at ``max_steps`` or the time limit.
* The card's numbers are measured afterwards through the TransformerLens bridge
  (``eap.load_model``) with the public task builders on the held-out test sets; ``card.json``
  holds the recipe and tests/test_embedded_models.py re-measures every number.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import eap  # noqa: E402
from eap.tasks import TASKS  # noqa: E402
from eap.tasks.greater_than import CENTURIES, CORRUPT_YEAR, NOUNS as GT_NOUNS, START_YEARS, generate as gt_generate, year_token_ids  # noqa: E402
from eap.tasks.induction import eligible_tokens, generate as ind_generate  # noqa: E402
from eap.tasks.ioi import NAMES, generate as ioi_generate  # noqa: E402
from eap.tasks.sva import NOUNS as SVA_NOUNS, VERBS, generate as sva_generate  # noqa: E402
from eap.tasks.vocab import word_level_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "eap" / "embedded"
TASK_NAMES = ("ioi", "greater-than", "induction", "sva")

#: Shapes, and the per-model defaults of --min-steps and --decay-steps (the 4-layer models learn
#: in fewer steps, and their steps cost 2-4x more).
CONFIGS: dict[str, dict[str, Any]] = {
    "toy-gpt2-2l": dict(arch="gpt2", n_layers=2, d_model=64, n_heads=4, d_mlp=256, min_steps=4000, decay_steps=5000),
    "toy-gpt2-4l": dict(arch="gpt2", n_layers=4, d_model=128, n_heads=8, d_mlp=512, min_steps=2500, decay_steps=3500),
    "toy-llama-4l": dict(
        arch="llama", n_layers=4, d_model=128, n_heads=8, n_kv_heads=2, d_mlp=384, min_steps=2000, decay_steps=3000,
    ),
    # post-norm family (Gemma-2's block: 1 + w RMSNorms before and after attention and MLP, GeGLU,
    # embedding scaling, attention and final softcaps 50 / 30, sliding window on every other layer)
    "toy-gemma2-4l": dict(
        arch="gemma2", n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_mlp=384, sliding_window=8,
        min_steps=2000, decay_steps=3000,
    ),
}
N_POSITIONS = 32

#: Card ranges of the mean clean metric (non-saturated) and the accuracy floor, per task.
CARD_RANGES: dict[str, tuple[float, float]] = {
    "ioi": (2.5, 6.0), "greater-than": (0.4, 0.9), "induction": (2.5, 6.0), "sva": (2.5, 6.0),
}
CARD_MIN_ACCURACY = 0.95
EVAL_N, EVAL_SEED, INDUCTION_LENGTH = 500, 12345, 10


# ----------------------------------------------------------------------------- held-out splits
def splits(seed: int) -> dict[str, dict[str, Any]]:
    """The held-out validation and test sets of every task (deterministic from ``seed``)."""
    rng = random.Random(seed)

    def both(ps):
        return [[a, b] for a, b in ps] + [[b, a] for a, b in ps]

    ioi_pairs = rng.sample(list(itertools.combinations(NAMES, 2)), 150)
    nouns = rng.sample(list(GT_NOUNS), 7)
    # (century, start year) combinations: every start year stays in training with other
    # centuries. (Whole start years held out do not work on these toys: an unseen year at a
    # decade boundary, e.g. 60 or 89, is not placed between its neighbours.)
    combos = [[c, y] for c in CENTURIES for y in START_YEARS]
    gt_held = rng.sample(combos, 105)
    if any(sum(y == yy for _, yy in gt_held) == len(CENTURIES) for y in START_YEARS):
        raise AssertionError("a start year is held out with every century")
    sva_singular = [sg for sg, _ in SVA_NOUNS]
    sva_pairs = [list(p) for p in rng.sample(list(itertools.permutations(sva_singular, 2)), 300)]
    return {
        "ioi": dict(val=dict(pairs=both(ioi_pairs[:50])), test=dict(pairs=both(ioi_pairs[50:]))),
        "greater-than": dict(
            val=dict(nouns=sorted(nouns[:3]), combinations=sorted(gt_held[:35])),
            test=dict(nouns=sorted(nouns[3:]), combinations=sorted(gt_held[35:])),
        ),
        "sva": dict(val=dict(pairs=sva_pairs[:100]), test=dict(pairs=sva_pairs[100:])),
        "induction": dict(val={}, test={}),  # fresh sequences: the eval seeds differ from training's
    }


# ---------------------------------------------------------------------------- training batches
class Batch:
    """Tokens of one task's prompts, the LM-loss mask, and soft answer targets.

    ``lm_mask[i, p]``: position p's next token is an LM target. ``ans_rows``/``ans_pos`` [m]
    index the answer positions, ``ans_target`` [m, vocab] their target distributions and
    ``ans_weight`` [m] their weights (each prompt's weights sum to 1)."""

    def __init__(self, tokens, lm_mask, ans_rows, ans_pos, ans_target, ans_weight):
        self.tokens, self.lm_mask = tokens, lm_mask
        self.ans_rows, self.ans_pos, self.ans_target, self.ans_weight = ans_rows, ans_pos, ans_target, ans_weight


def _before_end(tokens: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1])[None, :] < end[:, None]


class TaskData:
    """Training prompts of one task and how to turn a sample of them into a :class:`Batch`."""

    def __init__(self, name: str, tok, n: int, seed: int, split: dict, deltas: dict, ind_lengths):
        self.name, self.vocab = name, len(tok)
        self.deltas, self.ind_lengths, self.tok = deltas, ind_lengths, tok
        self.gen = torch.Generator().manual_seed(seed)
        held = split
        if name == "ioi":
            p = ioi_generate(tok, n, seed=seed, exclude_pairs=held["val"]["pairs"] + held["test"]["pairs"])
        elif name == "greater-than":
            nouns = [w for w in GT_NOUNS if w not in held["val"]["nouns"] + held["test"]["nouns"]]
            exclude = held["val"]["combinations"] + held["test"]["combinations"]
            p = gt_generate(tok, n, seed=seed, nouns=nouns, exclude_combinations=exclude)
            self.year_ids = torch.tensor(year_token_ids(tok))
            # also train on start year 01 (the corrupted prompts), as a share of one start year
            k = max(1, n // len(START_YEARS))
            p.clean = torch.cat([p.clean, p.corrupted[:k]])
            p.end = torch.cat([p.end, p.end[:k]])
            p.answers = {"yy": torch.cat([p.answers["yy"], torch.full((k,), CORRUPT_YEAR)])}
        elif name == "sva":
            p = sva_generate(tok, n, seed=seed, exclude_pairs=held["val"]["pairs"] + held["test"]["pairs"])
            sva_ids = [(tok.convert_tokens_to_ids(a), tok.convert_tokens_to_ids(b)) for a, b in VERBS]
            self.verbs = torch.tensor(sva_ids)  # [3, 2] (singular, plural)
        elif name == "induction":
            self.pool = eligible_tokens(tok)
            return
        else:
            raise ValueError(name)
        self.tokens, self.end, self.answers = p.clean, p.end, p.answers

    def sample(self, b: int) -> Batch:
        if self.name == "induction":
            return self._induction(b)
        idx = torch.randint(0, self.tokens.shape[0], (b,), generator=self.gen)
        tokens, end = self.tokens[idx], self.end[idx]
        seq = int(end.max()) + 1
        tokens = tokens[:, :seq]
        target = torch.zeros(b, self.vocab)
        rows = torch.arange(b)
        a = {k: v[idx] for k, v in self.answers.items()}
        if self.name == "ioi":
            d = self.deltas["ioi"]
            target[rows, a["io"]] += 1 - d
            target[rows, a["s"]] += d
        elif self.name == "sva":
            d = self.deltas["sva"]
            right = self.verbs[:, a["plural"]].T  # [b, 3] forms that agree
            wrong = self.verbs[:, 1 - a["plural"]].T
            target.scatter_add_(1, right, torch.full((b, 3), (1 - d) / 3))
            target.scatter_add_(1, wrong, torch.full((b, 3), d / 3))
        else:  # greater-than
            d = self.deltas["greater-than"]
            yy = a["yy"][:, None]
            years = torch.arange(100)[None, :]
            later = years > yy
            p = torch.where(later, (1 - d) / (99 - yy), d / (yy + 1)).float()
            target.scatter_add_(1, self.year_ids.expand(b, 100), p)
        return Batch(tokens, _before_end(tokens, end), rows, end, target, torch.ones(b))

    def _induction(self, b: int) -> Batch:
        lo, hi = self.ind_lengths
        length = int(torch.randint(lo, hi + 1, (1,), generator=self.gen))
        seed = int(torch.randint(0, 2**62, (1,), generator=self.gen))
        p = ind_generate(self.tok, b, seed=seed, length=length, tokens=self.pool)
        seq = p.clean[:, :length]  # t_1..t_L
        d = self.deltas["induction"]
        # positions L .. 2L-2 hold t_1..t_{L-1} of the repeat and predict t_2..t_L: label
        # smoothing, 1 - d on the next token and d spread over the rest of the vocabulary
        pos = torch.arange(length, 2 * length - 1)
        nxt = seq[:, 1:]  # [b, L-1] the targets
        m = b * (length - 1)
        target = torch.full((b, length - 1, self.vocab), d / (self.vocab - 1))
        target.scatter_(2, nxt[..., None], torch.full((b, length - 1, 1), 1 - d))
        rows = torch.arange(b)[:, None].expand(b, length - 1).reshape(m)
        return Batch(
            p.clean, torch.zeros_like(p.clean, dtype=torch.bool), rows, pos.repeat(b),
            target.reshape(m, self.vocab), torch.full((m,), 1.0 / (length - 1)),
        )


def batch_loss(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM cross-entropy over lm_mask, weighted soft-target cross-entropy at the answers)."""
    logits = model(batch.tokens).logits
    if batch.lm_mask.any():
        targets = torch.roll(batch.tokens, -1, dims=1)
        lm = F.cross_entropy(logits[batch.lm_mask], targets[batch.lm_mask])
    else:
        lm = logits.new_zeros(())
    logp = logits[batch.ans_rows, batch.ans_pos].log_softmax(-1)
    ce = -(batch.ans_target * logp).sum(-1)
    return lm, (ce * batch.ans_weight).sum() / batch.ans_weight.sum()


# ---------------------------------------------------------------------------------- evaluation
class HFModel(torch.nn.Module):
    """A transformers model with a ``.tokenizer``, returning logits (for the task builders)."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def forward(self, tokens):
        return self.model(tokens).logits


def eval_kwargs(held: dict, split: str) -> dict[str, dict[str, Any]]:
    """Builder kwargs (besides model, n) of each task on the held-out ``split`` ('val'/'test')."""
    s = {k: v[split] for k, v in held.items()}
    seed = EVAL_SEED if split == "test" else EVAL_SEED + 1
    return {
        "ioi": dict(seed=seed, pairs=s["ioi"]["pairs"]),
        "greater-than": dict(seed=seed, **s["greater-than"]),
        "induction": dict(seed=seed, length=INDUCTION_LENGTH),
        "sva": dict(seed=seed, pairs=s["sva"]["pairs"], templates=["pp", "rc"]),
    }


def eval_tasks(model, kwargs: dict[str, dict[str, Any]], n: int) -> dict[str, eap.Task]:
    """The four tasks built by ``eap.tasks.TASKS`` with :func:`eval_kwargs`."""
    return {name: TASKS[name](model, n, **kw) for name, kw in kwargs.items()}


def accuracy(name: str, task: eap.Task, logits: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """Per-prompt correctness: metric > 0, except induction: t_L is the top-1 token."""
    if name == "induction":
        final = logits[torch.arange(logits.shape[0]), task.per_prompt["end"]]
        return final.argmax(-1) == task.per_prompt["answer"]
    return metric > 0


@torch.no_grad()
def measure(model, tasks: dict[str, eap.Task]) -> dict[str, dict[str, float]]:
    out = {}
    for name, task in tasks.items():
        clean = model(task.clean)
        m = task.metric(clean)
        ok = accuracy(name, task, clean, m)
        m_corrupt = task.metric(model(task.corrupted))
        out[name] = dict(
            accuracy=ok.float().mean().item(), n_correct=int(ok.sum()), n=task.n_prompts,
            metric_clean=m.mean().item(), metric_corrupted=m_corrupt.mean().item(),
            frac_metric_positive=(m > 0).float().mean().item(),
        )
    return out


def meets_card(results: dict[str, dict[str, float]], acc: float = CARD_MIN_ACCURACY) -> bool:
    return all(
        r["accuracy"] >= acc and CARD_RANGES[t][0] <= r["metric_clean"] <= CARD_RANGES[t][1]
        for t, r in results.items()
    )


# ---------------------------------------------------------------------------------------- model
def build_model(cfg: dict[str, Any], tok):
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if cfg["arch"] == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=len(tok), n_positions=N_POSITIONS, n_layer=cfg["n_layers"], n_embd=cfg["d_model"],
            n_head=cfg["n_heads"], n_inner=cfg["d_mlp"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            **special,
        )
        return GPT2LMHeadModel(config)
    if cfg["arch"] == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        d_head = cfg["d_model"] // cfg["n_heads"]
        config = Gemma2Config(
            vocab_size=len(tok), hidden_size=cfg["d_model"], intermediate_size=cfg["d_mlp"],
            num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
            num_key_value_heads=cfg["n_kv_heads"], head_dim=d_head, query_pre_attn_scalar=d_head,
            max_position_embeddings=N_POSITIONS, sliding_window=cfg["sliding_window"],
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True, attention_dropout=0.0, attn_implementation="eager", **special,
        )
        return Gemma2ForCausalLM(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg["d_model"], intermediate_size=cfg["d_mlp"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_kv_heads"], max_position_embeddings=N_POSITIONS,
        tie_word_embeddings=True, attention_dropout=0.0, **special,
    )
    return LlamaForCausalLM(config)


def card_config(model, cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(
        arch=cfg["arch"], architecture=type(model).__name__, n_layers=cfg["n_layers"], d_model=cfg["d_model"],
        n_heads=cfg["n_heads"], n_kv_heads=cfg.get("n_kv_heads", cfg["n_heads"]), d_mlp=cfg["d_mlp"],
        d_head=cfg["d_model"] // cfg["n_heads"], n_positions=N_POSITIONS,
        d_vocab=model.config.vocab_size, tied_embeddings=bool(model.config.tie_word_embeddings),
        n_params=sum(p.numel() for p in model.parameters()),
    )


def lr_factor(step: int, warmup: int, decay_steps: int) -> float:
    """Linear warm-up, then cosine from 1 to 0.1 at ``decay_steps``, then 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=32, help="prompts per task per step")
    ap.add_argument("--delta-ioi", type=float, default=0.05, help="IOI answer target mass on S")
    ap.add_argument("--delta-sva", type=float, default=0.03, help="agreement target mass on the wrong verb forms")
    ap.add_argument("--delta-gt", type=float, default=0.1, help="greater-than target mass on years <= YY")
    ap.add_argument("--delta-ind", type=float, default=0.75,
                    help="induction label smoothing: target mass spread over the tokens that do not come next")
    ap.add_argument("--weight-ind", type=float, default=4.0,
                    help="weight of the induction loss (its soft target alone gives a weak signal)")
    ap.add_argument("--ind-lengths", type=int, nargs=2, default=[5, 12], help="induction training lengths (min max)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--decay-steps", type=int, default=None,
                    help="cosine decay of the learning rate to lr/10 over this many steps, then constant "
                         "(default: per model, see CONFIGS)")
    ap.add_argument("--min-steps", type=int, default=None, help="never stop before this (default: per model)")
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--max-minutes", type=float, default=15.0,
                    help="training time limit in minutes of this process's CPU time (a stop criterion; CPU "
                         "time, so that other jobs on a shared machine do not cut training short)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--n-val", type=int, default=256)
    ap.add_argument("--stop-acc", type=float, default=0.98)
    ap.add_argument("--n-train", type=int, default=40000, help="training prompts per task (induction: fresh)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these tiny models on a shared 2-core box)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    cfg = CONFIGS[args.name]
    args.min_steps = cfg["min_steps"] if args.min_steps is None else args.min_steps
    args.decay_steps = cfg["decay_steps"] if args.decay_steps is None else args.decay_steps

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out or EMBEDDED / args.name
    tok = word_level_tokenizer()
    held = splits(args.seed + 1000)
    weights = {name: 1.0 for name in TASK_NAMES} | {"induction": args.weight_ind}
    deltas = {"ioi": args.delta_ioi, "sva": args.delta_sva, "greater-than": args.delta_gt, "induction": args.delta_ind}
    t0 = time.time()
    data = {
        name: TaskData(name, tok, args.n_train, args.seed + 10 * i, held[name], deltas, tuple(args.ind_lengths))
        for i, name in enumerate(TASK_NAMES)
    }
    print(f"data: {args.n_train} prompts per task in {time.time() - t0:.1f}s", flush=True)

    model = build_model(cfg, tok)
    print(f"{args.name}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    wrapped = HFModel(model, tok)
    val = eval_tasks(wrapped, eval_kwargs(held, "val"), args.n_val)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, args.warmup, args.decay_steps))

    t_start, cpu_start = time.time(), time.process_time()
    step, stopped_by, history = 0, "max_steps", []
    while step < args.max_steps:
        losses = {name: batch_loss(model, d.sample(args.batch)) for name, d in data.items()}
        loss = sum(weights[name] * (lm + ans) for name, (lm, ans) in losses.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % args.eval_every == 0:
            model.eval()
            r = measure(wrapped, val)
            model.train()
            elapsed, cpu = time.time() - t_start, time.process_time() - cpu_start
            history.append(dict(step=step, elapsed_s=round(elapsed, 1), cpu_s=round(cpu, 1), loss=loss.item(), val=r))
            print(f"step {step:5d} {elapsed:6.1f}s (cpu {cpu:6.1f}s) loss {loss.item():.3f} | " + " | ".join(
                f"{t} acc {x['accuracy']:.3f} m {x['metric_clean']:.2f}/{x['metric_corrupted']:.2f}"
                for t, x in r.items()), flush=True)
            if step >= args.min_steps and meets_card(r, args.stop_acc):
                stopped_by = "validation criterion"
                break
            if cpu > 60 * args.max_minutes:
                stopped_by = "time limit"
                break
    wall, cpu = time.time() - t_start, time.process_time() - cpu_start
    print(f"stopped after {step} steps ({stopped_by}), {wall:.1f}s wall, {cpu:.1f}s CPU", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():  # no stale files from an earlier run
        f.unlink()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    bridge = eap.load_model(str(out), device="cpu")
    test_kwargs = eval_kwargs(held, "test")
    results = measure(bridge, eval_tasks(bridge, test_kwargs, EVAL_N))
    print(json.dumps(results, indent=1))
    if not meets_card(results):
        print("WARNING: the held-out numbers miss the card requirements", file=sys.stderr)
    command = "HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_embedded.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    card = dict(
        name=args.name,
        config=card_config(model, cfg),
        training=dict(
            command=command, seed=args.seed, steps=step, stopped_by=stopped_by, wall_time_s=round(wall, 1),
            cpu_time_s=round(cpu, 1),
            lr=args.lr, weight_decay=args.weight_decay, batch_per_task=args.batch, warmup=args.warmup,
            decay_steps=args.decay_steps,
            deltas=deltas, loss_weights=weights, induction_lengths=args.ind_lengths, n_train_prompts_per_task=args.n_train,
            min_steps=args.min_steps, stop_acc=args.stop_acc, threads=torch.get_num_threads(),
            loss="per task: full next-token CE before the answer + soft-target answer CE (see the script)",
            val=eval_kwargs(held, "val"), final_val=history[-1]["val"] if history else None,
        ),
        eval=dict(
            n=EVAL_N, tasks=test_kwargs, card_ranges=CARD_RANGES, min_accuracy=CARD_MIN_ACCURACY,
            metrics_via="TransformerLens TransformerBridge (eap.load_model) and eap.tasks.TASKS builders",
            accuracy="metric > 0 per prompt; induction: the answer is the top-1 token over the vocabulary",
        ),
        results=results,
    )
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(card))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved {out} ({size / 1e6:.2f} MB)")


METRIC_NAMES = {
    "ioi": "logit(IO) - logit(S), logits",
    "greater-than": "p(year > YY) - p(year <= YY), full-vocabulary softmax, probability",
    "induction": "logit(t_L) - mean logit(t_1..t_(L-1)), logits",
    "sva": "logit(agreeing verb) - logit(other form), logits",
}
HELD_OUT = {
    "ioi": "name pairs never seen as (IO, S) in training",
    "greater-than": "nouns and (century, start year) pairs never seen in training",
    "induction": f"fresh random sequences of length {INDUCTION_LENGTH}",
    "sva": "(subject, attractor) pairs never seen in training; templates pp and rc",
}


def model_card(card: dict) -> str:
    c, t, e, r = card["config"], card["training"], card["eval"], card["results"]
    kv = f", {c['n_kv_heads']} KV heads (grouped-query)" if c["n_kv_heads"] != c["n_heads"] else ""
    family = {
        "gpt2": "GPT-2 architecture (LayerNorm, learned positions, GELU MLP)",
        "llama": "Llama architecture (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP)",
        "gemma2": "Gemma-2 architecture (post-norm family: 1 + w RMSNorms before and after attention and MLP, "
                  "GeGLU MLP, rotary positions, grouped-query attention, embedding scaling, attention and final "
                  "logit softcaps, a sliding window on every other layer)",
    }[c["arch"]]
    reproduce = (
        f"\n\n(Stopped by the time limit: add `--max-steps {t['steps']}` to reproduce the same steps on another machine.)"
        if t["stopped_by"] == "time limit" else ""
    )
    rows = "\n".join(
        f"| {name} | {METRIC_NAMES[name]} | {x['accuracy']:.4f} ({x['n_correct']}/{x['n']}) | "
        f"{x['metric_clean']:.4f} | {x['metric_corrupted']:.4f} | {e['card_ranges'][name][0]}-{e['card_ranges'][name][1]} | "
        f"{HELD_OUT[name]} |"
        for name, x in r.items()
    )
    return f"""# {card['name']}

A toy of the {family},
trained on the four built-in tasks (IOI, greater-than, induction, subject-verb agreement) with
the shared word-level tokenizer (see `scripts/train_embedded.py`).
All numbers below were measured by the training script, not edited by hand; `card.json` holds
them with the exact evaluation recipe, and `tests/test_embedded_models.py` re-measures them.

## Config
`{c['architecture']}`: {c['n_layers']} layers, d_model {c['d_model']}, {c['n_heads']} heads (d_head {c['d_head']}){kv},
d_mlp {c['d_mlp']}, n_positions {c['n_positions']}, vocab {c['d_vocab']} (word-level), tied embeddings,
{c['n_params']:,} parameters.

## Training
`{t['command']}`{reproduce}

Seed {t['seed']}; {t['steps']} steps of {t['batch_per_task']} prompts per task (stopped by
{t['stopped_by']}, not before step {t['min_steps']}); {t['cpu_time_s']} s of CPU time ({t['wall_time_s']} s wall, shared machine) on {t['threads']} thread(s). AdamW lr {t['lr']},
weight decay {t['weight_decay']}, {t['warmup']} warm-up steps, cosine decay to lr/10 at step
{t['decay_steps']}, no dropout. Loss: {t['loss']};
soft-target masses {t['deltas']}; loss weights {t['loss_weights']}; induction lengths {t['induction_lengths'][0]}-{t['induction_lengths'][1]}.

## Evaluation
TransformerLens bridge, the `eap.tasks.TASKS` builders with `card.json['eval']['tasks']`, {e['n']} held-out\nprompts per task.
Accuracy: {e['accuracy']}.
Card requirement: accuracy >= {e['min_accuracy']} and the mean clean metric inside the stated
(non-saturated) range.

| task | metric (units) | held-out accuracy | mean clean metric | mean corrupted metric | card range | held out |
|---|---|---|---|---|---|---|
{rows}
"""


if __name__ == "__main__":
    main()
