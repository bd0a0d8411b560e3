"""Time to first token of a real transformers model with and without kvbm.

The same job as ``kvbm bench --engine hf``: a random Llama (seeded, fp32, CPU; nothing
is downloaded) on a multi-turn conversation, on one long shared prefix (8K tokens by
default) and on prompts that share nothing. Each figure is printed beside its limit
measured in the same run (memcpy speed for the loaded bytes, the model's compute for
the rest of the prompt); see ``kvbm_bench/hf.py``.

Run: ``python bench/hf.py [--json] [--config chain.yaml] [--hf-prefix-tokens 8192]
[--hf-layers 4] [--hf-hidden 512] [--hf-plot kvbm-bench-hf.png] …`` (``--help`` lists all).
"""

from __future__ import annotations

import argparse
import sys

import kvbm_bench.hf as hf_bench


def main(argv: list[str] | None = None) -> int:
    """Parse the options and run the benchmark; the exit code is ``run_hf_bench``'s."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--config", help="YAML whose 'tiers' is the chain (default: one host tier)")
    hf_bench.add_arguments(p)
    return hf_bench.run_hf_bench(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
