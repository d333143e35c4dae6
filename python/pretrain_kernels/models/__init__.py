"""Model families built only from the package's public ops and torch.nn:
BertMLM (masked modeling), GPT (next-token prediction), UNet and DiT (denoising)."""
from .bert import BertConfig, BertMLM, pack
from .dit import DiT, DiTConfig
from .gpt import GPT, GPTConfig, KVCache
from .unet import UNet, UNetConfig

__all__ = ["BertConfig", "BertMLM", "pack", "GPT", "GPTConfig", "KVCache", "UNet", "UNetConfig", "DiT", "DiTConfig"]
