"""Pretrain the GPT: `python scripts/train.py --help`. Everything lives in model/training.py.

    python scripts/train.py                                    # tiny model, built-in corpus, CPU, minutes
    python scripts/train.py --fused                            # the same on the Triton kernels
    torchrun --nproc_per_node 2 scripts/train.py --device cpu  # DistributedDataParallel (gloo on CPU)
    # the book's chapter 5 (constant lr 4e-4 on the-verdict.txt, 10 epochs, train loss < 1):
    python scripts/train.py --model gpt2-124M --data ../shared/data/the-verdict.txt --context-length 256 \\
        --batch-size 2 --epochs 10 --lr 4e-4 --weight-decay 0.1 --dropout 0.1 --stride 256 \\
        --warmup-steps 0 --min-lr 4e-4 --grad-clip 0 --out runs/chapter5
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from model.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
