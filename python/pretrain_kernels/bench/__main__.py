import sys

from pretrain_kernels.bench.cli import main

sys.exit(main())
