"""The wheel works outside the checkout: build sdist + wheel, install into a fresh venv, and from an
unrelated directory train with a short config name, load the result through the Python API,
export Hugging Face and timm folders, and load those with the real timm and transformers.

The fresh venv gets mae_jax only from the wheel. Its dependencies (jax, TensorFlow, torch, ...)
are too large to download here, so the venv sees this environment's site-packages through a
path file, which adds the folder without running its own path files: the checkout's editable
install stays invisible (checked below).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from conftest import REPO

SKIP = (".git", ".venv", "build", "dist", "workdirs", ".pytest_cache", "__pycache__")


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("PYTHONPATH", None)
  return env


def _check(args, cwd, timeout=900) -> str:
  r = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
  return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(venv bin folder, an unrelated working directory) with mae_jax installed from its wheel."""
  pytest.importorskip("build")
  root = tmp_path_factory.mktemp("wheel")
  src = root / "src"
  shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*SKIP, "*.egg-info"))
  # sdist first, then the wheel built from the sdist (what `python -m build` does): a file the
  # sdist leaves out is missing from the wheel too.
  _check([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(root / "dist"),
          str(src)], cwd=root)
  wheels = sorted((root / "dist").glob("mae_jax-*.whl"))
  sdists = sorted((root / "dist").glob("mae_jax-*.tar.gz"))
  assert len(wheels) == 1 and len(sdists) == 1, os.listdir(root / "dist")
  venv = root / "venv"
  _check([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
  python = venv / "bin" / "python"
  purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                            "['purelib'])"], capture_output=True, text=True).stdout.strip()
  with open(os.path.join(purelib, "_outer_dependencies.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  _check([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
          "--no-deps", "--no-index", str(wheels[0])], cwd=root)
  elsewhere = root / "elsewhere"
  elsewhere.mkdir()
  where = _check([str(python), "-c", "import mae_jax, mae_jax.configs; "
                  "print(mae_jax.__file__); print(mae_jax.configs.__file__)"], cwd=elsewhere)
  for line in where.split():
    assert line.startswith(purelib), (line, purelib)  # the wheel's copy, not the checkout's
  return venv / "bin", elsewhere


def test_wheel_trains_loads_and_exports_from_anywhere(installed, digits_data_dir, tmp_path):
  bin_dir, cwd = installed
  for script in ("mae-jax-train", "mae-jax-convert", "mae-jax-analyze", "mae-jax-bench"):
    assert (bin_dir / script).exists(), script
  workdir = tmp_path / "mae_tiny"
  out = _check([str(bin_dir / "mae-jax-train"), "--config=mae", f"--workdir={workdir}",
                "--config.total_steps=3", "--config.log_every_steps=1",
                f"--config.dataset.data_dir={digits_data_dir}"], cwd=cwd)
  assert "step 3/3" in out, out
  # A config file by path works too, and a name that is neither is one line.
  mine = tmp_path / "my_config.py"
  mine.write_text(textwrap.dedent("""\
      from mae_jax.configs import mae
      def get_config(arg=None):
        c = mae.get_config(arg)
        c.total_steps = 2
        return c
      """))
  out = _check([str(bin_dir / "mae-jax-train"), f"--config={mine}:tiny",
                f"--workdir={tmp_path / 'mine'}", f"--config.dataset.data_dir={digits_data_dir}"],
               cwd=cwd)
  assert "step 2/2" in out, out
  r = subprocess.run([str(bin_dir / "mae-jax-train"), "--config=nosuch",
                      f"--workdir={tmp_path / 'x'}"], cwd=cwd, env=_env(), capture_output=True,
                     text=True, timeout=300)
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  assert r.returncode == 2 and len(lines) == 1 and "'nosuch'" in lines[0], r.stderr
  assert not (tmp_path / "x").exists()


def test_setup_cfg_ships_every_package():
  import configparser
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, "setup.cfg"))
  listed = set(cfg["options"]["packages"].split())
  on_disk = {os.path.relpath(d, REPO).replace(os.sep, ".")
             for d, _, files in os.walk(os.path.join(REPO, "mae_jax")) if "__init__.py" in files}
  assert listed == on_disk | {"mae_jax.configs"}
  assert cfg["options"]["package_dir"].split() == ["mae_jax.configs", "=", "configs"]


def test_short_config_names(tmp_path, monkeypatch):
  from mae_jax import config_files
  from mae_jax.errors import UserError
  path, _, variant = config_files.resolve("mae:vit_b16").partition(":")
  assert os.path.samefile(path, os.path.join(REPO, "configs", "mae.py")) and variant == "vit_b16"
  assert config_files.resolve("knn").endswith(os.path.join("configs", "knn.py"))
  assert config_files.resolve("configs/mae.py:tiny") == "configs/mae.py:tiny"  # a path stays
  c = config_files.load("mae:vit_s16", seed=3)
  assert c.model.variant == "S/16" and c.seed == 3
  monkeypatch.chdir(tmp_path)
  (tmp_path / "mae").write_text("")  # a file named like a shipped config is the file
  assert config_files.resolve("mae:tiny") == "mae:tiny"
  assert config_files.resolve_argv(["prog", "--config", "knn", "--config=linprobe:base",
                                    "--config.seed=1"]) == [
      "prog", "--config", config_files.resolve("knn"),
      "--config=" + config_files.resolve("linprobe:base"), "--config.seed=1"]
  with pytest.raises(UserError, match="'maes' is neither a file nor a shipped config .*mae, "):
    config_files.resolve("maes:tiny")
  with pytest.raises(UserError, match="not a Python file"):
    config_files.load("mae:tiny")
