"""
What a torchrun process does beside training: every process stops with the first one on a run it refuses, and at
the end the process group is destroyed only after gloo's worker threads let go of every
collective, so that the interpreter never finalizes while one of them still needs it.

Why: torch keeps a Python object in the thread state of each collective started inside backward (DDP's all-reduce,
FSDP's reduce-scatter). The gloo worker that finishes one frees it, which takes the GIL; a thread that asks for the
GIL while Python 3.11 is finalizing is ended inside a C++ destructor, and the process dies with SIGABRT
("terminate called without an active exception") after it has done all its work.
"""

import os

import torch
import torch.distributed as dist

from core.commit import CheckpointError, lock_writer

LAST_BARRIER = [] # the final barrier's handle: it holds the collectives before it, and dies with the main thread


def end_process_group():
    """ barrier, then destroy_process_group; the collectives are freed by the main thread, under the GIL """
    # waiting releases the GIL, so a worker that finished a collective frees it now; the handle keeps the
    # collectives the barrier waited for alive until the main thread drops them at exit
    done = dist.barrier(async_op=True)
    done.wait()
    LAST_BARRIER.append(done)
    dist.destroy_process_group()


def lock_for_the_run(out_dir, take, device):
    """
    The writer lock of out_dir for the whole run, taken by this process when `take` (the first process of a run that
    saves): a second run saving there would undo this one's saves. Under torchrun every process learns the outcome,
    so the others stop beside its message, not in the next collective.
    """
    refusal = None
    if take and os.path.isdir(os.path.dirname(os.path.abspath(out_dir))): # else the first save makes and locks it
        try:
            lock_writer(out_dir)
        except CheckpointError as e:
            refusal = e
    if dist.is_initialized():
        refused = torch.tensor([refusal is not None], dtype=torch.int32, device=device)
        dist.broadcast(refused, src=0)
        if refused.item() and refusal is None:
            refusal = CheckpointError(f'{out_dir} is being written by another run (process 0 names it)')
    if refusal:
        raise refusal
