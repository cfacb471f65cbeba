"""An accelerate training script protected by aptbundle, run by the tests as a process:

    python tests/protected_acc.py PROJECT_DIR STORE [STEPS]

save_state every 10 steps (automatic checkpoint naming); ``protect`` and ``restore`` are the
aptbundle lines. The data of each step comes from the step's number, so a resumed loop sees what
the uninterrupted one saw. APTBUNDLE_TEST_STEP_DELAY slows each step down.
"""

import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from aptbundle.integrations.accelerate import protect, restore

out, store = Path(sys.argv[1]), sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 30
set_seed(0)
acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(out), automatic_checkpoint_naming=True))
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, opt = acc.prepare(model, opt)
guard = protect(acc, store)
path = restore(store, out.name, out, acc)
start = (int(path.rsplit("_", 1)[1]) + 1) * 10 if path else 0
for step in range(start + 1, steps + 1):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 1, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), y)
    acc.backward(loss)
    opt.step()
    opt.zero_grad()
    time.sleep(float(os.environ.get("APTBUNDLE_TEST_STEP_DELAY", "0")))
    if step % 10 == 0:
        acc.save_state()
    if guard.should_stop:
        break
guard.close()
torch.save({k: v.clone() for k, v in acc.unwrap_model(model).state_dict().items()}, out / "final.pt")
