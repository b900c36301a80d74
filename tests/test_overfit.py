"""A tiny model overfits one real batch of the bundled sample (log-mel + face crops): masked L1 falls by > 90%."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from avt_jax import config_lib, input_pipeline, masking
from avt_jax.models import avt


def test_tiny_model_overfits_one_real_batch():
  ds = input_pipeline.make_dataset(config_lib.SAMPLE, split="train", global_batch_size=4, seed=0, max_tokens=8,
                                   process_index=0, process_count=1)
  batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
  assert batch["visual"].dtype == jnp.uint8 and batch["audio"].shape[-1] == 80  # real log-mel and face crops
  cfg = avt.model_config(
      "tiny", width=64, num_heads=4, num_layers=1, audio_frontend=dict(type="logmel", channels=(16, 16)),
      visual_frontend=dict(type="face", channels=(8, 16)), audio_target_dim=batch["audio_target"].shape[-1],
      visual_target_dim=batch["visual_target"].shape[-1])
  model = avt.PretrainModel(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), batch)["params"])
  # One fixed masking plan with more masked frames (ratio 0.2): the model must memorise the batch's targets.
  masked, plan = masking.mask_batch(jax.random.key(1), batch, ratio=0.2)
  assert int(plan.selected.sum()) >= 8
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      return masking.pretrain_loss(model.apply({"params": p}, masked, deterministic=True), batch, plan)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(300):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
