import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported: without a CUDA GPU, run its kernels
# through the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
