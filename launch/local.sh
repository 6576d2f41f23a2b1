#!/usr/bin/env bash
# One machine, no setup needed: creates .venv, installs mae_jax into it (once, and again when
# setup.cfg changes), then runs the job.
#
#   bash launch/local.sh train [--config=configs/mae.py] [--workdir=workdirs/mae_tiny] [--config.KEY=VALUE ...]
#   bash launch/local.sh test  [pytest args ...]   # MAE_JAX_TEST_WORKERS=0: no pytest workers
#   bash launch/local.sh bench --config=configs/mae.py:vit_s16 [--batch_size=N]
#   bash launch/local.sh python ARGS...      # the venv's python, e.g. -m mae_jax.main ...
#
# Environment: PYTHON (interpreter to build the venv from, default python3), MAE_JAX_VENV (venv
# path, default .venv in the repository), MAE_JAX_EXTRAS (pip extras, default "dev", and
# "dev,torch,hf,wandb" for `test`, whose conversion parity tests need torch, timm and
# transformers; add "cuda" on a GPU box or "tpu" on a TPU VM, e.g. MAE_JAX_EXTRAS=dev,cuda).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MAE_JAX_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${MAE_JAX_EXTRAS:-dev}"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[local.sh] creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  # Reinstall when the dependency list or the extras change.
  local want have=""
  want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$EXTRAS"
  [ -f "$VENV/.mae_jax_install" ] && have="$(cat "$VENV/.mae_jax_install")"
  if [ "$want" != "$have" ]; then
    echo "[local.sh] installing mae_jax[$EXTRAS] into $VENV (about a minute)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "${ROOT}[${EXTRAS}]"
    echo "$want" > "$VENV/.mae_jax_install"
  fi
}

cmd="${1:-train}"
[ $# -gt 0 ] && shift
cd "$ROOT"
case "$cmd" in
  train)
    setup
    args=("$@")
    has_config=0; has_workdir=0
    for a in "${args[@]+"${args[@]}"}"; do
      case "$a" in
        --config=*) has_config=1 ;;
        --workdir=*) has_workdir=1 ;;
      esac
    done
    [ $has_config = 1 ] || args=(--config=configs/mae.py "${args[@]+"${args[@]}"}")
    [ $has_workdir = 1 ] || args=(--workdir=workdirs/mae_tiny "${args[@]+"${args[@]}"}")
    exec "$VENV/bin/python" -m mae_jax.main "${args[@]}"
    ;;
  test)
    # The parity tests check exports against the real torch, timm and transformers; the W&B
    # writer is tested offline.
    EXTRAS="${MAE_JAX_EXTRAS:-dev,torch,hf,wandb}"
    setup
    # Two pytest workers (MAE_JAX_TEST_WORKERS; 0 runs in this process), each test file on one
    # worker so its module fixtures are built once. Most of the suite is XLA compiling small
    # programs, which uses one core, so two workers on 2 cores take about 0.6-0.8 of the time.
    # pytest exits 5 when it collects nothing: that is a broken checkout, not a pass.
    exec "$VENV/bin/python" -m pytest -q -n "${MAE_JAX_TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  bench)
    setup
    exec "$VENV/bin/python" -m mae_jax.bench "$@"
    ;;
  python)
    setup
    exec "$VENV/bin/python" "$@"
    ;;
  *)
    echo "usage: bash launch/local.sh {train|test|bench|python} [args...]" >&2
    exit 2
    ;;
esac
