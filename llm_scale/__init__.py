"""The LLM tier: every fedlora rule on real pretrained transformers through ``transformers`` + ``peft``.

``config`` (the experiment dataclass; shipped configs in ``configs/``), ``data`` / ``commonsense`` /
``tasks`` (datasets and splits), ``models`` (offline model loading), ``bridge`` (a peft model ↔ the round
loop's state), ``batches`` and ``cache`` (tokens, batches, the frozen-layer cache), ``engine`` (local
training and evaluation), ``run`` / ``export`` (one run → JSON, the global → ``PeftModel.from_pretrained``),
``bench`` (``make bench-llm``). Command line: ``python -m llm_scale --help``.
"""
