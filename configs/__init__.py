"""The shipped configs, one file per method or evaluation (`get_config(variant)` in each).

In a wheel these files are the package `mae_jax.configs`; in the checkout they stay in the
top-level `configs/` folder. Entry points take them by short name (`--config=mae:vit_b16`),
resolved by `mae_jax.config_files`.
"""
