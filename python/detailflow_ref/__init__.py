"""Plain-PyTorch reference models with the official parameter names, and reference generation."""
from .gpt import Transformer, group_causal_mask, load_prior_checkpoint, precompute_freqs_cis_2d
from .generate import GenerationOutput, generate
from .sampling import sample, top_k_top_p_filtering
from .quantizer import VectorQuantizer
from .siglip2 import SiglipDecoder, SiglipEncoder, blocked_attention_mask
from .tokenizer import TRAINING_ONLY_PREFIXES, VQModel, load_tokenizer_checkpoint, resize_images, to_uint8
from .datasets import FashionMNISTDataset, ImageFolderDataset, load_fashion_mnist
