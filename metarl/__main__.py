"""`python -m metarl` runs meta-training, like `python -m metarl.train`."""

from metarl.train import main

main()
