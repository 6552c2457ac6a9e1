"""torchrun worker of tests/test_fsdp.py: a tiny Llama with noisy layers, sharded with FSDP2
(``fully_shard`` per decoder layer and at the root), trained two noise-injection steps on CPU (gloo).
Rank 0 writes the chip logits before and after training and the full (unsharded) trained weights."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard

import nft_cuda

CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 101,
    "max_position_embeddings": 64,
}
SEED, CHIP = 7, 3
IDS = torch.arange(8).unsqueeze(0)


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    return nft_cuda.convert(transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)), nft_cuda.Variation(0.1))


def chip_logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    nft_cuda.set_instance(model, seed=SEED, instance=CHIP)
    with torch.no_grad():
        return model(IDS).logits


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = build()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    before = chip_logits(model)
    nft_cuda.set_noise_mode(model, "train")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(100 + rank)  # each rank its own batch and its own train-mode draws
    for _ in range(2):
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 8))
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = chip_logits(model)
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({"before": before, "after": after, "weights": full}, out / "fsdp.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
