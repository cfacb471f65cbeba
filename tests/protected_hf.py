"""A training script protected by aptbundle, as a user writes it (run by the tests as a process):

    python tests/protected_hf.py OUTPUT_DIR STORE [STEPS]

A tiny GPT-2 from a config trained by the Hugging Face Trainer, a checkpoint every 10 steps,
an evaluation (and so a best checkpoint) every 10, save_total_limit 2; the two aptbundle lines
are the callback and restore. APTBUNDLE_TEST_STEP_DELAY slows each step down so that a test can
kill it between two saves.
"""

import os
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from aptbundle.integrations.transformers import AptbundleCallback, restore
from frameworks import token_data

logging.set_verbosity_error()
out, store = Path(sys.argv[1]), sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 40


Data = token_data()  # the data of the tests' other GPT-2 runs (tests/ is on the path: the script is there)


class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(float(os.environ.get("APTBUNDLE_TEST_STEP_DELAY", "0")))


torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
args = TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=10, per_device_train_batch_size=4,
                         logging_steps=5, eval_strategy="steps", eval_steps=10, metric_for_best_model="loss",
                         save_total_limit=2, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                         disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=Data(160), eval_dataset=Data(16),
                  callbacks=[Slow(), AptbundleCallback(store)])
trainer.train(resume_from_checkpoint=restore(store, out.name, out))
trainer.save_model(str(out / "final"))
