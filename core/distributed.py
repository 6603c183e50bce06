"""
The end of a torchrun process: the process group is destroyed only after gloo's worker threads let go of every
collective, so that the interpreter never finalizes while one of them still needs it.

Why: torch keeps a Python object in the thread state of each collective started inside backward (DDP's all-reduce,
FSDP's reduce-scatter). The gloo worker that finishes one frees it, which takes the GIL; a thread that asks for the
GIL while Python 3.11 is finalizing is ended inside a C++ destructor, and the process dies with SIGABRT
("terminate called without an active exception") after it has done all its work.
"""

import torch.distributed as dist

LAST_BARRIER = [] # the final barrier's handle: it holds the collectives before it, and dies with the main thread


def end_process_group():
    """ barrier, then destroy_process_group; the collectives are freed by the main thread, under the GIL """
    # waiting releases the GIL, so a worker that finished a collective frees it now; the handle keeps the
    # collectives the barrier waited for alive until the main thread drops them at exit
    done = dist.barrier(async_op=True)
    done.wait()
    LAST_BARRIER.append(done)
    dist.destroy_process_group()
