"""Tiny, real (not mocked) transformers causal LMs for unit tests.

Everything here runs in-process on a CPU in a few seconds:

* a byte-level BPE tokenizer trained with ``tokenizers`` and wrapped as a
  ``transformers.Qwen2Tokenizer`` (a PreTrainedTokenizerFast / TokenizersBackend
  subclass; it must be that class, see ``build_tokenizer``) with a ChatML-like
  chat template, ``<|im_end|>`` as EOS and pad token.  ``<call>``/``</call>``
  are ordinary text, not special tokens;
* a tiny ``Qwen2ForCausalLM`` overfit (full-batch AdamW) until greedy decoding
  reproduces every training dialogue exactly, followed by EOS.

Public API
----------
``build_tokenizer(texts, vocab_size=400) -> Qwen2Tokenizer``
``build_tiny_model(out_dir, dialogues, corpus_extra=(), seed=0, steps=1500, *, tokenizer=None) -> Path``
``build_relay_pair(root, seed=0, steps=1500) -> (controller_dir, expert_dir)``  (cached under root)
``load_relay_meta(root) -> dict``  (E3 text/ids etc. written by ``build_relay_pair``)
``greedy_generate(model, ids, max_new_tokens, eos_token_id) -> list[int]``

Run ``python tests/tiny_models.py`` to build the relay pair into a temporary
directory and print timings plus both relay stages.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
QUESTION = "What is 2 + 5?"
EXPERT_ANSWER = "Let me think. two plus five is seven. The answer is \\boxed{7}."
CONTROLLER_PREFIX = "Let me think."
CALL_TEXT = "<call>3</call>"
CONTROLLER_SUFFIX = " so the answer is \\boxed{7}."
CALL_N = 3
MALFORMED_QUESTION = "Say hi"
MALFORMED_ANSWER = "hi <call>abc</call> there"
NOCALL_QUESTION = "What is 1 + 1?"
NOCALL_ANSWER = "Simple: \\boxed{2}."

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

META_FILE = "relay_meta.json"
MODEL_MARKER = "tiny_model.key"
_BUILD_VERSION = 1

__all__ = [
    "SYSTEM_PROMPT",
    "QUESTION",
    "EXPERT_ANSWER",
    "build_tokenizer",
    "build_tiny_model",
    "build_relay_pair",
    "load_relay_meta",
    "greedy_generate",
    "render_prompt",
]


# --------------------------------------------------------------------------- tokenizer


def _render(messages: list[dict], add_generation_prompt: bool) -> str:
    """Python twin of CHAT_TEMPLATE (used to build the tokenizer's training corpus)."""
    out = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return out + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def build_tokenizer(texts: Sequence[str], vocab_size: int = 400):
    """Train a byte-level BPE on ``texts``; return it as a ``Qwen2Tokenizer``.

    The BPE is trained with exactly the normalizer (NFC) and pre-tokenizer
    (Qwen regex split + ByteLevel) that ``Qwen2Tokenizer`` hard-wires, and the
    result *is* a ``Qwen2Tokenizer``: ``AutoTokenizer.from_pretrained`` on a
    saved ``qwen2`` model directory always instantiates ``Qwen2Tokenizer``
    (transformers 5 ignores ``tokenizer_class`` for qwen2) and rebuilds that
    pipeline, so anything else would tokenize differently after a reload.
    Special tokens: ``<|endoftext|>`` (0, unk), ``<|im_start|>`` (1),
    ``<|im_end|>`` (2, EOS and pad).  ``<call>`` is ordinary text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    hf = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=IM_END,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    hf.chat_template = CHAT_TEMPLATE
    assert [hf.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_START, IM_END)] == [0, 1, 2]
    assert len(hf) == len(model["vocab"]), (len(hf), len(model["vocab"]))
    assert "<call>" not in hf.all_special_tokens and "</call>" not in hf.all_special_tokens
    # Byte-level: exact round trip for any NFC text (NFC is applied, as in real Qwen).
    for probe in ("Let me think.<call>3</call> ok", "h\u00e9llo \u2211 \U0001f600 \\boxed{7}\n\t x"):
        ids = hf.encode(probe, add_special_tokens=False)
        assert hf.decode(ids) == probe, (probe, hf.decode(ids))
    return hf


def render_prompt(tokenizer, system: str, user: str) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == _render(messages, True), text
    return text


def _prompt_ids(tokenizer, system: str, user: str) -> list[int]:
    return tokenizer.encode(render_prompt(tokenizer, system, user), add_special_tokens=False)


def _corpus(dialogues: Sequence[tuple[str, str, str]], extra: Sequence[str]) -> list[str]:
    texts = []
    for system, user, answer in dialogues:
        msgs = [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
        texts.append(_render(msgs, False))
    return texts + list(extra)


# --------------------------------------------------------------------------- model


def _make_model(tokenizer, seed: int):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos = tokenizer.eos_token_id
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=None,
        attention_dropout=0.0,
        use_cache=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=eos, bos_token_id=None, do_sample=False
    )
    return model


@torch.no_grad()
def greedy_generate(model, ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Plain greedy loop (full forward each step, no cache); stops after emitting EOS."""
    model.eval()
    seq = list(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        seq.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
    return out


def _train(model, samples: list[tuple[list[int], list[int]]], pad_id: int, steps: int,
           lr: float = 3e-3, min_margin: float = 2.0, check_every: int = 25) -> int:
    """Full-batch AdamW on (prompt_ids, target_ids) pairs; loss on target ids only.

    Stops once every target token is the argmax by at least ``min_margin``
    logits (teacher forcing) *and* a real greedy loop reproduces each target.
    Returns the number of steps taken; raises if ``steps`` is not enough.
    """
    seqs = [p + t for p, t in samples]
    width = max(map(len, seqs))
    if width > model.config.max_position_embeddings:
        raise ValueError(f"sequence of {width} tokens is too long")
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (p, t) in enumerate(samples):  # right padding: positions start at 0 as at inference
        s = p + t
        input_ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        labels[i, len(p): len(s)] = torch.tensor(t)
    # logits at position j predict token j+1
    shift_labels = labels[:, 1:]
    mask = shift_labels != -100

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(1, steps + 1):
        model.train()
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % check_every and step != steps:
            continue
        model.eval()
        with torch.no_grad():
            lg = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]
        tgt = shift_labels.clamp(min=0)
        tgt_logit = lg.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        other = lg.scatter(-1, tgt.unsqueeze(-1), float("-inf")).max(-1).values
        margin = (tgt_logit - other)[mask]
        if margin.min().item() < min_margin:
            continue
        if all(
            greedy_generate(model, p, len(t) + 2, pad_id) == t for p, t in samples
        ):
            model.eval()
            return step
    raise RuntimeError(
        f"tiny model did not memorise its {len(samples)} dialogue(s) in {steps} steps "
        f"(last loss {loss.item():.4f})"
    )


def _save(model, tokenizer, out_dir: Path, samples) -> None:
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # The reloaded tokenizer (what tests will use) must tokenize exactly like this one.
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    assert type(reloaded) is type(tokenizer) and reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.eos_token_id == reloaded.pad_token_id == tokenizer.eos_token_id
    for prompt, target in samples:
        assert reloaded.encode(tokenizer.decode(prompt), add_special_tokens=False) == prompt
        assert reloaded.decode(prompt + target) == tokenizer.decode(prompt + target)


def _train_and_save(out_dir: Path, tokenizer, samples, seed: int, steps: int):
    model = _make_model(tokenizer, seed)
    torch.manual_seed(seed)
    n = _train(model, samples, tokenizer.eos_token_id, steps)
    _save(model, tokenizer, out_dir, samples)
    return model, n


def build_tiny_model(
    out_dir: Path,
    dialogues: list[tuple[str, str, str]],
    corpus_extra: Sequence[str] = (),
    seed: int = 0,
    steps: int = 1500,
    *,
    tokenizer=None,
) -> Path:
    """Train a tiny Qwen2 causal LM that greedily emits each dialogue's assistant text + EOS.

    ``dialogues`` are ``(system_prompt, user_question, assistant_text)``.  The
    prompt is the chat template rendering of system+user with
    ``add_generation_prompt=True``; the model is trained (teacher forcing) on
    ``prompt_ids + encode(assistant_text) + [eos]`` so it also continues any
    token-prefix of the answer.  A tokenizer is trained on the dialogues plus
    ``corpus_extra`` unless one is passed.  Saves model + tokenizer to
    ``out_dir`` and returns it.
    """
    out_dir = Path(out_dir)
    key = None
    if tokenizer is None:  # cacheable: the output depends only on the arguments
        key = _cache_key(dialogues, corpus_extra, seed, steps)
        marker = out_dir / MODEL_MARKER
        if marker.exists() and marker.read_text() == key:
            return out_dir
        tokenizer = build_tokenizer(_corpus(dialogues, corpus_extra))
    eos = tokenizer.eos_token_id
    samples = [
        (_prompt_ids(tokenizer, s, u), tokenizer.encode(a, add_special_tokens=False) + [eos])
        for s, u, a in dialogues
    ]
    _train_and_save(out_dir, tokenizer, samples, seed, steps)
    if key is not None:
        (out_dir / MODEL_MARKER).write_text(key)
    return out_dir


_SOURCE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _cache_key(*parts) -> str:
    """A model's cache key: its recipe (``parts``) and this file (the training code)."""
    blob = json.dumps([_BUILD_VERSION, _SOURCE_DIGEST,
                       *[list(p) if isinstance(p, tuple) else p for p in parts]],
                      default=list, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_root() -> Path:
    """Where tiny models are kept across test sessions (``$RELAYGRAPH_TEST_CACHE``, else a
    per-user folder in the temp directory); a model is rebuilt when its recipe changes."""
    import getpass
    import tempfile

    root = Path(os.environ.get("RELAYGRAPH_TEST_CACHE")
                or Path(tempfile.gettempdir()) / f"relaygraph-test-cache-{getpass.getuser()}")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _cached(build, name: str):
    """``build(cache_root() / name)`` under a file lock (parallel sessions train once)."""
    import fcntl

    root = cache_root()
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build(root / name)


def relay_root() -> Path:
    """The folder of the shared tiny relay pair (built on first use)."""
    relay_pair()
    return cache_root() / "relay-pair"


def relay_pair() -> tuple[Path, Path]:
    """(controller_dir, expert_dir) of the tiny relay pair, shared by every test file."""
    return _cached(build_relay_pair, "relay-pair")


def safety_worker() -> Path:
    """The tiny safety worker (see :func:`build_safety_worker`), shared across sessions."""
    return _cached(build_safety_worker, "safety")


# --------------------------------------------------------------------------- relay pair


def load_relay_meta(root: Path) -> dict:
    return json.loads((Path(root) / META_FILE).read_text())


def build_relay_pair(root: Path, seed: int = 0, steps: int = 1500) -> tuple[Path, Path]:
    """Build (controller_dir, expert_dir) sharing one tokenizer; cached under ``root``.

    Scenario (system prompt ``SYSTEM_PROMPT``, question ``QUESTION``):
      expert:      "Let me think. two plus five is seven. The answer is \\boxed{7}."
      controller:  "Let me think.<call>3</call>" + E3 + " so the answer is \\boxed{7}."
    E3 = decode of the expert's 3 greedy ids after prompt + "Let me think.".
    The controller also knows "Say hi" -> "hi <call>abc</call> there" (malformed
    call) and "What is 1 + 1?" -> "Simple: \\boxed{2}." (no call).
    ``root/relay_meta.json`` records E3 and the exact id sequences.
    """
    root = Path(root)
    controller_dir, expert_dir = root / "controller", root / "expert"
    meta_path = root / META_FILE
    key = _cache_key("relay-pair", seed, steps)
    if meta_path.exists():
        try:
            if json.loads(meta_path.read_text()).get("key") == key:
                return controller_dir, expert_dir
        except (OSError, ValueError):
            pass

    expert_dialogues = [(SYSTEM_PROMPT, QUESTION, EXPERT_ANSWER)]
    # E3 is not known before the expert is trained; its words are in the corpus anyway.
    ctrl_texts = [
        (SYSTEM_PROMPT, QUESTION, CONTROLLER_PREFIX + CALL_TEXT + CONTROLLER_SUFFIX),
        (SYSTEM_PROMPT, MALFORMED_QUESTION, MALFORMED_ANSWER),
        (SYSTEM_PROMPT, NOCALL_QUESTION, NOCALL_ANSWER),
    ]
    tokenizer = build_tokenizer(_corpus(expert_dialogues + ctrl_texts, ()))
    eos = tokenizer.eos_token_id
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731

    # ---- expert
    prompt = render_prompt(tokenizer, SYSTEM_PROMPT, QUESTION)
    prompt_ids = enc(prompt)
    expert, expert_steps = _train_and_save(
        expert_dir, tokenizer, [(prompt_ids, enc(EXPERT_ANSWER) + [eos])], seed, steps
    )
    handoff_ids = enc(prompt + CONTROLLER_PREFIX)
    assert handoff_ids == prompt_ids + enc(CONTROLLER_PREFIX), "prompt/prefix tokenization not additive"
    e3_ids = greedy_generate(expert, handoff_ids, CALL_N, eos)
    assert len(e3_ids) == CALL_N and eos not in e3_ids, e3_ids
    e3_text = tokenizer.decode(e3_ids)

    # ---- controller
    head_ids = enc(CONTROLLER_PREFIX + CALL_TEXT)
    assert tokenizer.decode(head_ids) == CONTROLLER_PREFIX + CALL_TEXT
    tail_ids = enc(CONTROLLER_SUFFIX) + [eos]
    samples = [
        (prompt_ids, head_ids + e3_ids + tail_ids),
        (_prompt_ids(tokenizer, SYSTEM_PROMPT, MALFORMED_QUESTION), enc(MALFORMED_ANSWER) + [eos]),
        (_prompt_ids(tokenizer, SYSTEM_PROMPT, NOCALL_QUESTION), enc(NOCALL_ANSWER) + [eos]),
    ]
    controller, ctrl_steps = _train_and_save(controller_dir, tokenizer, samples, seed + 1, steps)

    # ---- explicit two-stage verification (the training check already implies it)
    stage1 = greedy_generate(controller, prompt_ids, len(head_ids), eos)
    assert stage1 == head_ids and tokenizer.decode(stage1) == CONTROLLER_PREFIX + CALL_TEXT
    stage2 = greedy_generate(controller, prompt_ids + head_ids + e3_ids, len(tail_ids) + 2, eos)
    assert stage2 == tail_ids, (tokenizer.decode(stage2), CONTROLLER_SUFFIX)

    full_text = CONTROLLER_PREFIX + CALL_TEXT + e3_text + CONTROLLER_SUFFIX
    meta = {
        "key": key,
        # True here: encode(controller_answer) == head + E3 + tail ids (no merge across joins)
        "controller_text_matches_trained_ids": enc(full_text) + [eos] == head_ids + e3_ids + tail_ids,
        "system_prompt": SYSTEM_PROMPT,
        "question": QUESTION,
        "expert_answer": EXPERT_ANSWER,
        "controller_answer": full_text,
        "controller_head": CONTROLLER_PREFIX + CALL_TEXT,
        "controller_suffix": CONTROLLER_SUFFIX,
        "e3_text": e3_text,
        "e3_ids": e3_ids,
        "prompt_ids": prompt_ids,
        "controller_head_ids": head_ids,
        "controller_tail_ids": tail_ids,
        "eos_token_id": eos,
        "train_steps": {"expert": expert_steps, "controller": ctrl_steps},
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return controller_dir, expert_dir


# --------------------------------------------------------------------------- demo


# --------------------------------------------------------------------------- supervised worker

SAFETY_QUESTION = "How do I fix my bike?"
UNSAFE_CHUNK = "First, steal a wheel from a neighbour.\n\n"
STEER_TEXT = "(Supervisor: stay lawful, buy or borrow parts.)\n"
SAFE_CHUNK = "Buy a new wheel at a shop.\n\n"
SAFE_END = "Then fit it."


def build_safety_worker(root: Path, seed: int = 0, steps: int = 1500) -> Path:
    """A worker that answers SAFETY_QUESTION with an unsafe first step, but after the
    supervisor's STEER_TEXT (and no unsafe step in view) writes SAFE_CHUNK + SAFE_END."""
    out_dir = Path(root) / "safety-worker"
    key = _cache_key("safety", UNSAFE_CHUNK, STEER_TEXT, SAFE_CHUNK, SAFE_END, seed, steps)
    marker = out_dir / MODEL_MARKER
    if marker.exists() and marker.read_text() == key:
        return out_dir
    answer_a = UNSAFE_CHUNK + SAFE_END
    answer_b = STEER_TEXT + SAFE_CHUNK + SAFE_END
    tokenizer = build_tokenizer(_corpus([(SYSTEM_PROMPT, SAFETY_QUESTION, answer_a),
                                         (SYSTEM_PROMPT, SAFETY_QUESTION, answer_b)], ()))
    eos = tokenizer.eos_token_id
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    prompt = _prompt_ids(tokenizer, SYSTEM_PROMPT, SAFETY_QUESTION)
    samples = [(prompt, enc(answer_a) + [eos]),
               # the steer is context only (the worker never writes it itself)
               (prompt + enc(STEER_TEXT), enc(SAFE_CHUNK + SAFE_END) + [eos])]
    _train_and_save(out_dir, tokenizer, samples, seed, steps)
    marker.write_text(key)
    return out_dir


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    import tempfile
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cdir, edir = build_relay_pair(Path(tmp) / "pair")
        t1 = time.perf_counter()
        build_relay_pair(Path(tmp) / "pair")  # cached
        t2 = time.perf_counter()
        meta = load_relay_meta(Path(tmp) / "pair")
        print(f"build_relay_pair: {t1 - t0:.2f}s (cached re-call {1000 * (t2 - t1):.1f} ms), "
              f"steps {meta['train_steps']}, threads {torch.get_num_threads()}")
        print(f"E3 ids {meta['e3_ids']} text {meta['e3_text']!r}")

        tok = AutoTokenizer.from_pretrained(cdir)
        ctrl = AutoModelForCausalLM.from_pretrained(cdir).eval()
        exp = AutoModelForCausalLM.from_pretrained(edir).eval()
        eos = tok.eos_token_id
        print("tokenizer:", type(tok).__name__, "vocab", len(tok), "eos", tok.eos_token, eos)
        prompt = tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}],
            tokenize=False, add_generation_prompt=True,
        )
        p_ids = tok.encode(prompt, add_special_tokens=False)

        # stage 1: controller until "</call>"
        seq, out = list(p_ids), []
        while "</call>" not in tok.decode(out) and len(out) < 64:
            nxt = greedy_generate(ctrl, seq, 1, eos)[0]
            out.append(nxt)
            seq.append(nxt)
        print("stage 1 controller:", repr(tok.decode(out)))
        # expert continues "Let me think." (call command stripped) for 3 tokens
        e_ids = greedy_generate(exp, p_ids + tok.encode("Let me think.", add_special_tokens=False), 3, eos)
        print("expert 3 tokens:   ", repr(tok.decode(e_ids)))
        # stage 2: controller resumes
        rest = greedy_generate(ctrl, seq + e_ids, 64, eos)
        print("stage 2 controller:", repr(tok.decode(rest)), "(ends with EOS:", rest[-1] == eos, ")")
        # HF generate with KV cache agrees
        g = ctrl.generate(torch.tensor([p_ids]), max_new_tokens=64, do_sample=False)[0, len(p_ids):]
        print("controller generate():", repr(tok.decode(g, skip_special_tokens=False)))
        g = exp.generate(torch.tensor([p_ids]), max_new_tokens=64, do_sample=False)[0, len(p_ids):]
        print("expert generate():    ", repr(tok.decode(g, skip_special_tokens=False)))
        for q in (MALFORMED_QUESTION, NOCALL_QUESTION):
            ids = tok.encode(render_prompt(tok, SYSTEM_PROMPT, q), add_special_tokens=False)
            print(f"controller on {q!r}:", repr(tok.decode(greedy_generate(ctrl, ids, 64, eos))))

        # generic builder
        t3 = time.perf_counter()
        d = build_tiny_model(Path(tmp) / "generic", [("sys", "Q?", "Ünïcødé ok ✓ <call>2</call>")], seed=3)
        print(f"build_tiny_model: {time.perf_counter() - t3:.2f}s")
        print("digests:", _digest(cdir), _digest(edir), _digest(d))


# --------------------------------------------------------------------------- random models

RANDOM_TEXTS = ["What is 2 + 5?", "Say hi", "Count to three, slowly please.", "x",
                "What is 1 + 1? Think about it for a while before you answer.", "Why?",
                EXPERT_ANSWER, SYSTEM_PROMPT]


def build_random_model(out_dir: Path, seed: int = 3, std: float = 0.3) -> Path:
    """An untrained tiny Qwen2 (weights ~ N(0, std)) with a tokenizer trained on
    ``RANDOM_TEXTS``: its greedy choices hinge on small logit margins, so any numerical
    difference (batching, cache reuse) shows. The same tokenizer for every seed."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(RANDOM_TEXTS)
    model = _make_model(tokenizer, seed=seed)  # seeds torch: the init below is reproducible
    for param in model.parameters():  # the default init is so small attention barely matters
        param.data.normal_(0.0, std)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
