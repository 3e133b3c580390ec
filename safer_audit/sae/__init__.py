"""The TopK sparse autoencoder: the module (model), its training (train), and its files (formats).

``TopKSAE`` reads raw hidden states and normalises them itself; ``train_sae`` fits one on
a stream of activation batches; ``TopKSAE.save`` / ``TopKSAE.load`` write our layout (the
SAELens one) and read ours, SAELens's and sparsify's, from safetensors only.
See docs/method.md section 2.
"""

from ..errors import SaeFormatError
from .config import (
    CFG_FILE,
    DIGEST_KEY,
    FORMAT_KEY,
    FORMAT_VERSION,
    LAYER_NORM_EPS,
    NORMALIZATIONS,
    SPARSIFY_WEIGHTS_FILE,
    WEIGHTS_FILE,
    SaeConfig,
)
from .model import ForwardOutput, TopKSAE
from .train import SHUFFLE_BUFFER_TOKENS, TrainStats, default_lr, evaluate_sae, shuffled_batches, train_sae

__all__ = [
    "CFG_FILE", "DIGEST_KEY", "FORMAT_KEY", "FORMAT_VERSION", "LAYER_NORM_EPS", "NORMALIZATIONS",
    "SHUFFLE_BUFFER_TOKENS", "SPARSIFY_WEIGHTS_FILE", "WEIGHTS_FILE", "ForwardOutput", "SaeConfig",
    "SaeFormatError", "TopKSAE", "TrainStats", "default_lr", "evaluate_sae", "shuffled_batches", "train_sae",
]
