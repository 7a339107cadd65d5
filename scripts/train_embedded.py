"""Train the embedded toy IOI models (GPT-2 architecture, word-level IOI prompts, CPU).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_embedded.py toy-ioi-2l
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_embedded.py toy-ioi-4l

Recipe
------
* Data: clean IOI prompts from :func:`eap.tasks.ioi.generate` (mixed templates) with the
  word-level tokenizer. A fixed set of unordered name pairs is held out of training: a
  validation set (used only to decide when to stop) and a test set (used only for the card).
* Loss = next-token cross-entropy on every prompt position before the answer (the "full LM
  loss") + cross-entropy on the answer position against a soft target: 1 - delta on the IO
  name and delta on the S name (label smoothing toward S). The optimum of the answer loss is
  a logit difference of log((1 - delta) / delta) (3.48 for delta = 0.03), which keeps the
  model out of the saturated regime (a hard target drives LD to 13+) and near GPT-2 small's
  IOI logit difference (~3.5).
* AdamW, linear warm-up then constant learning rate, no dropout. Stop at the first
  evaluation (every ``eval_every`` steps) at which validation accuracy >= ``stop_acc`` and
  the validation mean logit difference is within ``stop_ld``, but not before ``min_steps``
  (so the model is past its phase transition); else at ``max_steps`` or the time limit.
* The card's numbers are measured afterwards through the TransformerLens bridge on the
  test pairs (``card.json['eval']`` holds the recipe; tests/test_embedded_models.py redoes it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _import_eap_tolerantly() -> None:
    """Import the ``eap`` package; if its __init__ fails (a sibling module still being written),
    register a bare package so ``eap.tasks`` and ``eap.models`` can still be imported."""
    import types

    try:
        import eap  # noqa: F401
    except ImportError as exc:
        print(f"warning: `import eap` failed ({exc}); using a bare package")
        pkg = types.ModuleType("eap")
        pkg.__path__ = [str(ROOT / "eap")]
        sys.modules["eap"] = pkg


_import_eap_tolerantly()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from eap.tasks.ioi import NAMES, generate, ioi, logit_diff, word_level_tokenizer  # noqa: E402

CONFIGS = {
    "toy-ioi-2l": dict(n_layer=2, n_embd=64, n_head=4),
    "toy-ioi-4l": dict(n_layer=4, n_embd=128, n_head=8),
}
N_POSITIONS = 32


def held_out_pairs(seed: int, n_val: int, n_test: int) -> tuple[list[list[str]], list[list[str]]]:
    """Disjoint sets of unordered name pairs, returned as ordered (IO, S) lists (both orders)."""
    rng = random.Random(seed)
    all_pairs = list(itertools.combinations(NAMES, 2))
    chosen = rng.sample(all_pairs, n_val + n_test)

    def both(ps):
        return [[a, b] for a, b in ps] + [[b, a] for a, b in ps]

    return both(chosen[:n_val]), both(chosen[n_val:])


def losses(model, batch, delta: float):
    """(full next-token loss, soft answer loss, logit diff at the answer position)."""
    clean, end, io, s = batch
    logits = model(clean).logits  # [b, seq, vocab]
    b, seq, v = logits.shape
    pos = torch.arange(seq)
    lm_mask = pos[None, :] < end[:, None]  # predict tokens 1..end from positions 0..end-1
    targets = torch.roll(clean, -1, dims=1)
    lm = F.cross_entropy(logits[lm_mask], targets[lm_mask])
    rows = torch.arange(b)
    final = logits[rows, end]  # [b, vocab]
    logp = final.log_softmax(-1)
    ans = -((1 - delta) * logp[rows, io] + delta * logp[rows, s]).mean()
    return lm, ans, (final[rows, io] - final[rows, s])


@torch.no_grad()
def quick_eval(model, data) -> tuple[float, float]:
    model.eval()
    _, _, ld = losses(model, data, 0.0)
    model.train()
    return (ld > 0).float().mean().item(), ld.mean().item()


def load_bridge(path: Path):
    try:
        from eap.models import load_model

        return load_model(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - fall back to booting the bridge directly
        print(f"eap.load_model unavailable ({exc!r}); booting the bridge directly")
        from transformer_lens.model_bridge import TransformerBridge

        m = TransformerBridge.boot_transformers(str(path), device="cpu")
        m.enable_compatibility_mode(no_processing=True)
        m.set_use_split_qkv_input(True)
        m.set_use_attn_result(True)
        m.set_use_hook_mlp_in(True)
        return m


@torch.no_grad()
def card_eval(path: Path, recipe: dict) -> dict:
    """Held-out accuracy and mean logit differences through the TransformerLens bridge."""
    model = load_bridge(path)
    task = ioi(
        model, recipe["n"], seed=recipe["seed"], prompt_type=recipe["prompt_type"],
        pairs=recipe["pairs"],
    )
    ld_clean = task.metric(model(task.clean))
    ld_corrupt = logit_diff(model(task.corrupted), **task.per_prompt)  # clean io/s tokens
    return dict(
        heldout_accuracy=(ld_clean > 0).float().mean().item(),
        n_correct=int((ld_clean > 0).sum().item()),
        mean_logit_diff_clean=ld_clean.mean().item(),
        mean_logit_diff_corrupted=ld_corrupt.mean().item(),
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--delta", type=float, default=0.03, help="answer target mass on S")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-steps", type=int, default=2000,
                    help="never stop before this (the soft target bounds LD, so no saturation)")
    ap.add_argument("--max-steps", type=int, default=6000)
    ap.add_argument("--max-minutes", type=float, default=9.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--stop-acc", type=float, default=0.98)
    ap.add_argument("--stop-ld", type=float, nargs=2, default=[2.5, 6.0])
    ap.add_argument("--n-train", type=int, default=40000)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest for these tiny models on a shared 2-core box)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.out or ROOT / "eap" / "embedded" / args.name
    tok = word_level_tokenizer()
    val_pairs, test_pairs = held_out_pairs(args.seed + 1000, n_val=50, n_test=100)
    t0 = time.time()
    train = generate(tok, args.n_train, seed=args.seed, prompt_type="mixed",
                     exclude_pairs=val_pairs + test_pairs)
    val = generate(tok, 512, seed=args.seed + 1, prompt_type="mixed", pairs=val_pairs)
    val_batch = (val.clean, val.end, val.io, val.s)
    print(f"data: {args.n_train} train prompts in {time.time() - t0:.1f}s, seq {train.clean.shape[1]}")

    cfg = CONFIGS[args.name]
    config = GPT2Config(
        vocab_size=len(tok), n_positions=N_POSITIONS, n_inner=4 * cfg["n_embd"],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        **cfg,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / args.warmup))
    gen = torch.Generator().manual_seed(args.seed)

    t_start = time.time()
    step, stopped_by = 0, "max_steps"
    history = []
    while step < args.max_steps:
        idx = torch.randint(0, args.n_train, (args.batch,), generator=gen)
        batch = (train.clean[idx], train.end[idx], train.io[idx], train.s[idx])
        lm, ans, _ = losses(model, batch, args.delta)
        loss = lm + ans
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % args.eval_every == 0:
            acc, ld = quick_eval(model, val_batch)
            elapsed = time.time() - t_start
            history.append(dict(step=step, lm=lm.item(), ans=ans.item(), val_acc=acc, val_ld=ld))
            print(f"step {step:5d}  {elapsed:6.1f}s  lm {lm.item():.3f}  ans {ans.item():.3f}  "
                  f"val acc {acc:.3f}  val LD {ld:.2f}", flush=True)
            ok = acc >= args.stop_acc and args.stop_ld[0] <= ld <= args.stop_ld[1]
            if ok and step >= args.min_steps:
                stopped_by = "validation criterion"
                break
            if elapsed > 60 * args.max_minutes:
                stopped_by = "time limit"
                break
    wall = time.time() - t_start
    print(f"stopped after {step} steps ({stopped_by}), {wall:.1f}s")

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)

    recipe = dict(n=500, seed=12345, prompt_type="mixed", pairs=test_pairs,
                  note="ioi(model, n, seed=seed, prompt_type=prompt_type, pairs=pairs); "
                       "corrupted LD uses the clean prompts' io/s tokens")
    numbers = card_eval(out, recipe)
    print(json.dumps(numbers, indent=1))
    command = "HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_embedded.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    card = dict(
        name=args.name,
        architecture="GPT2LMHeadModel",
        config=dict(n_layer=config.n_layer, d_model=config.n_embd, n_heads=config.n_head,
                    d_mlp=config.n_inner, d_head=config.n_embd // config.n_head,
                    n_positions=config.n_positions, d_vocab=config.vocab_size,
                    tied_embeddings=bool(config.tie_word_embeddings),
                    n_params=sum(p.numel() for p in model.parameters())),
        training=dict(command=command, seed=args.seed, steps=step, stopped_by=stopped_by,
                      wall_time_s=round(wall, 1), lr=args.lr, weight_decay=args.weight_decay,
                      batch=args.batch, warmup=args.warmup, delta=args.delta,
                      loss="full next-token CE + answer CE with target (1-delta) on IO, delta on S",
                      n_train_prompts=args.n_train, min_steps=args.min_steps, stop_acc=args.stop_acc, stop_ld=args.stop_ld,
                      val_pairs=val_pairs, final_val=history[-1] if history else None,
                      threads=torch.get_num_threads()),
        eval=dict(recipe, metrics_via="TransformerLens TransformerBridge (eap.load_model)"),
        results=numbers,
    )
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(card))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved {out} ({size / 1e6:.2f} MB)")


def model_card(card: dict) -> str:
    c, t, e, r = card["config"], card["training"], card["eval"], card["results"]
    return f"""# {card['name']}

