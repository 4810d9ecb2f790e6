"""Plain-PyTorch reference models with the official parameter names, and reference generation."""
from .gpt import Transformer, group_causal_mask, load_prior_checkpoint
from .generate import GenerationOutput, generate
from .sampling import sample, top_k_top_p_filtering
from .tokenizer import VQModel, load_tokenizer_checkpoint, resize_images
from .datasets import FashionMNISTDataset, ImageFolderDataset, load_fashion_mnist
