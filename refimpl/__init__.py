"""paligemma-ref: a NumPy reference implementation of keras-hub's PaliGemmaBackbone.

    from refimpl import PaliGemmaBackbone
    model = PaliGemmaBackbone.from_preset("path/to/preset")       # config.json + model.weights.h5
    hidden = model({"images": ..., "token_ids": ..., "padding_mask": ..., "response_mask": ...})
"""

from refimpl.config import ConfigError, PaliGemmaConfig, count_params
from refimpl.dtypes import Policy
from refimpl.model import PaliGemmaBackbone


def __getattr__(name):  # the causal LM pulls in sentencepiece; import it only when asked for
    if name == "PaliGemmaCausalLM":
        from refimpl.causal_lm import PaliGemmaCausalLM
        return PaliGemmaCausalLM
    raise AttributeError(f"module 'refimpl' has no attribute {name!r}")


__all__ = ["ConfigError", "PaliGemmaBackbone", "PaliGemmaCausalLM", "PaliGemmaConfig", "Policy", "count_params"]
__version__ = "0.1.0"
