"""
Past one GPU: FSDP2 training (train.py --fsdp=True under torchrun), and the files of its sharded checkpoint (the kind
itself, its reader and writer, is core/sharded.py).

fully_shard splits every Block, and then the rest of the model (embeddings, final norm, the tied head), across
the processes: each holds 1/N of the parameters, gradients and AdamW moments. A save writes the checkpoint as a
bundle directory whose weights and optimizer state are a torch.distributed.checkpoint (DCP) checkpoint, each
process writing its own shards in parallel:

  config.json, tokenizer.json, training_state.json   as in a bundle (training_state.json also says 'shards')
  __R_I.distcp                                        the tensors process R wrote
  .metadata                                           DCP's index of the tensors, written once every shard is
  manifest.json                                       our checksums of every file (computed by the processes,
                                                      gathered to process 0), written last; then the swap

The tensors mean what a bundle's mean, so a checkpoint saved by N processes loads on M, in a single process, and
into any adapter layout: `model/KEY` the merged weights under standard keys (the tied head not repeated),
`adapter/KEY` the LoRA factors (for an exact resume with the same adapters), `optimizer/NAME/FIELD` the AdamW
state by standard parameter name, its hyperparameters in training_state.json.

DCP indexes its files with a pickle; it is read here by an unpickler that allows DCP's own metadata classes and
nothing else, and the file names and sizes it claims are checked before any tensor is read.
"""

import io
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from model import is_lora_factor, standard_key
from core.commit import WRITTEN, CheckpointError, DamagedError, file_checksum, is_plain_name, verify_file

METADATA = '.metadata'
PARTS = ('model', 'adapter', 'optimizer')
HEAD = 'lm_head.weight' # tied to transformer.wte.weight: stored once, as the embedding


def is_shard_file(name):
    return name == METADATA or re.fullmatch(r'__\d+_\d+\.distcp', name) is not None


def is_sharded_dir(path):
    return (Path(path) / METADATA).is_file()


# -----------------------------------------------------------------------------
# training

def shard_model(model, device_type, dtype):
    """ fully_shard per Block, then the root; on a GPU the compute runs in `dtype` and gradients reduce in fp32 """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    low = device_type == 'cuda' and dtype != torch.float32
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_dtensor(tensor):
    return type(tensor).__name__ == 'DTensor'


def is_sharded(model):
    return any(is_dtensor(p) for p in model.parameters())


def load_optimizer_state(model, optimizer, state):
    """
    `state`: tensors by parameter name (the model's own names), for the parameters chosen to keep theirs: full
    tensors, which torch shards like the parameters, or already sharded ones (read_optimizer). The others start
    fresh, exactly as in a single process: the placeholder state torch makes for them is dropped, so AdamW starts
    them at step 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
    groups = get_optimizer_state_dict(model, optimizer)['param_groups'] # this run's hyperparameters, by name
    full = not any(is_dtensor(v) for s in state.values() for v in s.values())
    # strict=False: the parameters left out of `state` are left out on purpose (they start fresh, dropped below)
    set_optimizer_state_dict(model, optimizer, {'state': state, 'param_groups': groups},
                             options=StateDictOptions(full_state_dict=full, strict=False))
    for name, p in model.named_parameters():
        if name not in state:
            optimizer.state.pop(p, None)


def sharded_tensors(model, optimizer):
    """
    What a save writes, on every process (the merge runs on the shards, so this is collective): its DTensors
    under the keys above, and the optimizer's hyperparameters by parameter name (None without an optimizer).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    merged = model.get_merged_state_dict() # raises on NaN/inf before anything is written
    tensors = {f'model/{k}': v for k, v in merged.items() if k != HEAD}
    tensors.update({f'adapter/{k}': v for k, v in model.state_dict().items() if is_lora_factor(k)})
    groups = None
    if optimizer is not None:
        named = get_optimizer_state_dict(model, optimizer)
        for name, fields in named['state'].items():
            tensors.update({f'optimizer/{standard_key(name)}/{field}': v for field, v in fields.items()})
        groups = [{**{k: v for k, v in g.items() if k != 'params'}, 'params': [standard_key(n) for n in g['params']]}
                  for g in named['param_groups']]
    return tensors, groups


