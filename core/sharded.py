"""
The sharded checkpoint of an FSDP run (train.py --fsdp=True under torchrun): a bundle directory whose weights, LoRA
factors and optimizer state are a torch.distributed.checkpoint, written by every process in parallel. Its layout,
and the reading and writing of the shards themselves, are core/fsdp.py's; here are its writer, reader and KINDS row.
"""

import torch

from model import is_lora_factor, standard_key
from core.bundle import (BACKGROUND_SAVES, bundle_dir, is_checkpoint_file, read_bundle_json, save_errors, training_state,
                         write_json_files)
from core.commit import CheckpointError, commit_directory
from core.fsdp import (HEAD, METADATA, is_sharded, is_sharded_dir, on_all_processes, open_shards, read_metadata,
                       read_optimizer, read_part, read_shards_like, save_group, shapes, sharded_tensors, staged_shards,
                       write_shards)
from core.kind import CONFIG_FILE, STATE_FILE, Checkpoint, Kind


def save_sharded(checkpoint_dir, model, step, optimizer=None, tokenizer=None, best_val_loss=None, val_loss=None,
                 run_config=None, extra_state=None, background=False):
    """
    save_bundle for an FSDP model, called by every process: each writes its shards in parallel into process 0's new
    directory, which process 0 then commits as a whole (manifest last, then the swap), as it does a bundle.
    background=True: as save_bundle's; each process copies its shards to CPU memory, and the write runs in a thread
    whose collectives use a process group of their own (wait_for_saves() in every process waits for it).
    """
    tensors, groups = sharded_tensors(model, optimizer)
    tokenizer = tokenizer or getattr(model, 'tokenizer_spec', None)
    shards = {'processes': torch.distributed.get_world_size(), 'optimizer_groups': groups,
              'parts': sorted({k.split('/', 1)[0] for k in tensors})}
    state = training_state(model, step, best_val_loss, val_loss, run_config, extra_state, optimizer_file=None,
                           adapter_file=None, shards=shards)

    def first(share):
        def write_files(directory):
            write_shards(share(directory), tensors, group)
            write_json_files(directory, model, tokenizer, state)
        with save_errors(checkpoint_dir):
            commit_directory(checkpoint_dir, write_files, replaces=is_checkpoint_file)

    group = None
    if background:
        tensors, group = staged_shards(tensors), save_group()
    def save():
        with save_errors(checkpoint_dir):
            on_all_processes(first, lambda directory: write_shards(directory, tensors, group), group)
    if not background:
        save()
        return checkpoint_dir
    return BACKGROUND_SAVES.start(save, checkpoint_dir, step)


