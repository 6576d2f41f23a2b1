"""Seeing what masked image modeling learns.

`python -m mae_jax.analyze --workdir=PRETRAIN_WORKDIR [--what=...]` writes PNG figures and the
numbers behind them as JSON (`mae_jax.analyze.run`): reconstructions, averaged attention distance
and head diversity per layer and head, linear CKA between layers, and DropPos's position
predictions. During training, the held-out loss and reconstruction images are an evaluator
(`mae_jax.evaluators.heldout`). `metrics` needs neither matplotlib nor a workdir.
"""
