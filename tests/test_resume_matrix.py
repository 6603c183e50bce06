"""
The resume matrix: every kind of checkpoint a user may hold, resumed by train.py as a user runs it (a subprocess,
plain python or torchrun) into every kind of run, one cell per (source, target).

Sources (each built once per module, tiny): a bundle; a LoRA bundle with adapter.pt; the public nanoGPT's ckpt.pt,
plain and compiled with biases; the older latest.pt; a Hugging Face GPT-2 directory; a LoRA adapter made by peft with
its base beside it; a bundle written under torchrun; a LoRA run's sharded checkpoint written by 2 FSDP processes.
Targets: standard; LoRA on attention, MLP and embedding; another rank; a smaller and a larger block size; one process,
two (torchrun, DDP) and two sharding the model (torchrun, FSDP). Targets d-h keep the source's own adapters (a LoRA
source stays LoRA), so only one thing changes; (f) is therefore the same train.py run as (a), or (b) for the LoRA
sources, and is listed as such. The 2-process targets run for representative sources (TORCHRUN_SOURCES); their other
cells are listed as 'not run', with the reason.

Each cell must end in one of:
  val loss = stored   a continued run whose first evaluation equals the val loss stored in the checkpoint (1e-4)
  logits = source     where the checkpoint stores no comparable val loss (nanoGPT, latest.pt, Hugging Face, a cropped
                      block size): a run that evaluates and saves without training (max_iters = the source's step;
                      a step-0 Hugging Face or peft directory trains one step at learning rate 0), whose saved model's
                      logits equal the source model's (1e-5; the first 16 positions when cropped: attention is causal)
  clear error         exit 1, no traceback, one message naming the value, before any training step; only where
                      EXPECTED_ERRORS says so
Never a traceback, never a silently different model. The table is printed at the end of the run (tests/conftest.py).
"""

import importlib.util
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from core.checkpoint import read_checkpoint, save_bundle
from data.prepare import load_meta, prepare
from model import GPT, GPTConfig
from tests.helpers import REPO, TINY_CONFIG, make_nanogpt_checkpoint, make_peft_adapter, run_python

pytestmark = [
    pytest.mark.xdist_group('resume_matrix'), # with --dist loadgroup the module's sources are built once
    # torch.compile (the compiled nanoGPT source) imports torch.jit code that warns; a latest.pt's config dict holds run
    # settings beside the architecture, and reading it says so
    pytest.mark.filterwarnings('ignore:`torch.jit.script_method` is deprecated:DeprecationWarning'),
]

STEP = 3 # what the trained sources have trained
EVAL = ('--eval_iters', 2, '--log_interval', 1)
LORA4 = ('--attn_lora_rank', 4, '--mlp_lora_rank', 4, '--embedding_mode', 'lora', '--embedding_rank', 4, '--lora_alpha', 8)
LORA8 = ('--attn_lora_rank', 8, '--mlp_lora_rank', 8, '--embedding_mode', 'lora', '--embedding_rank', 8, '--lora_alpha', 8)
BLOCK = 32 # the tiny config's block size, every source's
LOGITS_TOL, VAL_TOL = 1e-5, 1e-4
CROP_NOTE = f"note: block_size = 16 from this config: the checkpoint's {BLOCK} position embeddings are cropped"
LARGER_NOTE = f"note: block_size = {BLOCK} from the checkpoint is used"
NOT_COMPARABLE = f'; not comparable, other evaluation batches: block_size {BLOCK} then, 16 now'
ACCUMULATION_NOTE = 'note: gradient_accumulation_steps = 1 does not divide among 2 processes, so each process runs 1'
# the 2-process target runs for these sources only (a torchrun run costs three processes' start-up); the others are
# listed as 'not run' with this reason
TORCHRUN_SOURCES = {'g': ('bundle', 'lora', 'nanogpt-compiled', 'torchrun', 'sharded'),
                    'h': ('lora', 'nanogpt-compiled', 'sharded')}
