"""Post-training quantization of the DiT for inference: W8A8 (int8), FP8 (e4m3) and SVDQuant's W4A4.

`quantize_transformer(model, mode, statistics)` makes the quantized model; `calibrate` gathers the
activation statistics W4A4 needs; SanaPipeline.quantize does both for a pipeline. A quantized
transformer saves and loads like a float one (`sana_jax.quant.saving`).
"""
from sana_jax.quant.model import (  # noqa: F401
    ACTIVATION_LAYERS,
    CALIBRATION_PROMPTS,
    MODES,
    WEIGHT_ONLY_LAYERS,
    check_backend,
    check_mode,
    mode_of,
    quantize_transformer,
    weight_bytes,
)