def write_shards(directory, tensors, group=None):
    """
    Every process writes its shards into `directory` (process 0's, made by its commit); the processes then
    checksum a share of the files each, and process 0 gets them all, for the manifest its commit writes last.
    `group`: the process group of the save's collectives (None: the default one).
    """
    import torch.distributed.checkpoint as dcp
    # fsyncs each file; .metadata after all shards
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(directory), process_group=group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    names = sorted(n for n in os.listdir(directory) if is_shard_file(n))
    mine = {n: {'size': os.path.getsize(os.path.join(directory, n)), 'xxh3_64': file_checksum(os.path.join(directory, n))}
            for i, n in enumerate(names) if i % world == rank}
    everyone = [None] * world if rank == 0 else None
    dist.gather_object(mine, everyone, dst=0, group=group)
    if rank == 0:
        for entries in everyone:
            WRITTEN.update({os.path.join(directory, n): e for n, e in entries.items()})


def on_all_processes(first, others, group=None):
    """
    Run first() on process 0 (it commits the save: lock, directory, manifest, swap) and others() on the rest;
    first() passes its directory to the others through share(). Every process gets the outcome: process 0's
    error is raised everywhere, so all of them stop, or none.
    """
    box = [None]
    def share(directory):
        box[0] = str(directory)
        dist.broadcast_object_list(box, src=0, group=group)
        return directory
    error = None
    if dist.get_rank(group) == 0:
        try:
            first(share)
        except BaseException as e:
            error = e
        if box[0] is None:
            dist.broadcast_object_list(box, src=0, group=group) # it failed before sharing: the others write nothing
    else:
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is not None:
            others(box[0])
    outcome = [None if error is None else str(error)]
    dist.broadcast_object_list(outcome, src=0, group=group)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])


SAVE_GROUP = [] # the process group of background saves, made at the first


def save_group():
    """ a process group of its own for saves that run in the background, so that their collectives and training's
    never meet on one group (made by every process at once: the first background save is called by all) """
    if not SAVE_GROUP:
        SAVE_GROUP.append(dist.new_group(backend='gloo'))
    return SAVE_GROUP[0]


def staged_shards(tensors):
    """ a copy in CPU memory of each process's own shards (and of its plain tensors): training goes on changing the
    originals while the copy is written """
    from torch.distributed.tensor import DTensor
    def copy(t):
        if is_dtensor(t):
            return DTensor.from_local(t.to_local().detach().to('cpu', copy=True), t.device_mesh, t.placements,
                                      run_check=False, shape=t.shape, stride=t.stride())
        return t.detach().to('cpu', copy=True)
    return {k: copy(v) for k, v in tensors.items()}


# -----------------------------------------------------------------------------
# reading, in one process (no process group needed)

# what DCP's .metadata pickle may name: its own metadata classes, torch's Size and dtypes, a path
ALLOWED = {('torch.distributed.checkpoint.metadata', name) for name in (
    'Metadata', 'MetadataIndex', 'StorageMeta', 'TensorProperties', 'TensorStorageMetadata', 'ChunkStorageMetadata',
    'BytesStorageMetadata', '_MEM_FORMAT_ENCODING')} | {
    ('torch.distributed.checkpoint.filesystem', '_StorageInfo'), ('torch', 'Size'), ('torch.serialization', '_get_layout'),
    ('pathlib', 'PosixPath'), ('pathlib', 'PurePosixPath'), ('collections', 'OrderedDict')}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED or (module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'{module}.{name} is not part of a DCP index')