NOT_RUN_REASON = 'time: the 2-process targets run for 3 to 5 representative sources only'
EXPECTED_ERRORS = {} # (source, target) -> the words the one-line error must hold; no cell is expected to fail


@dataclass
class Source:
    name: str
    title: str
    kind: str                # what train.py's "loaded <kind> checkpoint" says
    step: int = STEP
    stored_val: bool = False # the checkpoint stores the val loss of its weights (bundles)
    lora: bool = False       # trained with LORA4: its "as trained" targets keep those adapters
    path: Path = None        # what --resume_from names
    reference: object = None # () -> the source's standard model, for the logits criterion
    build: object = None     # a future that completes when the source exists
    seconds: float = 0.0


@dataclass(frozen=True)
class Target:
    letter: str
    title: str
    args: tuple = ()        # train.py arguments on top of the adapters'
    adapters: tuple = None  # None: the source's own (standard, or LORA4 for the LoRA source)
    processes: int = 1
    block_size: int = BLOCK # what the saved model's block size must be


TARGETS = [
    Target('a', 'standard', adapters=()),
    Target('b', 'LoRA r4 attn+mlp+emb', adapters=LORA4),
    Target('c', 'other rank (LoRA r8)', adapters=LORA8),
    Target('d', 'block_size 16 (crop)', args=('--block_size', 16), block_size=16),
    Target('e', 'block_size 64 (kept 32)', args=('--block_size', 64)),
    Target('f', '1 process (as trained)'),
    Target('g', '2 processes (torchrun)', processes=2),
    Target('h', '2 processes FSDP (sharded)', args=('--fsdp', True), processes=2),
]
SOURCE_NAMES = ['bundle', 'lora', 'nanogpt', 'nanogpt-compiled', 'legacy', 'hf', 'peft', 'torchrun', 'sharded']
CELLS = [(s, t.letter) for s in SOURCE_NAMES for t in TARGETS]
TARGET = {t.letter: t for t in TARGETS}


# -----------------------------------------------------------------------------
# running the scripts as a user does

@dataclass
class Run:
    command: str
    code: int
    out: str
    seconds: float
    out_dir: Path = None


def run(cwd, *args, processes=1, script='train.py', config=TINY_CONFIG):
    """ a project script in cwd (train.py with the tiny config first), plain python or torchrun with 2 processes """
    start = [] if processes == 1 else ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}']
    command = start + [str(REPO / script)] + ([config] if config else []) + [str(a) for a in args]
    # one thread each: these models are tiny, and several processes share 2 cores (torchrun sets the same)
    # unbuffered: two processes write one pipe, and block-buffered output would interleave mid-line
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    t0 = time.time()
    proc = run_python(command, cwd, env, timeout=300)
    shown = ('torchrun --standalone --nproc_per_node=2 ' if processes > 1 else 'python ') + ' '.join(
        [script] + (['TINY_CONFIG'] if config else []) + [str(a) for a in args])
    return Run(shown, proc.returncode, proc.stdout + proc.stderr, time.time() - t0)


def checked(result):
    if result.code != 0:
        raise AssertionError(f'{result.command} exited {result.code}:\n{result.out[-3000:]}')
    return result


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids, ids)[0] # with targets: the logits of every position


def tiny_trained_model(vocab_size, bias, seed):
    """ the tiny config's architecture, a few AdamW steps on random ids (weights and moments not at their init) """
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, bias=bias, vocab_size=vocab_size, dropout=0.0))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), 'cpu')
    ids = torch.randint(0, vocab_size, (4, BLOCK))
    for _ in range(STEP):
        model(ids, ids)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), optimizer