class ShardedCheckpoint(Checkpoint):
    """ a bundle whose tensors are a DCP checkpoint, each process's shards in files of its own (core/fsdp.py) """

    def shards(self):
        """ a sharded checkpoint's checked index (its files verified once) """
        if self._shards is None:
            self._shards = open_shards(self.path, self.manifest, self.shard_index())
        return self._shards

    def shard_parts(self):
        """ the parts a sharded checkpoint holds, by DCP's index (training_state.json's list may be edited) """
        return sorted({key.split('/', 1)[0] for key in self.shard_index()[1]})

    def shard_index(self):
        """ DCP's checked index of a sharded checkpoint, read once """
        if self._index is None:
            self._index = read_metadata(self.path, self.manifest)
        return self._index

    def loads_shard_by_shard(self, config):
        """
        whether a model of `config` can take this checkpoint already sharded, each process reading its own shards:
        a checkpoint of at least the model's positions (cropping needs the whole tensor), with either no adapters in
        the model or the very adapters it stored (new factors are initialised from the whole weight)
        """
        if config.block_size < self.config.block_size:
            return False
        return not config.uses_lora or ('adapter' in self.shard_parts() and all(
            getattr(config, k) == v for k, v in self.trained_adapters().items()))

    def stored_weights(self):
        if self._weights is None:
            self._weights = tied(read_part(self.path, self.shards(), 'model'))
        return self._weights

    def weight_shapes(self):
        return tied(shapes(self.shards(), 'model')) # DCP's index: no tensor read

    def optimizer_state(self, model=None):
        """ for a sharded (FSDP) `model`, read sharded like its parameters """
        groups = self.training_state['shards'].get('optimizer_groups')
        if 'optimizer' not in self.shard_parts():
            return None
        if groups is None:
            raise CheckpointError(f'{self.file(STATE_FILE)}: the shards hold an optimizer state, but "shards" names no '
                                  '"optimizer_groups" (its hyperparameters and parameter names; edited by hand?)')
        return read_optimizer(self.path, self.shards(), groups, model)

    def adapter_state(self):
        return read_part(self.path, self.shards(), 'adapter') if 'adapter' in self.shard_parts() else None

    def describe_optimizer(self):
        count = self.training_state['shards'].get('processes')
        return (f"in the shards, keyed by parameter name (saved by {count} process{'es' if count != 1 else ''})"
                if 'optimizer' in self.shard_parts() else 'none (deploy-only save)')

    def weights_for(self, model, with_adapters):
        return self.shards_for(model, with_adapters) if is_sharded(model) else super().weights_for(model, with_adapters)

    def shards_for(self, model, with_adapters):
        """
        For a sharded (FSDP) model: its shards of the weights (and of the factors), each process reading its own
        share. The checkpoint's other tensors (another architecture's) stand in as shapes, so the strict load names them.
        """
        self.check_config()
        params = model.state_dict()
        read = read_shards_like(self.path, self.shards(), 'model', {standard_key(k): v for k, v in params.items()
                                                                    if not is_lora_factor(k) and k != HEAD})
        weights = tied({**shapes(self.shards(), 'model'), **read})
        adapters = None
        if with_adapters and 'adapter' in self.shard_parts():
            adapters = read_shards_like(self.path, self.shards(), 'adapter', {k: v for k, v in params.items() if is_lora_factor(k)})
        return weights, adapters


def tied(weights):
    """ a sharded checkpoint stores the tied head once, as the embedding """
    if 'transformer.wte.weight' in weights:
        weights[HEAD] = weights['transformer.wte.weight']
    return weights


def sharded_dir(path):
    # its directory, or the complete one a crash between the two renames of a commit left beside it
    found = path if is_sharded_dir(path) else None if path.is_file() else bundle_dir(path)
    return found if found is not None and is_sharded_dir(found) else None


def read_sharded(path, meta_path=None):
    ck = ShardedCheckpoint(path, SHARDED, **read_bundle_json(path))
    shards = ck.training_state.get('shards')
    groups = shards.get('optimizer_groups') if isinstance(shards, dict) else None
    if not (isinstance(shards, dict) and isinstance(shards.get('parts'), list) and 'model' in shards['parts']
            and type(shards.get('processes')) is int and shards['processes'] >= 1):
        raise CheckpointError(f'{path / STATE_FILE} does not describe the shards in {path} (its "shards" entry should '
                              f'name the process count and a "model" part, found {str(shards)[:120]}): expected the '
                              'training_state.json that train.py --fsdp=True writes')
    if groups is not None and not (isinstance(groups, list) and all(
            isinstance(g, dict) and isinstance(g.get('params'), list) and all(isinstance(n, str) for n in g['params'])
            for g in groups)):
        raise CheckpointError(f'{path / STATE_FILE}: the "optimizer_groups" of "shards" are not a list of parameter '
                              'groups, each with the names of its "params" (edited by hand?); found {str(groups)[:120]}')
    return ck


SHARDED = Kind('sharded', 'Sharded checkpoint (FSDP, torch.distributed.checkpoint)', sharded_dir, read_sharded, None,
               looks=f'a sharded checkpoint ({CONFIG_FILE} + {METADATA} + shards)', committed=True)
