import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # shared test helpers (rule_cases.py)
torch.set_num_threads(1)  # small ops; two threads on a busy 2-core machine only contend