def nanogpt_compiled_with_bias(directory, chars):
    """ a ckpt.pt as the public nanoGPT train.py writes it with compile=True and bias=True (keys with _orig_mod.);
    no meta.pkl: its vocabulary is the dataset's meta.json, found by its config's dataset name """
    model, optimizer = tiny_trained_model(len(chars), bias=True, seed=4)
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, bias=True, vocab_size=len(chars), dropout=0.0)
    config = dict(out_dir='out', eval_interval=250, log_interval=10, eval_iters=200, eval_only=False,
                  always_save_checkpoint=True, init_from='scratch', wandb_log=False, wandb_project='owt',
                  wandb_run_name='mini-gpt', dataset='pydocs_char', gradient_accumulation_steps=1, batch_size=4,
                  block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True, learning_rate=1e-3,
                  max_iters=STEP, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, decay_lr=True,
                  warmup_iters=100, lr_decay_iters=5000, min_lr=1e-4, backend='nccl', device='cpu', dtype='float32',
                  compile=True)
    state = torch.compile(model).state_dict()
    assert all(k.startswith('_orig_mod.') for k in state)
    path = Path(directory) / 'out' / 'ckpt.pt'
    path.parent.mkdir(parents=True)
    torch.save({'model': state, 'optimizer': optimizer.state_dict(), 'model_args': model_args, 'iter_num': STEP,
                'best_val_loss': torch.tensor(2.5), 'config': config}, path)
    return path, model


def legacy_latest(directory, chars):
    """ the older single-file format this project read: checkpoints/<name>/latest.pt with the architecture and the
    run settings in one 'config' dict, 'step', the vocabulary as 'chars', and the positional optimizer state """
    model, optimizer = tiny_trained_model(len(chars), bias=False, seed=5)
    path = Path(directory) / 'checkpoints' / 'old' / 'latest.pt'
    path.parent.mkdir(parents=True)
    config = dict(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, bias=False, vocab_size=len(chars), dropout=0.0,
                  batch_size=4, learning_rate=1e-3, device='cpu')
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'config': config, 'step': STEP,
                'chars': chars}, path)
    return path, model


# -----------------------------------------------------------------------------
# the matrix: sources built once, cells run in a pool of 2 (the machine's cores) ahead of the tests that ask

