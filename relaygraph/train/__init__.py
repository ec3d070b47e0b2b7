"""Training the learned call token (RelayLLM): warm-up SFT, teacher-pass filtering, GRPO.

- :mod:`relaygraph.train.rewards`: the simple and difficulty-aware rewards (plain functions);
- :mod:`relaygraph.train.warmup`: self-sampled responses with ``<call>n</call>`` inserted, SFT;
- :mod:`relaygraph.train.filtering`: keep questions the expert solves often enough;
- :mod:`relaygraph.train.grpo`: GRPO whose rollouts are real relay runs;
- :mod:`relaygraph.train.cli`: ``relaygraph train warmup | filter | grpo``.

The heavy dependencies (trl, datasets, peft) come with ``pip install 'relaygraph[train]'``
and are imported only when a stage runs.
"""
