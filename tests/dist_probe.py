"""What tests/test_distributed.py launches under torchrun: ``lifelong-moe`` itself, with each rank's
state written after every training experience (``PROBE_STATES`` dir: rank{r}_exp{i}.safetensors) and,
for the failure tests, one rank killed (``PROBE_KILL``) or stalled (``PROBE_STALL``) as it finishes
training experience ``PROBE_AT``."""
import os
import signal
import sys
import time

from safetensors.torch import save_file

from lifelong_moe.runtime import distributed
from lifelong_moe.cli import main
from lifelong_moe.strategies.template import ContinualTemplate

_train = ContinualTemplate.train


def train(self, experience, *args, **kwargs):
    out = _train(self, experience, *args, **kwargs)
    i, r = experience.task_info.index, distributed.rank()
    if os.environ.get("PROBE_STATES"):
        save_file(self.state_dict(), os.path.join(os.environ["PROBE_STATES"], f"rank{r}_exp{i}.safetensors"))
    if str(i) == os.environ.get("PROBE_AT"):
        if str(r) == os.environ.get("PROBE_KILL"):
            os.kill(os.getpid(), signal.SIGKILL)
        if str(r) == os.environ.get("PROBE_STALL"):
            time.sleep(3600)
    return out


ContinualTemplate.train = train

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
