"""Run ``python -m training.run`` with one fault injected: ``fault_driver.py FAULT N -- ARGS...``.

FAULT (the N-th occurrence, 1-based, is the one that kills the process with SIGKILL):
  save-partial   while the checkpoint is written: half a zip in the temporary file
  before-rename  the checkpoint's temporary file is complete, not yet renamed
  after-rename   the checkpoint is in place, its log lines not yet written
  log-partial    while the log lines are appended: half a line
  after-log      right after the log lines of a checkpoint
  none           no fault (the environment the test's other runs use)
The thread count is taken from SRNC_TEST_THREADS, so that the floating-point results equal the
test process's.
"""
import os
import signal
import sys

import torch


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    fault, nth, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: fault_driver.py FAULT N -- ARGS..."
    nth = int(nth)
    torch.set_num_threads(int(os.environ.get("SRNC_TEST_THREADS", "1")))
    count = {"n": 0}

    def hit() -> bool:
        count["n"] += 1
        return count["n"] == nth

    if fault == "save-partial":
        original_save = torch.save

        def save(obj, f, *args, **kwargs):
            if hit():
                f.write(b"PK\x03\x04" + b"\0" * 100)
                f.flush()
                _die()
            return original_save(obj, f, *args, **kwargs)

        torch.save = save
    elif fault in ("before-rename", "after-rename"):
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            is_checkpoint = str(dst).endswith("checkpoint.pt")
            if is_checkpoint and fault == "before-rename" and hit():
                _die()
            result = original_replace(src, dst, *args, **kwargs)
            if is_checkpoint and fault == "after-rename" and hit():
                _die()
            return result

        os.replace = replace
    elif fault in ("log-partial", "after-log"):
        from training import step_log

        original_flush = step_log.StepLog.flush

        def flush(self):
            if fault == "log-partial" and self._written < len(self.records) and hit():
                with open(self.folder / "log.jsonl", "a") as f:
                    f.write('{"step": 99, "lo')
                _die()
            result = original_flush(self)
            if fault == "after-log" and hit():
                _die()
            return result

        step_log.StepLog.flush = flush
    else:
        assert fault == "none", fault
    from training.run import main as run_main

    sys.exit(run_main(argv))


if __name__ == "__main__":
    main()
