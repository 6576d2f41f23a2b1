"""examples/quickstart.ipynb runs top to bottom (nbclient, this interpreter's kernel) and shows
what it says: two figures, the reconstruction error, and a k-NN accuracy above chance."""

import os
import re

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def test_quickstart_notebook_executes(tmp_path, digits_data_dir):
  path = os.path.join(REPO, "examples", "quickstart.ipynb")
  nb = nbformat.read(path, as_version=4)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
      "commit the notebook without outputs"
  env = {"MAE_JAX_DATA_DIR": digits_data_dir, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    from ipykernel.kernelspec import write_kernel_spec
    spec_dir = write_kernel_spec(str(tmp_path / "kernel"))  # this interpreter, not PATH's
    from jupyter_client.kernelspec import KernelSpecManager
    ksm = KernelSpecManager()
    ksm.install_kernel_spec(spec_dir, "mae_jax_test", prefix=str(tmp_path / "jupyter"))
    os.environ["JUPYTER_PATH"] = str(tmp_path / "jupyter" / "share" / "jupyter")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="mae_jax_test",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert len(images) == 2, text
  assert "Pretrained(" in text and "hidden-pixel MSE" in text and "attention distance" in text
  accuracy = float(re.search(r"k-NN accuracy: ([0-9.]+)", text).group(1))
  assert accuracy > 0.2, text  # chance is 0.1
