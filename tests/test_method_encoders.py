"""Every pretraining method's encoder loads into fine-tuning and linear probing with init_from.

Each method is pretrained for one step on the digits (real Orbax checkpoint on disk); the
downstream tasks then build their models from that workdir, and the weights they start from must
be the pretrained encoder's, bit for bit. MAE's case is in tests/test_classify.py.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import droppos, simmim, splitmask
from mae_jax import tasks
from mae_jax import workdir as workdirs
from conftest import flat, task_config

# ConvMAE's encoder -> ConvViT: tests/test_convmae.py::test_convvit_starts_from_the_pretrained_encoder;
# it costs two minutes here.
CONFIGS = {"simmim": simmim, "splitmask": splitmask, "droppos": droppos}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pretrained(request, tmp_path_factory, digits_data_dir):
  """(method name, image size, workdir) after one pretraining step of that method's demo config."""
  name = request.param
  c = CONFIGS[name].get_config("tiny")
  c.unlock()
  size = 32 if name == "convmae" else 16  # ConvMAE's stage 3 has stride 16.
  c.update(image_size=size, batch_size=16, total_steps=1, warmup_epochs=0.0,
           log_every_steps=1, checkpoint_every_steps=1)
  c.dataset.data_dir = digits_data_dir
  c.model.decoder_depth = 1
  workdir = str(tmp_path_factory.mktemp(name))
  tasks.pretrain(c, workdir, devices=jax.devices()[:1])
  return name, size, workdir


def test_linear_probe_and_finetune_start_from_the_pretrained_encoder(pretrained, digits_data_dir):
  name, size, workdir = pretrained
  encoder = flat(workdirs.load_params(workdir)[0]["encoder"])
  images = jnp.zeros((1, size, size, 3))

  probe = tasks.downstream_trainable(task_config("linprobe", workdir, digits_data_dir))
  params, model_state = probe.init_state(jax.random.PRNGKey(0), images)
  params, model_state = probe.initial_weights(params, model_state)
  chex.assert_trees_all_equal(flat(model_state["frozen"]["encoder"]), encoder, strict=True)
  logits = probe.logits(params, model_state, images)  # through the method's own feature.
  assert logits.shape == (1, 10) and np.isfinite(np.asarray(logits)).all()

  tune = tasks.downstream_trainable(task_config("finetune", workdir, digits_data_dir))
  params, model_state = tune.init_state(jax.random.PRNGKey(0), images)
  got = flat(tune.initial_weights(params, model_state)[0])
  # Everything but the final norm (average pooling uses a fresh fc_norm) and ConvMAE's
  # multi-scale fusion convolutions (pretraining only) arrives in the classifier unchanged.
  dropped = {"norm/bias", "norm/scale"}
  if name == "convmae":
    dropped |= {f"stage{s}_output_decode/{p}" for s in (1, 2) for p in ("kernel", "bias")}
  assert set(encoder) - set(got) == dropped, name
  copied = [k for k in encoder if k in got]
  for k in copied:
    assert np.array_equal(encoder[k], got[k]), (name, k)
  assert "head/kernel" in got
