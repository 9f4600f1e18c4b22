#!/usr/bin/env python3
"""Compare shared and per-modality thresholds of a vision-language model at equal target sparsity.

For each target sparsity, calibrate twice on the same image+text samples and the same fit / held-out split:
once with shared thresholds and once with `--per-modality`. Both runs print one JSON line with the held-out
sparsity (overall and by modality) and retention. Usage, from the repository root:

    python scripts/compare_modality_thresholds.py MODEL_DIR [--targets 0.2 0.3 0.4] [--dataset builtin-images]

`MODEL_DIR` is a local vision-language model directory with its processor files. The run writes nothing.
"""

from __future__ import annotations

import argparse
import json
import logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="local vision-language model directory")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.2, 0.3, 0.4], help="target sparsities")
    parser.add_argument("--dataset", default=None, help="image+text dataset (default: builtin-images)")
    parser.add_argument("--num-samples", type=int, default=28, help="image+text samples, fit + held-out")
    parser.add_argument("--policy", default="allocated", choices=("allocated", "uniform"))
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from gemoe_cli.calibration.pipeline import run_calibration

    for target in arguments.targets:
        for per_modality in (False, True):
            outcome = run_calibration(
                arguments.model,
                dataset=arguments.dataset,
                num_samples=arguments.num_samples,
                seq_len=256,
                batch_size=1,
                seed=arguments.seed,
                heldout_fraction=0.25,
                target_sparsity=target,
                min_retention=None,
                metric="nll",
                k_min=1,
                k_max=None,
                renormalize="preserve_mass",
                policy=arguments.policy,
                device="auto",
                dtype="auto",
                show_progress=False,
                per_modality=per_modality,
            )
            heldout = outcome.result.heldout
            record = {
                "target_sparsity": target,
                "thresholds": "per-modality" if per_modality else "shared",
                "heldout_sparsity": round(heldout.sparsity, 4),
                "heldout_modality_sparsity": {k: round(v, 4) for k, v in (heldout.modality_sparsity or {}).items()},
                "nll_retention": round(heldout.retention("nll"), 5),
                "exact_match": heldout.exact_match,
                "heldout_answer_tokens": heldout.tokens,
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