def read_metadata(directory, manifest):
    """ DCP's index of a sharded checkpoint, checked: every file it names is a shard of this directory, every
    extent inside its file, and the tensors it claims no larger than the bytes that hold them """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    directory = Path(directory)
    verify_file(directory, METADATA, manifest)
    try:
        metadata = MetadataUnpickler(io.BytesIO((directory / METADATA).read_bytes())).load()
        tensors = {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
        extents = list(metadata.storage_data.values())
    except Exception as e:
        raise DamagedError(f'{directory / METADATA} is not an index of tensors this toolkit can read ({e}); the '
                           'sharded checkpoint cannot be trusted') from None
    sizes = {}
    for extent in extents:
        name = extent.relative_path
        if not (is_plain_name(name) and is_shard_file(name) and (directory / name).is_file()):
            raise DamagedError(f'{directory / METADATA} names {name!r} as a shard, which is not a shard file in '
                               f'{directory}: the checkpoint is incomplete or damaged')
        sizes.setdefault(name, (directory / name).stat().st_size)
        if not (0 <= extent.offset and 0 <= extent.length and extent.offset + extent.length <= sizes[name]):
            raise DamagedError(f'{directory / METADATA} places a tensor at bytes {extent.offset}..{extent.offset + extent.length} '
                               f'of {directory / name}, which has {sizes[name]:,}: truncated or damaged')
    claimed = sum(torch.Size(m.size).numel() * m.properties.dtype.itemsize for m in tensors.values())
    if claimed > sum(sizes.values()):
        raise DamagedError(f'{directory / METADATA} claims {claimed:,} bytes of tensors, but its shards hold '
                           f'{sum(sizes.values()):,}: damaged or forged')
    return metadata, tensors


def open_shards(directory, manifest, index=None):
    """
    The checked index, with every shard file verified against the manifest (once per checkpoint read). Under a
    process group every process reads the checkpoint: each verifies a share of the files, and a damaged one stops all.
    """
    metadata, tensors = index or read_metadata(directory, manifest) # (read_metadata's, when the caller has it)
    names = sorted({e.relative_path for e in metadata.storage_data.values()})
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    error = None
    for name in names[rank::world]:
        try:
            verify_file(directory, name, manifest)
        except DamagedError as e:
            error = str(e)
            break
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise DamagedError(error)
    return metadata, tensors


def shapes(shards, part):
    """ the part's tensors as meta tensors: their names, shapes and dtypes, no data """
    return {k[len(part) + 1:]: torch.empty(m.size, dtype=m.properties.dtype, device='meta')
            for k, m in shards[1].items() if k.startswith(f'{part}/')}


def dcp_load(directory, metadata, wanted, no_dist):
    import torch.distributed.checkpoint as dcp
    reader = dcp.FileSystemReader(directory)
    reader.read_metadata = lambda *args, **kwargs: metadata # the checked index, not a second, unchecked unpickling
    try:
        with warnings.catch_warnings(): # no_dist says it: one process, no process group
            warnings.filterwarnings('ignore', message='torch.distributed is disabled')
            dcp.load(wanted, storage_reader=reader, no_dist=no_dist)
    except Exception as e:
        raise DamagedError(f'{directory}: the shards could not be read ({type(e).__name__}: {str(e)[:200]})') from None


def read_shards_like(directory, shards, part, like):
    """
    For a sharded model: the part's tensors whose keys and shapes are those of `like` ({key: this process's DTensor
    of the model, or a plain tensor}), read into tensors sharded the same way: each process reads only its own
    share of the bytes. Keys not in the checkpoint, or of another shape, are left out. Collective: every process calls.
    """
    tensors = shards[1]
    wanted = {f'{part}/{k}': torch.empty_like(v) for k, v in like.items()
              if f'{part}/{k}' in tensors and tuple(tensors[f'{part}/{k}'].size) == tuple(v.shape)}
    dcp_load(directory, shards[0], wanted, no_dist=False)
    return {k[len(part) + 1:]: v for k, v in wanted.items()}


def read_part(directory, shards, part):
    """ one part (model, adapter or optimizer) as full tensors, {key after 'part/': tensor}; `shards`: open_shards' """
    metadata, tensors = shards
    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in tensors.items() if k.startswith(f'{part}/')}
    if wanted:
        dcp_load(directory, metadata, wanted, no_dist=True)
    return {k[len(part) + 1:]: v for k, v in wanted.items()}


def read_optimizer(directory, shards, groups, model=None):
    """ the optimizer part as the named state a bundle's optimizer.pt holds; for a sharded `model`, the state of its
    parameters (by shape) sharded like them, each process reading its own share """
    if model is not None and is_sharded(model):
        stored = {}
        for key, m in shards[1].items():
            if key.startswith('optimizer/'):
                name, field = key[len('optimizer/'):].rsplit('/', 1)
                stored.setdefault(name, {})[field] = m
        like = {} # moments are shaped like their parameter, so sharded like it; the step count is a scalar for each
        for n, p in model.named_parameters():
            for field, m in stored.get(standard_key(n), {}).items():
                like[f'{standard_key(n)}/{field}'] = p if len(m.size) else torch.empty((), dtype=m.properties.dtype)
        part = read_shards_like(directory, shards, 'optimizer', like)
        # a parameter whose moments have another shape here keeps none of its state (not the step count alone)
        complete = {name for name, fields in stored.items() if all(f'{name}/{f}' in part for f in fields)}
        part = {k: v for k, v in part.items() if k.rsplit('/', 1)[0] in complete}
    else:
        part = read_part(directory, shards, 'optimizer')
    state = {}
    for key, value in part.items():
        name, field = key.rsplit('/', 1)
        state.setdefault(name, {})[field] = value
    return {'state': state, 'param_groups': groups}