class Matrix:
    """ the sources, each built on first use, and the cells' runs, in a pool: of 2 (the machine's cores) when every
    cell is submitted ahead of the tests that ask for it (prefetch), else of 1 """

    def __init__(self, root, prefetch=()):
        self.root, self.src = root, root / 'sources'
        self.src.mkdir()
        self.pool = ThreadPoolExecutor(max_workers=min(4, max(2, os.cpu_count() or 2)) if prefetch else 1)
        self.lock = threading.Lock() # in-process builds one at a time: the global RNG makes them reproducible
        self.runs = {}
        data = REPO / 'data' / 'pydocs_char'
        if not (data / 'train.bin').exists():
            prepare('pydocs_char', out_dir=data)
        self.meta = load_meta(data)
        self.chars = self.meta['tokenizer']['chars']
        src, bundle_reference = self.src, lambda s: lambda: read_checkpoint(s.path).build_model()[0]
        self.sources = {s.name: s for s in [
            Source('bundle', 'bundle (train.py)', 'bundle', stored_val=True, path=src / 'bundle'),
            Source('lora', 'LoRA bundle + adapter.pt', 'bundle', stored_val=True, lora=True, path=src / 'lora'),
            Source('nanogpt', 'nanoGPT ckpt.pt', 'nanogpt', path=src / 'nanogpt' / 'out' / 'ckpt.pt'),
            Source('nanogpt-compiled', 'nanoGPT ckpt.pt compiled, bias', 'nanogpt',
                   path=src / 'nanogpt-compiled' / 'out' / 'ckpt.pt'),
            Source('legacy', 'legacy latest.pt', 'legacy', path=src / 'legacy' / 'checkpoints' / 'old' / 'latest.pt'),
            Source('hf', 'Hugging Face GPT-2 dir (our export)', 'hf', path=src / 'hf'),
            Source('peft', 'peft adapter + base (get_peft_model)', 'peft', step=0, path=src / 'peft'),
            Source('torchrun', 'bundle (torchrun x2)', 'bundle', stored_val=True, path=src / 'torchrun'),
            Source('sharded', 'sharded LoRA (FSDP torchrun x2)', 'sharded', stored_val=True, lora=True, path=src / 'sharded'),
        ]}
        assert list(self.sources) == SOURCE_NAMES
        for s in self.sources.values():
            if s.kind in ('bundle', 'sharded'):
                s.reference = bundle_reference(s)
        # the cells to run ahead of the tests: their sources first, the costly ones first, then the cells in order
        needed = {name for name, _ in prefetch}
        for name in ('torchrun', 'sharded', 'bundle', 'lora', 'hf', 'peft', 'nanogpt', 'nanogpt-compiled', 'legacy'):
            if name in needed:
                self.source(name)
        for name, letter in prefetch:
            self.cell(name, letter)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)

    # --- sources ---

    def source(self, name):
        """ the source, its build submitted on first use: always before any of its cells, which wait for it """
        source = self.sources[name]
        if source.build is None:
            def build():
                t0 = time.time()
                getattr(self, 'build_' + name.replace('-', '_'))(source)
                source.seconds = time.time() - t0
                return source
            source.build = self.pool.submit(build)
        return source

    def build_bundle(self, source):
        checked(run(self.root, '--out_dir', source.path, '--max_iters', STEP, *EVAL))

    def build_lora(self, source):
        checked(run(self.root, '--out_dir', source.path, '--max_iters', STEP, *EVAL, *LORA4))
        assert (source.path / 'adapter.pt').is_file()

    def build_torchrun(self, source):
        checked(run(self.root, '--out_dir', source.path, '--max_iters', STEP, *EVAL, processes=2))

    def build_sharded(self, source):
        checked(run(self.root, '--out_dir', source.path, '--max_iters', STEP, *EVAL, *LORA4, '--fsdp', True, processes=2))
        assert (source.path / '__1_0.distcp').is_file()

    def build_nanogpt(self, source):
        with self.lock:
            path, model, _ = make_nanogpt_checkpoint(self.src / 'nanogpt', self.chars, steps=STEP,
                                                     dataset='pydocs_char', compiled=False)
        assert path == source.path and (self.src / 'nanogpt' / 'data' / 'pydocs_char' / 'meta.pkl').is_file()
        source.reference = lambda: model.eval() # its vocabulary is the meta.pkl beside the run, as nanoGPT's

    def build_nanogpt_compiled(self, source):
        with self.lock:
            path, model = nanogpt_compiled_with_bias(self.src / 'nanogpt-compiled', self.chars)
        assert path == source.path
        source.reference = lambda: model

    def build_legacy(self, source):
        with self.lock:
            path, model = legacy_latest(self.src / 'legacy', self.chars)
        assert path == source.path
        source.reference = lambda: model

    def build_hf(self, source):
        # convert_checkpoints.py --to hf from a bias=True bundle; its tokenizer.json reads back as the dataset's
        with self.lock:
            model, _ = tiny_trained_model(len(self.chars), bias=True, seed=6)
            save_bundle(self.src / 'hf-bundle', model, STEP, tokenizer=self.meta['tokenizer'])
        out = checked(run(self.root, self.src / 'hf-bundle', '--to', 'hf', source.path, script='convert_checkpoints.py',
                          config=None)).out
        assert 'max |logits difference| read back' in out and (source.path / 'model.safetensors').is_file()
        assert read_checkpoint(source.path).tokenizer == self.meta['tokenizer']
        source.reference = lambda: model

    def build_peft(self, source):
        # made by peft's own get_peft_model on a tiny GPT-2 (attention and MLP, r 4, alpha 16: not LORA4's alpha, so
        # a LoRA target starts its adapters fresh), trained a few steps; the base beside it as convert --to peft lays
        # it out. No vocabulary: train.py takes the dataset's. The reference is peft's own forward.
        with self.lock:
            model = make_peft_adapter(source.path / 'base', source.path, len(self.chars), ('c_attn', 'c_proj', 'c_fc'))
        source.reference = lambda: model

    # --- cells ---

    def plan(self, source, target):
        """ (the arguments, the criterion) of one cell's train.py run """
        adapters = target.adapters if target.adapters is not None else (LORA4 if source.lora else ())
        if source.stored_val and target.letter != 'd':
            criterion, max_iters, extra = 'val', source.step + 1, ()
        elif source.step > 0:
            criterion, max_iters, extra = 'logits', source.step, () # evaluates and saves at max_iters, no training
        else: # a step-0 checkpoint saves nothing before step 1: one step that changes nothing
            criterion, max_iters, extra = 'logits', 1, ('--learning_rate', 0, '--min_lr', 0)
        args = ('--resume_from', source.path, *EVAL, '--max_iters', max_iters, *adapters, *target.args, *extra)
        return args, criterion

    def cell(self, source_name, letter):
        """ the future of one cell's run; (f) is the same run as (a) or (b): the source's own adapters, 1 process """
        key = (source_name, letter)
        if key not in self.runs:
            if TARGET[letter].processes > 1 and source_name not in TORCHRUN_SOURCES[letter]:
                return None
            source, target = self.source(source_name), TARGET[letter]
            if letter == 'f':
                same = 'b' if source.lora else 'a'
                self.runs[key] = self.cell(source_name, same)
                return self.runs[key]
            args, _ = self.plan(source, target)
            out_dir = self.root / 'cells' / f'{source_name}-{letter}'

            def work():
                source.build.result() # built before any cell of it runs (the pool took the sources first)
                result = run(self.root, *args, '--out_dir', out_dir, processes=target.processes)
                result.out_dir = out_dir
                return result
            self.runs[key] = self.pool.submit(work)
        return self.runs[key]


