"""dvlm: turn autoregressive vision-language models into fast block-diffusion VLMs.

    import dvlm
    model = dvlm.load("path/to/checkpoint")
    out = model.generate("What colour is the circle?", images=[image], decoder="block")
"""

from dvlm.model.quantize import quiet_torchao_import

quiet_torchao_import()  # before anything imports transformers, which imports torchao when installed

from dvlm.api import DVLM, load
from dvlm.config import DecodeConfig, DiffusionConfig, TrainConfig
from dvlm.decode.output import GenerationOutput

__all__ = ["DVLM", "DecodeConfig", "DiffusionConfig", "GenerationOutput", "TrainConfig", "load"]
__version__ = "0.1.0"
