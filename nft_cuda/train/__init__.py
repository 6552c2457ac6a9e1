"""NeFT training: the loss, the methods (clean, noise injection, OVF, IRS) and the trainer."""

from nft_cuda.train.irs import IRSHead, IRSModel
from nft_cuda.train.loss import feedback_logits, nft_loss
from nft_cuda.train.methods import IRS, METHODS, OVF, Clean, Method, NoiseInjection, build_method, default_beta

__all__ = ["IRS", "IRSHead", "IRSModel", "METHODS", "OVF", "Clean", "Method", "NoiseInjection", "build_method",
           "default_beta", "feedback_logits", "nft_loss"]
