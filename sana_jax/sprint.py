"""SanaSprintPipeline: Sana-Sprint's 1-4 step text-to-image and image-to-image.

Mirrors diffusers' SanaSprintPipeline and SanaSprintImg2ImgPipeline (SCMScheduler): one transformer
pass per step with the guidance scale as an embedding (no CFG batch), all steps in one jitted scan
(sana_jax.sampling.scm). Unlike diffusers, any step count works with the default angles:
`intermediate_timesteps` is used for two steps only and ignored otherwise.
"""
import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.errors import SanaError
from sana_jax.pipeline import PIPELINES_OWN, BasePipeline, check_generation, check_strength, prng_key
from sana_jax.sampling.scm import INTERMEDIATE_TIMESTEPS, MAX_TIMESTEPS, SIGMA_DATA, scm_denoise, scm_timesteps

DEFAULT_STRENGTH = 0.6  # diffusers' SanaSprintImg2ImgPipeline


class SanaSprintPipeline(BasePipeline):
  _class_name = "SanaSprintPipeline"
  default_steps = 2

  def __init__(self, tokenizer, text_encoder, transformer, vae, *, sampler="scm", sigma_data=SIGMA_DATA, **settings):
    super().__init__(tokenizer, text_encoder, transformer, vae, sampler=sampler, **settings)
    if not transformer.config.guidance_embeds:
      raise SanaError("this transformer has no guidance embedding (guidance_embeds: false): it is not a Sana-Sprint "
                      "model")
    self.sigma_data = sigma_data
    self._generate = jax.jit(self._generate_impl, static_argnames=("start",))

  def encode_prompt(self, prompt, num_images_per_prompt=1, prompt_embeds=None, prompt_attention_mask=None,
                    clean_caption=False, max_sequence_length=None, complex_human_instruction=PIPELINES_OWN):
    """(embeds, mask), repeated per image of a prompt: diffusers' SanaSprintPipeline.encode_prompt, with
    the pipeline's own instruction and length unless given (see SanaPipeline.encode_prompt)."""
    return super().encode_prompt(prompt, False, "", num_images_per_prompt, prompt_embeds, None, prompt_attention_mask,
                                 None, clean_caption, max_sequence_length, complex_human_instruction)[:2]

  def _generate_impl(self, dit, latents, embeds, mask, step_noise, angles, guidance, *, start):
    model = self._dit_model(dit)
    text = model.encode_text(embeds, mask)  # once per generation
    # diffusers' Sprint pipeline gives the model t in [0, 1] as it is; our model multiplies by
    # config.timestep_scale itself (what SanaPipeline does, for the Sprint teacher), so undo it here
    unscale = 1.0 / model.config.timestep_scale

    def velocity(x, t):
      return model(x.astype(model.dtype), jnp.full((x.shape[0],), t * unscale), text=text, guidance=guidance)

    return scm_denoise(velocity, latents, angles, jnp.moveaxis(step_noise, 0, 1), self.sigma_data, start)

  def __call__(self, prompt=None, num_inference_steps=2, timesteps=None, max_timesteps=MAX_TIMESTEPS,
               intermediate_timesteps=INTERMEDIATE_TIMESTEPS, guidance_scale=None, num_images_per_prompt=1,
               height=None, width=None, seed=None, latents=None, prompt_embeds=None, prompt_attention_mask=None,
               output_type="pil", return_dict=True, clean_caption=False, use_resolution_binning=True,
               max_sequence_length=None, complex_human_instruction=PIPELINES_OWN, *, image=None,
               strength=DEFAULT_STRENGTH, step_noise=None):
    """Images for `prompt` (or prompt_embeds) as diffusers' SanaSprintPipeline makes them from the
    same noise: `latents` standard normal [B, h, w, C] (NHWC, before diffusers' scaling by
    sigma_data) and `step_noise` standard normal [num_inference_steps - 1, B, h, w, C] for the
    re-noising between steps; either is drawn from `seed` when not given.

    timesteps: the caller's N + 1 TrigFlow angles, from at most pi/2 down to 0, instead of
    max_timesteps / intermediate_timesteps. guidance_scale: the embedded guidance (default: the
    model directory's, else 4.5).

    Image-to-image (`image`, as SanaPipeline takes it; `strength` in (0, 1]) is diffusers'
    SanaSprintImg2ImgPipeline: the steps from k = int(N - strength * N) on run, starting from
    cos(s) * image latents + sin(s) * noise at angle s = the k-th; step_noise rows of skipped steps
    are unused.
    """
    guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
    check_generation(num_inference_steps, guidance_scale, num_images_per_prompt, output_type)
    asked, size = self._sizes(height, width, use_resolution_binning)
    angles = scm_timesteps(num_inference_steps, max_timesteps, intermediate_timesteps, timesteps)
    embeds, mask = self.encode_prompt(prompt, num_images_per_prompt, prompt_embeds, prompt_attention_mask,
                                      clean_caption, max_sequence_length, complex_human_instruction)
    key = prng_key(seed)
    noise = self._noise(embeds.shape[0], size, key, latents)
    step_noise = self._step_noise(step_noise, num_inference_steps, noise.shape, key)
    start = 0
    if image is None:
      x = noise * self.sigma_data
    else:
      check_strength(strength)
      start = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
      x0 = self._image_latents(self._image_pixels(image, noise.shape[0], size)) * self.sigma_data
      x = np.cos(angles[start]) * x0 + np.sin(angles[start]) * noise * self.sigma_data
    run = lambda x, e, m, n: self._generate(self._dit_inputs(), x, e, m, n, jnp.asarray(angles),
                                            jnp.float32(guidance_scale), start=start)
    x = self._on_devices(run, x, embeds, mask, jnp.moveaxis(step_noise, 1, 0))  # batch first, to split it
    return self._output(x, asked, output_type, return_dict)

  @staticmethod
  def _step_noise(step_noise, steps, shape, key):
    """[steps - 1, *shape] standard normal: the caller's, checked, or drawn from the seed's key."""
    want = (steps - 1, *shape)
    if step_noise is None:
      return seeded_step_noise(key, steps, shape)
    if tuple(np.shape(step_noise)) != want:
      raise SanaError(f"step_noise of shape {tuple(np.shape(step_noise))}; expected {want} "
                      "(num_inference_steps - 1, batch, height, width, channels)")
    return jnp.asarray(step_noise, jnp.float32)


def seeded_step_noise(key, steps, shape):
  """Standard-normal step noise [steps - 1, *shape] from the PRNG key that drew the latents."""
  return jax.random.normal(jax.random.fold_in(key, 1), (steps - 1, *shape), jnp.float32)