@pytest.fixture(scope='module')
def matrix(request, tmp_path_factory):
    # The selected cells are submitted at once, in the order they run, to a pool of the machine's cores (2 to 4):
    # in a plain run, and under xdist where this module runs in one worker (--dist loadgroup, loadfile, loadscope).
    # Under xdist's --dist load each worker gets some cells: it builds and runs what they need as they ask.
    worker = hasattr(request.config, 'workerinput')
    if worker and getattr(request.config.option, 'dist', 'no') not in ('loadgroup', 'loadfile', 'loadscope'):
        cells = []
    else:
        cells = [(item.callspec.params['source_name'], item.callspec.params['letter']) for item in request.session.items
                 if item.module is sys.modules[__name__] and item.originalname == 'test_resume_cell']
    m = Matrix(tmp_path_factory.mktemp('resume-matrix'), cells)
    yield m
    m.close()


# -----------------------------------------------------------------------------
# the verdict on one cell

def error_line(out):
    return next((line for line in out.splitlines() if line.startswith('error: ')), '')


def judge(matrix, source, target, result):
    """ (outcome, what was checked): asserts everything the rules promise for this cell """
    out, args_criterion = result.out, matrix.plan(source, target)[1]
    assert 'Traceback' not in out, f'{result.command} ended in a traceback:\n{out[-3000:]}'
    expected_error = EXPECTED_ERRORS.get((source.name, target.letter))
    if result.code != 0 or expected_error:
        message = error_line(out)
        assert result.code == 1 and message, f'{result.command}: exit {result.code}, no one-line error:\n{out[-3000:]}'
        assert not any(line.startswith('iter ') for line in out.splitlines()), 'it trained before the error'
        assert expected_error, f'{result.command} refused a cell the rules say resumes: {message}'
        assert expected_error in message, f'{message!r} does not name {expected_error!r}'
        return 'clear error', message[:90]

    lines = out.splitlines()
    assert f'loaded {source.kind} checkpoint' in out, out[-3000:]
    # the notes the rules promise
    if target.letter == 'd':
        assert CROP_NOTE in out, out[-3000:]
    if target.letter == 'e':
        assert LARGER_NOTE in out and 'this config\'s 64 cannot be honoured' in out, out[-3000:]
    if target.processes > 1:
        assert ACCUMULATION_NOTE in out, out[-3000:]
        evaluations = [line for line in lines if line.startswith('step ')]
        assert len(evaluations) == len(set(evaluations)), 'a rank other than 0 evaluated'
        assert sum(line.startswith('saving checkpoint') for line in lines) <= len(evaluations), 'a rank other than 0 saved'
    adapters = target.adapters if target.adapters is not None else (LORA4 if source.lora else ())
    if adapters == LORA4 and source.lora:
        assert 'adapters restored' in out and 'initialised fresh' not in out, out[-3000:]
    elif adapters:
        assert 'adapters initialised fresh' in out and 'adapters restored' not in out, out[-3000:]
    else:
        assert 'adapters' not in next(line for line in lines if line.startswith('loaded '))

    # what was saved
    saved = read_checkpoint(result.out_dir)
    rank = dict(zip(adapters[::2], adapters[1::2])).get('--attn_lora_rank', 0)
    assert saved.config.block_size == target.block_size, f'saved block_size {saved.config.block_size}'
    expected = (dict(attn_lora_rank=rank, mlp_lora_rank=rank, embedding_mode='lora', embedding_rank=rank, lora_alpha=8.0)
                if rank else dict(attn_lora_rank=0, mlp_lora_rank=0, embedding_mode='standard', embedding_rank=0))
    assert {k: saved.training_state['adapter'][k] for k in expected} == expected, saved.training_state['adapter']
    fsdp = '--fsdp' in target.args
    assert saved.kind == ('sharded' if fsdp else 'bundle'), saved.kind
    saved_factors = 'adapter' in saved.shard_parts() if fsdp else (result.out_dir / 'adapter.pt').is_file()
    assert saved_factors == bool(rank)
    checks = [line for line in lines if line.startswith('resume check:')]
    trained = [line for line in lines if line.startswith('iter ')]

    if args_criterion == 'val':
        assert len(checks) == 1, out[-3000:]
        words = checks[0].replace(',', '').split()
        now, stored = float(words[4]), float(words[6])
        assert 'not comparable' not in checks[0], checks[0]
        assert abs(now - stored) <= VAL_TOL, checks[0]
        assert saved.step == source.step + 1 and trained and trained[0].startswith(f'iter {source.step}:'), out[-3000:]
        return 'val loss = stored', f'|diff| {abs(now - stored):.1e}, then trained to step {saved.step}'

    # the logits criterion: the saved model is the source's model (cropped to its first 16 positions)
    if source.stored_val: # a cropped bundle: its stored loss was measured on other batches, and says so
        assert len(checks) == 1 and checks[0].endswith(NOT_COMPARABLE + ')'), checks
    else:
        assert not checks, checks
    if source.step > 0:
        assert not trained and saved.step == source.step, f'trained: {trained[:2]}, saved step {saved.step}'
    else:
        assert len(trained) == 1 and saved.step == 1, f'trained: {trained[:2]}, saved step {saved.step}'
    ids = torch.randint(0, len(matrix.chars), (2, target.block_size), generator=torch.Generator().manual_seed(0))
    diff = (logits(saved.build_model()[0], ids) - logits(source.reference(), ids)).abs().max().item()
    assert diff <= LOGITS_TOL, f'the saved model differs from the source: max |logits diff| {diff:.1e}'
    how = 'no step trained' if source.step > 0 else '1 step at lr 0'
    return 'logits = source', f'max |diff| {diff:.1e} on {target.block_size} positions, {how}'


