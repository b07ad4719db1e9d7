"""inference-perf (the Gateway API Inference Extension's benchmark tool) as an alternative
load driver for the harness: `env` builds its Python 3.12 venv and an offline tokenizer,
`config` maps a bench scenario onto its config, `run` drives the harness' routers with it,
`summary` reads its reports back."""
