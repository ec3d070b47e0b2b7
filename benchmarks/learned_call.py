"""A miniature of RelayLLM's result: a small model learns when to call a large one.

    python benchmarks/learned_call.py                 # a few minutes on 2 CPU cores
    python benchmarks/learned_call.py --device cuda   # the same, on a GPU

Task (verifiable, arithmetic): "What is a + b?" is easy (the small model knows every sum),
"What is a * b?" is hard (the small model answers a + b; only the large model knows
products), "What is a ^ b?" is unsolvable (both are wrong: the filter must drop it). Both
models are tiny Qwen2 networks trained here from scratch (tests/tiny_models.py), sharing a
tokenizer; each answers "Let me compute a op b: \\boxed{r}." (no system prompt).

Pipeline, all through relaygraph.train and the real relay + trajectory store:
1. warm-up: the small model's own responses with <call>n</call> inserted at random token
   positions, SFT (``relaygraph.train.warmup``);
2. teacher-pass-rate filter, k = 10 (``relaygraph.train.filtering``);
3. GRPO, difficulty-aware reward, rollouts = relay runs with the expert's tokens masked
   (``relaygraph.train.grpo``);
4. greedy evaluation on held-out questions: solo small, solo large, the controller before
   (warm-up only) and after GRPO, after GRPO teacher-free (the command banned at decode time), and routers that
   send whole questions to the large model: random at the trained controller's call ratio
   (expected accuracy from the solo runs, and one seeded draw) and perfect.

Settings the tiny models need (the library defaults are the paper's): warm-up responses are
the small model's greedy ones (its temperature-1 samples are noisier than a real model's),
0..2 commands each; GRPO with lr 5e-4 and KL beta 0.1 (with the paper's 0.01 the controller
learned to call early and pad junk after the answer, which dilutes the call ratio), 160 steps
x 8 questions x 8 rollouts at temperature 1. A response the budget cut off scores as wrong.

Writes benchmarks/results/learned_call.{json,md}. Work files (models, checkpoints) go to
--work (default /tmp/relaygraph-learned-call); stages resume from them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/tiny_models.py builds the tiny models

import torch  # noqa: E402

from relaygraph.train.filtering import FilterSettings, run_filter  # noqa: E402
from relaygraph.train.grpo import TRAIN_NAMESPACE, GrpoSettings, run_grpo  # noqa: E402
from relaygraph.train.warmup import SftSettings, WarmupSettings, run_warmup  # noqa: E402
from relaygraph.trajectory import open_store  # noqa: E402
from tests import tiny_models as tiny  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
SYSTEM = None  # no system prompt: short sequences (the tests train with the paper's prompt)
MAX_TOKENS = 40


# the task ------------------------------------------------------------------------------------
def items() -> list[dict[str, Any]]:
    """Every question with its gold answer and what each model was taught to answer."""
    rows = []
    for op, span in (("+", range(2, 10)), ("*", range(2, 10)), ("^", range(2, 6))):
        for a in span:
            for b in span:
                gold = {"+": a + b, "*": a * b, "^": a**b}[op]
                rows.append({"question": f"What is {a} {op} {b}?", "answer": str(gold),
                             "kind": {"+": "easy", "*": "hard", "^": "unsolvable"}[op],
                             "small": a + b, "large": a * b if op != "+" else a + b,
                             "a": a, "b": b, "op": op})
    return rows


def text(row: dict[str, Any], result: int) -> str:
    return f"Let me compute {row['a']} {row['op']} {row['b']}: \\boxed{{{result}}}."


def split(rows: list[dict[str, Any]], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train pool, held-out test): a quarter of the easy and hard questions are held out."""
    rng = random.Random(seed)
    solvable = [r for r in rows if r["kind"] != "unsolvable"]
    test = set(rng.sample(range(len(solvable)), len(solvable) // 4))
    train = [r for i, r in enumerate(solvable) if i not in test]
    return train + [r for r in rows if r["kind"] == "unsolvable"], [solvable[i] for i in sorted(test)]


# the two tiny models --------------------------------------------------------------------------
def build_models(work: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Small and large tiny Qwen2 models on one tokenizer (cached under ``work``)."""
    small_dir, large_dir = work / "small", work / "large"
    if (small_dir / "config.json").exists() and (large_dir / "config.json").exists():
        return small_dir, large_dir
    small = [(r["question"], text(r, r["small"])) for r in rows]
    large = [(r["question"], text(r, r["large"])) for r in rows]
    commands = [f"<call>{n}</call>" for n in (*range(1, 40), *(d * 10**k for d in range(1, 10)
                                                                for k in range(4)))]
    corpus = [tiny._render([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                           False) for q, a in small + large]
    tokenizer = tiny.build_tokenizer(corpus + commands)
    for out, dialogues, seed in ((small_dir, small, 1), (large_dir, large, 2)):
        model = tiny._make_model(tokenizer, seed)
        eos = tokenizer.eos_token_id
        encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        samples = [(encode(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                         tokenize=False, add_generation_prompt=True)),
                    encode(a) + [eos]) for q, a in dialogues]
        steps = fit(model, samples, eos)
        print(f"  {out.name} model: every answer memorised after {steps} steps", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return small_dir, large_dir


def fit(model: Any, samples: list[tuple[list[int], list[int]]], pad: int, lr: float = 3e-3,
        max_steps: int = 3000, min_prob: float = 0.95) -> int:
    """Full-batch AdamW until every answer token has probability >= ``min_prob`` under
    teacher forcing: greedy decoding reproduces every answer, and sampling at temperature 1
    nearly always does (a confident model, right or wrong)."""
    width = max(len(p) + len(t) for p, t in samples)
    ids = torch.full((len(samples), width), pad)
    labels = torch.full((len(samples), width), -100)
    attention = torch.zeros((len(samples), width), dtype=torch.long)
    for i, (p, t) in enumerate(samples):  # right padding: positions start at 0 as at inference
        ids[i, :len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
        attention[i, :len(p) + len(t)] = 1
    target, mask = labels[:, 1:], labels[:, 1:] != -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(1, max_steps + 1):
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[mask], target[mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            with torch.no_grad():
                logp = torch.log_softmax(logits.detach()[mask], dim=-1)
                if logp.gather(-1, target[mask][:, None]).min() > math.log(min_prob):
                    model.eval()
                    return step
    raise RuntimeError(f"the tiny model did not memorise its answers in {max_steps} steps")


# evaluation (through the eval harness: relaygraph.eval.sweep) -----------------------------------
def sweep(work: Path, name: str, controller: Path, large: Path, policies: list[dict],
          p_values: list[float]) -> dict[str, Any]:
    """A greedy eval sweep of the held-out questions with ``controller`` as the small agent:
    solo small and large always, ``policies``, random routers at ``p_values`` and the
    perfect router (derived from the solo runs). Resumable under ``work/eval/name``."""
    from relaygraph.config import AgentConfig
    from relaygraph.eval.runner import FileResults
    from relaygraph.eval.sweep import SweepConfig, run_sweep

    agent = lambda path: AgentConfig(model=str(path), system_prompt=SYSTEM, dtype="float32")  # noqa: E731
    config = SweepConfig(dataset=str(work / "test.jsonl"), max_tokens=MAX_TOKENS,
                         agents={"controller": agent(controller), "expert": agent(large)},
                         policies=policies, random_router_p=p_values)
    results = FileResults(work / "eval" / name)
    try:
        return run_sweep(config, open_store(namespace=TRAIN_NAMESPACE), results, concurrency=16)
    finally:
        results.close()


def row(result: dict[str, Any], policy: str, kinds: dict[str, str]) -> dict[str, Any]:
    """One policy of a sweep: accuracy and call ratio, overall and per kind of question."""
    summary = next(p for p in result["policies"] if p["name"] == policy)
    items = result["items"][policy]
    by_kind = {}
    for kind in ("easy", "hard"):
        mine = [r for pid, r in items.items() if kinds[pid] == kind]
        tokens = sum(sum(r["tokens_by_agent"].values()) for r in mine)
        by_kind[kind] = {"accuracy": sum(bool(r["correct"]) for r in mine) / len(mine),
                         "call_ratio": sum(r["tokens_by_agent"].get("expert", 0) for r in mine)
                         / tokens if tokens else 0.0}
    calls = sum(r.get("counters", {}).get("calls", 0) for r in items.values())
    cut = sum(r.get("finish_reason") == "budget" for r in items.values())
    return {"accuracy": summary["accuracy"], "call_ratio": summary["call_ratio"],
            "tokens_per_problem": summary["tokens_per_problem"], "calls": calls,
            "cut_off": cut, "by_kind": by_kind}


def matched_p(solo_small: dict[str, Any], solo_large: dict[str, Any], ratio: float) -> float:
    """The routing probability whose expected call ratio (large tokens / all tokens) is ``ratio``."""
    from relaygraph.eval.metrics import random_router_p

    return random_router_p(solo_small["tokens_per_problem"], solo_large["tokens_per_problem"], ratio)


def table(res: dict) -> str:
    lines = ["| system | accuracy | easy | hard | call ratio | calls | cut off by the budget |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["systems"].items():
        kinds = r.get("by_kind", {})
        def cell(k: str, kinds: dict = kinds) -> str:
            return f"{kinds[k]['accuracy']:.0%}" if k in kinds else "–"

        lines.append(f"| {name} | {r['accuracy']:.1%} | {cell('easy')} | {cell('hard')} "
                     f"| {r['call_ratio']:.1%} | {r.get('calls', '–')} | {r.get('cut_off', '–')} |")
    return "\n".join(lines)


# the experiment -----------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/relaygraph-learned-call"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grpo-steps", type=int, default=160)
    ap.add_argument("--questions-per-step", type=int, default=8)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--reward", default="difficulty-aware", choices=["difficulty-aware", "simple"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT / "learned_call")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rows = items()
    train, test = split(rows, args.seed)
    for name, part in (("train", train), ("test", test)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    say = lambda line: print(f"  {line}", flush=True)  # noqa: E731

    print("1/5 tiny small and large models", flush=True)
    small_dir, large_dir = build_models(work, rows)
    timings["models_s"] = time.perf_counter() - started

    print("2/5 warm-up (self-sampled responses + random <call>n</call>, SFT)", flush=True)
    t = time.perf_counter()
    warm_dir = run_warmup(WarmupSettings(
        model=str(small_dir), data=work / "train.jsonl", output_dir=work / "warmup",
        system_prompt=SYSTEM, samples_per_question=4, temperature=0.0, max_tokens=MAX_TOKENS,
        min_calls=0, max_calls=2, seed=args.seed, device=args.device, concurrency=16,
        sft=SftSettings(learning_rate=2e-3, epochs=12, batch_size=16, gradient_accumulation_steps=1,
                        warmup_ratio=0.0, save_steps=100, logging_steps=50,
                        trl={"disable_tqdm": True})), progress=say)
    timings["warmup_s"] = time.perf_counter() - t

    print("3/5 teacher-pass-rate filter (k = 10, >= 50%)", flush=True)
    t = time.perf_counter()
    filtered = run_filter(FilterSettings(
        expert=str(large_dir), data=work / "train.jsonl", output=work / "filtered.jsonl", k=10,
        system_prompt=SYSTEM, max_tokens=MAX_TOKENS, seed=args.seed, dtype="float32",
        device=args.device, concurrency=40), progress=lambda _: None)
    kept = [json.loads(line) for line in filtered.read_text().splitlines()]
    say(f"kept {len(kept)}/{len(train)}: " + ", ".join(
        f"{k} {sum(r['kind'] == k for r in kept)}/{sum(r['kind'] == k for r in train)}"
        for k in ("easy", "hard", "unsolvable")))
    timings["filter_s"] = time.perf_counter() - t

    print(f"4/5 GRPO, {args.reward} reward, {args.grpo_steps} steps x "
          f"{args.questions_per_step} questions x {args.num_generations} relay rollouts", flush=True)
    t = time.perf_counter()
    trained_dir = run_grpo(GrpoSettings(
        controller=str(warm_dir), expert=str(large_dir), data=filtered,
        output_dir=work / f"grpo-{args.reward}-beta{args.beta:g}", system_prompt=SYSTEM,
        expert_system_prompt=SYSTEM,
        reward=args.reward, num_generations=args.num_generations,
        questions_per_step=args.questions_per_step, max_tokens=MAX_TOKENS,
        learning_rate=args.lr, beta=args.beta, max_steps=args.grpo_steps, save_steps=20,
        logging_steps=5, seed=args.seed, device=args.device, trl={"disable_tqdm": True}),
        progress=say)
    timings["grpo_s"] = time.perf_counter() - t

    print(f"5/5 greedy evaluation on {len(test)} held-out questions (relaygraph.eval sweeps)",
          flush=True)
    t = time.perf_counter()
    from relaygraph.eval.datasets import load_problems

    kinds = {p.id: next(r["kind"] for r in test if r["question"] == p.question)
             for p in load_problems(work / "test.jsonl")}
    call_token = [{"name": "call-token", "type": "call-token"},
                  {"name": "teacher-free", "type": "call-token", "teacher_free": True}]
    after = sweep(work, f"after-{args.reward}-beta{args.beta:g}", trained_dir, large_dir,
                  call_token, [])
    before = sweep(work, "before", warm_dir, large_dir, call_token[:1], [])
    base = sweep(work, "base", small_dir, large_dir, [], [])
    ratio = row(after, "call-token", kinds)["call_ratio"]
    p = matched_p(row(base, "solo-small", kinds), row(base, "solo-large", kinds), ratio)
    base = sweep(work, "base", small_dir, large_dir, [], [round(p, 4)])
    small_r, large_r = row(base, "solo-small", kinds), row(base, "solo-large", kinds)
    systems: dict[str, dict[str, Any]] = {
        "solo small": small_r,
        "solo large": large_r,
        "call-token, warm-up only (before GRPO)": row(before, "call-token", kinds),
        "call-token, after GRPO": row(after, "call-token", kinds),
        "after GRPO, teacher-free (command banned)": row(after, "teacher-free", kinds),
        "random router, same call ratio (expected)": {
            "accuracy": (1 - p) * small_r["accuracy"] + p * large_r["accuracy"],
            "call_ratio": ratio, "p": p},
        f"random router p={round(p, 4):g} (one draw, derived)": row(
            base, f"random-router(p={round(p, 4):g})", kinds),
        "perfect router (derived)": row(base, "perfect-router", kinds),
    }
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "task": {"train_questions": len(train), "kept_after_filter": len(kept),
                 "test_questions": len(test), "max_tokens": MAX_TOKENS},
        "settings": vars(args) | {"work": str(args.work), "out": str(args.out)},
        "device": args.device, "torch_threads": torch.get_num_threads(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "systems": systems,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stages = ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items() if k != "total_s")
    md = (f"# Learned call token, miniature\n\n`{result['command']}`\n\n{len(test)} held-out "
          f"questions (half easy `a + b`, half hard `a * b`), greedy decoding, {args.device}, "
          f"{torch.get_num_threads()} threads, {timings['total_s']:.0f} s in all ({stages}). "
          f"Filter kept {len(kept)} of {len(train)} training questions. GRPO: "
          f"{args.reward} reward, {args.grpo_steps} steps x {args.questions_per_step} questions "
          f"x {args.num_generations} relay rollouts, lr {args.lr:g}, beta {args.beta:g}.\n\n"
          f"{table(result)}\n\nCall ratio = large-model tokens / all generated tokens, pooled; "
          "calls = honoured `<call>n</call>` commands. Routers send whole questions to the large "
          "model (derived from the solo runs by the eval harness); the expected random router "
          "is the mix of the two solo accuracies at the probability whose expected call ratio "
          "equals the trained controller's. Teacher-free = the trained controller with every "
          "command banned at decode time (`--set teacher_free=true`, vLLM's bad_words semantics).\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
