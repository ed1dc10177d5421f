"""python -m ncu.bench speed | sinkhorn | robustness"""
import sys

from ncu.bench import main

sys.exit(main())
