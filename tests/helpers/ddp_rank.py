"""One rank of the DDP test: fine-tune with the Python API under torchrun, save this rank's weights.

    torchrun --standalone --nproc_per_node 2 tests/helpers/ddp_rank.py STUDENT TEACHER DATA.npz OUT_DIR BATCHNORM(0|1)
"""
import os
import sys

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcc.finetuning import finetune

student, teacher, data, out, batchnorm = sys.argv[1:6]
tuned, history = finetune(onnx.load(student), onnx.load(teacher), data, epochs=2, lr=3e-3, batch_size=8, seed=3,
                          batchnorm=batchnorm == "1")
weights = {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}
np.savez(os.path.join(out, f"rank{os.environ['RANK']}.npz"), **weights)
assert history["world_size"] == int(os.environ["WORLD_SIZE"]), history
