"""A checkpoint save killed half-way, from the test's side, so that production code carries no hook.

``dying_save(iteration, die)`` wraps DCP's save: once DCP has written `iteration`'s shards and
`.metadata` into save_checkpoint's temporary directory (``iter_<7 digits>.tmp-<pid>``), `die()`
runs, before anything renames that directory: what a process killed at that moment leaves. An
in-process test installs it with monkeypatch. As a script it runs a training script in this
process with that save ending the process as a kill would (exit code EXIT_CODE, nothing flushed):

    python tests/kill_during_save.py ITERATION pretrain_gpt.py ARGS...
"""

import os
import runpy
import sys

import torch.distributed.checkpoint as dcp

EXIT_CODE = 86


def dying_save(iteration: int, die):
    save = dcp.save
    tmp_prefix = f"iter_{iteration:07d}.tmp-"

    def save_then_die(*args, checkpoint_id=None, **kwargs):
        result = save(*args, checkpoint_id=checkpoint_id, **kwargs)
        if os.path.basename(os.fspath(checkpoint_id)).startswith(tmp_prefix):
            die()
        return result

    return save_then_die


def main():
    iteration, script, *args = sys.argv[1:]
    dcp.save = dying_save(int(iteration), lambda: os._exit(EXIT_CODE))
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT` has it
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