def test_sources_are_what_they_claim(matrix, record_row):
    """ each source is the kind of file its row names, built once; its model loads and has the tiny architecture """
    for i, name in enumerate(SOURCE_NAMES):
        source = matrix.source(name).build.result()
        ck = read_checkpoint(source.path)
        assert ck.kind == source.kind and ck.step == source.step and ck.config.block_size == BLOCK, source.name
        assert (ck.training_state.get('val_loss') is not None) == source.stored_val, source.name
        record_row('resume_matrix_sources', order=i, source=source.title, file=str(source.path.relative_to(matrix.src)),
                   kind=ck.kind, step=ck.step, bias=ck.config.bias,
                   tokenizer=(ck.tokenizer or {}).get('token_kind', "none (the dataset's)"),
                   stored_val_loss=ck.training_state.get('val_loss') is not None, built_in_s=f'{source.seconds:.1f}')
    assert all(k.startswith('_orig_mod.') for k in torch.load(matrix.sources['nanogpt-compiled'].path,
                                                                weights_only=True)['model'])
    assert read_checkpoint(matrix.sources['nanogpt-compiled'].path).config.bias
    for name in ('lora', 'sharded'):
        assert read_checkpoint(matrix.sources[name].path).training_state['adapter']['attn_lora_rank'] == 4


