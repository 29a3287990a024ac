"""Online encoding: train.py from raw images and captions, the frozen DC-AE and Gemma-2 inside the step.

`config.encoders = PIPELINE_DIR` (a diffusers-format Sana directory: vae/, text_encoder/, tokenizer/ and
its prompt settings) with an image source (`data.source = "folder:DIR"` or `"tfds:NAME"`). The hosts
decode images (grain) and tokenize captions, the CHI in front as SanaPipeline does
(`PromptEncoder.positive_tokens`); the devices run the DC-AE encoder and Gemma-2 in the jitted step, their
weights in `config.dtype`, sharded on the run's mesh by their logical axes like the DiT's, neither
differentiated nor given optimizer state. What the step then trains on is what precompute would have
stored: latents times the scaling factor, and the text encoder's states at the kept positions. Caption
dropout swaps in the empty caption's encoding, computed once.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sana_jax import parallel


class OnlineEncoders:
  """The frozen encoders of a run: host-side tokenization, device-side `encode`, and their sharded weights."""

  def __init__(self, path, mesh, rules, *, dtype):
    from sana_jax.data.precompute import encoder_parts
    vae, self.prompts = encoder_parts(path, dtype=dtype, mesh=mesh, rules=rules)
    self.scaling_factor = float(vae.scaling_factor)
    self._vae_graph, vae_state = nnx.split(vae)
    self._text_graph, text_state = nnx.split(self.prompts.text_encoder)
    self.shardings = {"vae": parallel.state_shardings(vae_state, mesh, rules),
                      "text": parallel.state_shardings(text_state, mesh, rules)}
    self.params = jax.device_put({"vae": vae_state, "text": text_state}, self.shardings)
    self.mesh, self.rules = mesh, rules  # encode traces under them, so activations stay split over the batch
    _, _, self._keep = self.prompts.positive_tokens([""])

  def host_batch(self, batch):
    """An image batch of the data loader ({"images", "captions"}) -> the step's inputs: images, and the
    captions' token ids and mask [b, T]."""
    ids, mask, _ = self.prompts.positive_tokens([str(c) for c in batch["captions"]])
    return {"images": np.asarray(batch["images"], np.float32), "ids": ids.astype(np.int32),
            "tokens_mask": mask.astype(np.int32)}

  def null_text(self):
    """(y f32 [L, Dy], mask i32 [L]): the empty caption without CHI, as precompute stores it."""
    y, mask = self.prompts.encode_negative([""])
    return np.asarray(y, np.float32)[0], np.asarray(mask, np.int32)[0]

  def encode(self, params, batch):
    """Inside the step: {"latents" f32, "y" f32, "mask"} of the host batch, constants to the gradient."""
    vae = nnx.merge(self._vae_graph, params["vae"])
    text = nnx.merge(self._text_graph, params["text"])
    with parallel.use_mesh(self.mesh, self.rules):
      latents = vae.encode(batch["images"]).astype(jnp.float32) * self.scaling_factor
      y = text(batch["ids"], batch["tokens_mask"])[:, self._keep].astype(jnp.float32)
    return {"latents": jax.lax.stop_gradient(latents), "y": jax.lax.stop_gradient(y),
            "mask": batch["tokens_mask"][:, self._keep]}
