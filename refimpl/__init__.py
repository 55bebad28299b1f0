"""paligemma-ref: a NumPy reference implementation of keras-hub's PaliGemmaBackbone.

    from refimpl import PaliGemmaBackbone
    model = PaliGemmaBackbone.from_preset("path/to/preset")       # config.json + model.weights.h5
    hidden = model({"images": ..., "token_ids": ..., "padding_mask": ..., "response_mask": ...})
"""

from refimpl.config import ConfigError, PaliGemmaConfig, count_params
from refimpl.dtypes import Policy
from refimpl.model import PaliGemmaBackbone

__all__ = ["ConfigError", "PaliGemmaBackbone", "PaliGemmaConfig", "Policy", "count_params"]
__version__ = "0.1.0"
