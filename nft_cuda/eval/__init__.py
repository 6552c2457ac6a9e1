"""Monte-Carlo robustness evaluation (DESIGN §6, §7): accuracy statistics under device variation and
the expected KL divergence (EKL) over chip instances, with JSON / CSV / PNG reports.

* :func:`monte_carlo` — R chip instances per σ_d, several instances per pass, sharded over
  ``torch.distributed`` ranks when initialised; results bit-identical whatever the batching/processes
  (one-instance calls; a folded pass of stacked calls matches to DESIGN §6 tolerances);
* :func:`expected_kl`, :class:`EKLAccumulator`, :func:`accuracy_stats` — the metrics;
* :func:`build_report`, :func:`write_json`, :func:`write_csv`, :func:`plot_results` — the reports;
* :func:`eval_checkpoints` — exported checkpoints × σ_d sweep → report files (the body of ``nft eval``);
* :class:`EvalConfig` — the settings of both in one frozen object (``config=EvalConfig(...)``);
* :mod:`~nft_cuda.eval.tails` (percentile chips), :mod:`~nft_cuda.eval.worst_case` (the worst chip in a
  bound), :mod:`~nft_cuda.eval.mitigation` (write-verify, BatchNorm recalibration), :mod:`~nft_cuda.eval.lm`
  (language models: perplexity over chips).
"""

from nft_cuda.eval import lm, mitigation, tails, worst_case
from nft_cuda.eval.config import EvalConfig
from nft_cuda.eval.metrics import EKL_BLOCK, EKLAccumulator, accuracy_stats, entropy, expected_kl
from nft_cuda.eval.monte_carlo import instance_logits, monte_carlo
from nft_cuda.eval.report import build_report, plot_results, read_json, write_csv, write_json
from nft_cuda.eval.run import TensorBatches, eval_checkpoints, load_test_set

__all__ = [
    "EKL_BLOCK",
    "EKLAccumulator",
    "EvalConfig",
    "TensorBatches",
    "accuracy_stats",
    "build_report",
    "entropy",
    "eval_checkpoints",
    "expected_kl",
    "instance_logits",
    "lm",
    "mitigation",
    "tails",
    "worst_case",
    "load_test_set",
    "monte_carlo",
    "plot_results",
    "read_json",
    "write_csv",
    "write_json",
]