A GPT-2-architecture toy trained on word-level IOI prompts (see `scripts/train_embedded.py`).
All numbers below were measured by the training script, not edited by hand; `card.json` holds
them with the exact evaluation recipe, and `tests/test_embedded_models.py` re-measures them.

## Config
{c['n_layer']} layers, d_model {c['d_model']}, {c['n_heads']} heads (d_head {c['d_head']}), d_mlp {c['d_mlp']},
n_positions {c['n_positions']}, vocab {c['d_vocab']} (word-level IOI tokenizer), tied embeddings,
{c['n_params']:,} parameters.

## Training
`{t['command']}`

Seed {t['seed']}; {t['steps']} steps of batch {t['batch']} (stopped by {t['stopped_by']});
wall time {t['wall_time_s']} s on {t['threads']} CPU threads. AdamW lr {t['lr']}, weight decay
{t['weight_decay']}, {t['warmup']} warm-up steps, no dropout. Loss: {t['loss']}
(delta = {t['delta']}). {len(t['val_pairs']) // 2} + {len(e['pairs']) // 2} unordered name pairs
were held out of training (validation pairs for stopping, test pairs for the numbers below).

## Evaluation (TransformerLens bridge, {e['n']} prompts, seed {e['seed']}, prompt_type {e['prompt_type']}, held-out test pairs only)
| quantity | value |
|---|---|
| held-out IO-vs-S accuracy | {r['heldout_accuracy']:.4f} ({r['n_correct']}/{e['n']}) |
| mean clean logit difference (IO - S) | {r['mean_logit_diff_clean']:.4f} |
| mean ABC-corrupted logit difference (clean IO/S tokens) | {r['mean_logit_diff_corrupted']:.4f} |
"""


if __name__ == "__main__":
    main()