GRID_CELL = {'val loss = stored': 'val=', 'logits = source': 'logits=', 'clear error': 'error', 'FAILED': 'FAILED'}


@pytest.mark.parametrize('source_name,letter', CELLS, ids=[f'{s}-{t}' for s, t in CELLS])
def test_resume_cell(matrix, record_row, source_name, letter):
    source, target = matrix.sources[source_name], TARGET[letter]
    row = dict(order=CELLS.index((source_name, letter)), source=source.title, target=f'({letter}) {target.title}')
    grid = dict(order=row['order'], row=source.title, column=f'({letter})')
    future = matrix.cell(source_name, letter)
    if future is None:
        record_row('resume_matrix', **row, outcome='not run', check=NOT_RUN_REASON, run='', seconds='')
        record_row('resume_matrix_grid', **grid, cell='not run')
        pytest.skip(NOT_RUN_REASON)
    shared = '' if letter != 'f' else f"same run as ({'b' if source.lora else 'a'})"
    outcome, check, result = 'FAILED', '', None
    try:
        try:
            source.build.result()
        except Exception as e:
            raise AssertionError(f'building the source failed: {e}') from e
        result = future.result()
        outcome, check = judge(matrix, source, target, result)
    except Exception as e:
        check = (str(e).replace(str(matrix.root), '<tmp>').splitlines() or [type(e).__name__])[0][:110]
        raise
    finally:
        record_row('resume_matrix', **row, outcome=outcome, check=check,
                   run=shared or ('python' if target.processes == 1 else 'torchrun x2' + (' --fsdp' if '--fsdp' in
                                                                                         target.args else '')),
                   seconds='' if shared or result is None else f'{result.seconds:.1f}')
        record_row('resume_matrix_grid', **grid, cell=GRID_CELL[outcome])


# -----------------------------------------------------------------------------
# the tables of tests/conftest.py print with and without xdist

TABLE_TEST = '''
import pytest

@pytest.mark.parametrize('i', range(4))
def test_row(record_row, i):
    record_row('demo table', order=3 - i, name=f'row{3 - i}', outcome='ok' if i % 2 else 'other')
    record_row('demo table, grid', order=i, row=f'r{i // 2}', column=f'c{i % 2}', cell=f'v{i}')
'''


def test_tables_print_at_the_end_with_and_without_xdist(tmp_path):
    (tmp_path / 'conftest.py').write_text('from tests.conftest import *\n')
    (tmp_path / 'test_demo.py').write_text(TABLE_TEST)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))}
    plugins = ['-p', 'no:cacheprovider', '-p', 'no:randomly']
    # with pytest-xdist installed, also under 2 workers: rows recorded in the workers, printed by the controller
    variants = [[], ['-n', '2']] if importlib.util.find_spec('xdist') else [[]]
    for extra in variants:
        proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', *plugins, *extra, str(tmp_path)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        out = proc.stdout
        assert proc.returncode == 0, out + proc.stderr
        assert 'demo table (4 rows)' in out, out
        table = out[out.index('demo table (4 rows)'):].splitlines()
        assert table[1].split() == ['name', 'outcome'] and [line.split()[0] for line in table[3:7]] == [
            'row0', 'row1', 'row2', 'row3'], out
        assert 'cells by outcome: 2 other, 2 ok (total 4)' in out or 'cells by outcome: 2 ok, 2 other (total 4)' in out
        grid = out[out.index('demo table, grid (4 rows)'):].splitlines()
        assert [line.split() for line in grid[1:5]] == [['c0', 'c1'], ['--', '--', '--'], ['r0', 'v0', 'v1'],
                                                        ['r1', 'v2', 'v3']], out
