"""
Check that a modded-nanogpt checkpoint loads for fine-tuning, and say which flags to use:
$ python test_checkpoint_loading.py /path/to/best_state_step005000_val3.2811.pt [--n_head 6]
[1/3] inspect, [2/3] load strictly and convert to GPTBatched, [3/3] verify with a real CPU forward pass.
Exit code 0 when it loads, 1 with the reason when it doesn't.

Under pytest this file also holds the tests of GPTFlexAttention, GPTBatched and load_checkpoint_helper.py on
generated checkpoints of both layouts. The command line must run without pytest (requirements.txt doesn't have it),
so pytest is imported only inside the tests that need it, and they get their files from pytest's own
tmp_path_factory instead of a decorated fixture.
"""

import sys
import traceback

import torch

from model import GPTBatched, GPTFlexAttention, CheckpointMismatchError, Rotary, meta_device
from load_checkpoint_helper import (ModdedCheckpointError, inspect_checkpoint, load_pretrained_checkpoint,
                                    make_random_checkpoint, read_state_dict)
from core.args import Parser
from core.checkpoint import CheckpointError

FEATURE_TOLERANCE = 1e-5 # fp32 features after the final norm are of order 1: about 80 float32 roundings (eps 1.2e-7)
BF16_TOLERANCE = 0.05 # bf16 autocast keeps 8 bits (eps 7.8e-3): a few bf16 roundings of features of order 1


def padded_batch(vocab_size, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (len(lengths), max(lengths)), generator=g)
    for row, n in enumerate(lengths):
        idx[row, n:] = 0 # right padding (0 is also a real token: lengths, not ids, say what is padding)
    return idx


def verify(path, num_heads=None):
    print('[1/3] Inspecting checkpoint')
    info, _ = inspect_checkpoint(path, num_heads, verbose=True)
    print('\n[2/3] Loading strictly into GPTBatched')
    model, info = load_pretrained_checkpoint(path, 'cpu', num_heads, verbose=False)[:2] # (not the file's dict: it maps the file)
    n = sum(p.numel() for p in model.parameters())
    how = 'converted from the small layout, run by the small rules' if info['layout'] == 'small' else 'medium layout, loaded directly'
    print(f"  {len(model.state_dict())} tensors, {n / 1e6:.2f}M parameters; lm head dropped (fine-tuning adds its own); "
          f"scalars cut to the {info['scalars_used']} used; {how}")
    print('\n[3/3] Verifying with a forward pass on CPU')
    lengths = [16, 9]
    idx = padded_batch(info['vocab_size'], lengths)
    with torch.no_grad():
        features = model.forward_features(idx)
        alone = model.forward_features(idx[1:, :lengths[1]])
    expected = (len(lengths), max(lengths), info['model_dim'])
    if tuple(features.shape) != expected or not torch.isfinite(features).all():
        raise ModdedCheckpointError(f'{path}: the forward pass gave features of shape {list(features.shape)} '
                                    f'(expected {list(expected)}), finite: {bool(torch.isfinite(features).all())}')
    pad_diff = (features[1, :lengths[1]] - alone[0]).abs().max().item()
    if pad_diff > FEATURE_TOLERANCE:
        raise ModdedCheckpointError(f'{path}: padding changed the features at real positions by {pad_diff:.2e}')
    print(f"  features {list(features.shape)}, all finite, mean |x| {features.abs().mean():.3f}; "
          f"padding changes real positions by {pad_diff:.1e}")
    if info['layout'] == 'small': # the conversion must compute what the small model computes
        del model # (one model at a time: the peak stays under 2x the file's tensors, bench/bench_checkpoint.py)
        flex, diff = small_model_and_difference(path, info, idx, features)
        print(f'  GPTFlexAttention vs converted GPTBatched: max |features difference| {diff:.1e}')
        if diff > FEATURE_TOLERANCE:
            raise ModdedCheckpointError(f'{path}: the converted model differs from the small model by {diff:.2e}')
    return info


def small_model_and_difference(path, info, idx, converted=None):
    """
    train_gpt_small.py's own model, loaded from the file, and its largest difference from the converted GPTBatched:
    from the features `converted` gave for idx, else from GPTBatched.from_pretrained_gpt of it. Built on the meta
    device and given the file's mapped tensors (fp32 ones shared, bf16 ones widened), so it costs what the load does.
    """
    _, sd = read_state_dict(path)
    with meta_device():
        flex = GPTFlexAttention(info['vocab_size'], info['num_layers'], info['num_heads'], info['model_dim'], 1024,
                                info['head_dim'])
    sd = {**sd, 'scalars': sd['scalars'][:info['scalars_used']]}
    flex.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    flex.rotary = Rotary(info['head_dim'], 1024) # its tables are not in the file
    with torch.no_grad():
        if converted is None:
            converted = GPTBatched.from_pretrained_gpt(flex).forward_features(idx)
        return flex, (flex.forward_features(idx) - converted).abs().max().item()


def main():
    parser = Parser(description='Check that a modded-nanogpt checkpoint loads for fine-tuning.')
    parser.add_argument('checkpoint', help='a .pt file written by train_gpt_small.py or train_gpt_medium.py')
    parser.add_argument('--n_head', type=int, help='the head count, when (layers, model dim) is not a known model')
    parser.add_argument('--debug', action='store_true', help='show the full traceback on errors')
    args = parser.parse_args()
    if args.n_head is not None and args.n_head < 1:
        parser.error(f'--n_head must be a positive number of heads, found {args.n_head}')
    try:
        info = verify(args.checkpoint, args.n_head)
    except (CheckpointError, CheckpointMismatchError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        print(f'\nFAILED: {e}')
        sys.exit(1)
    except Exception as e: # a file odd in a way no check above names: this tool's answer is still "does not load"
        if args.debug:
            traceback.print_exc()
        print(f'\nFAILED: {args.checkpoint} does not load: {type(e).__name__}: {e} (--debug shows where)')
        sys.exit(1)
    print(f"\nOK: the checkpoint loads. Fine-tune with: --n_layer {info['num_layers']} --n_head {info['num_heads']} "
          f"--n_embd {info['model_dim']}")
    print(f"Format: {info['format']} (from train_gpt_{'small' if info['layout'] == 'small' else 'medium'}.py)")


# -----------------------------------------------------------------------------
# tests on generated checkpoints: tiny, but with layer 7 (no attention), bf16 embeddings, _orig_mod. keys

SMALL = dict(layout='small', vocab_size=256, num_layers=8, num_heads=2, model_dim=64, head_dim=32)
MEDIUM = dict(layout='medium', vocab_size=250, num_layers=12, num_heads=1, model_dim=128, head_dim=128) # reaches the skips


def reference_features(sd, arch, num_heads, idx):
    """
    The forward pass written out from the format document, independently of model.py: per-head loops,
    an explicit causal mask and softmax, rotary from its formula. Slow; only for tiny models.
    """
    f = lambda k: sd[k].float()
    L = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    def norm(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    s = f('scalars')
    x = x0 = norm(f('embed.weight')[idx])
    ves = [f(f'value_embeds.{j}.weight')[idx] for j in range(3)]
    T = idx.shape[1]
    out = []
    for i in range(L):
        if arch == 'small' and i >= L // 2:
            x = x + s[i - L // 2] * out[L - 1 - i]
        if arch == 'medium' and i in (9, 10, 11):
            j = {9: 6, 10: 4, 11: 2}[i]
            x = x + s[j] * out[j]
        x = s[L + 2 * i] * x + s[L + 2 * i + 1] * x0
        key = f'blocks.{i}.attn.qkv_w' if arch == 'small' else f'blocks.{i}.attn.qkvo_w'
        if key in sd:
            W = f(key)
            Wo = f(f'blocks.{i}.attn.c_proj.weight') if arch == 'small' else W[3]
            h = norm(x) if arch == 'small' else x
            Dh = W.shape[1] // num_heads
            ve = ves[i] if i < 3 else ves[i - (L - 3)] if i >= L - 3 else None
            heads = []
            for hd in range(num_heads):
                sl = slice(hd * Dh, (hd + 1) * Dh)
                q, k, v = norm(h @ W[0][sl].T), norm(h @ W[1][sl].T), h @ W[2][sl].T
                if arch == 'medium':
                    v = norm(v)
                freq = torch.cat([(1 / 1024) ** torch.linspace(0, 1, Dh // 4), torch.zeros(Dh // 4)])
                ang = torch.arange(T)[:, None].float() * freq
                def rot(z):
                    z1, z2 = z[..., :Dh // 2], z[..., Dh // 2:]
                    return torch.cat([z1 * ang.cos() + z2 * ang.sin(), -z1 * ang.sin() + z2 * ang.cos()], -1)
                a0, a1 = s[3 * L + 2 * i], s[3 * L + 2 * i + 1]
                v = a0 * v + a1 * ve[..., sl] if ve is not None else a0 * v
                scores = rot(q) @ rot(k).transpose(-1, -2) * 0.12
                scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float('-inf'))
                heads.append(scores.softmax(-1) @ v)
            x = x + torch.cat(heads, -1) @ Wo.T
        fc = f(f'blocks.{i}.mlp.c_fc.weight') if arch == 'small' else f(f'blocks.{i}.mlp.fc_w')
        proj = f(f'blocks.{i}.mlp.c_proj.weight') if arch == 'small' else f(f'blocks.{i}.mlp.proj_w')
        x = x + torch.relu(norm(x) @ fc.T).pow(2) @ proj.T
        out.append(x)
    return norm(x)


_files = {}


def modded_files(tmp_path_factory):
    """ the two generated checkpoints, written once per session (a plain function: no pytest import needed) """
    if not _files:
        d = tmp_path_factory.mktemp('modded')
        _files.update(small=make_random_checkpoint(d / 'best_state_step001000_val3.2800.pt', **SMALL, scalars_pad=24),
                      medium=make_random_checkpoint(d / 'state_step002000.pt', **MEDIUM, val_loss=None), dir=d)
    return _files


def test_format_detection(tmp_path_factory):
    files = modded_files(tmp_path_factory)
    info, _ = inspect_checkpoint(files['small'], num_heads=2, verbose=False)
    assert (info['format'], info['vocab_size'], info['model_dim'], info['num_layers']) == ('small', 256, 64, 8)
    assert info['no_attention_layers'] == [7] and info['scalars_size'] == 64 and abs(info['val_loss'] - 3.28) < 1e-6
    assert info['embed_dtype'] == 'bfloat16' and info['block_dtype'] == 'float32'
    info, _ = inspect_checkpoint(files['medium'], num_heads=1, verbose=False)
    assert (info['format'], info['vocab_size'], info['head_dim'], info['val_loss']) == ('medium', 250, 128, None)
    assert info['step'] == 1000 and info['no_attention_layers'] == [7]


def test_large_lite_and_known_heads_table(tmp_path):
    # every model of the table, by its tensor shapes alone (the layout description's numbers); large-lite has the
    # medium keys with head_dim = D / H = 64
    for layers, dim, layout, heads, head_dim, fmt in ((12, 768, 'small', 6, 128, 'small'),
                                                     (16, 1024, 'medium', 8, 128, 'medium'),
                                                     (24, 1152, 'medium', 18, 64, 'large-lite'),
                                                     (36, 1280, 'medium', 20, 64, 'large-lite')):
        qkv = ('qkv_w', 3) if layout == 'small' else ('qkvo_w', 4)
        sd = {'embed.weight': torch.zeros(2, dim), 'scalars': torch.ones(5 * layers),
              f'blocks.0.attn.{qkv[0]}': torch.zeros(qkv[1], dim, dim, dtype=torch.bfloat16),
              f'blocks.{layers - 1}.mlp.fc_w': torch.zeros(1)} # only the shapes that inspection reads
        torch.save({'step': 1, 'model': sd}, tmp_path / 'shapes.pt')
        info, _ = inspect_checkpoint(tmp_path / 'shapes.pt', verbose=False)
        assert (info['num_layers'], info['format'], info['num_heads'], info['head_dim']) == (layers, fmt, heads, head_dim)
        assert 'known table' in info['heads_source']
    info, _ = inspect_checkpoint(tmp_path / 'shapes.pt', num_heads=10, verbose=False) # given wins over the table
    assert (info['num_heads'], info['head_dim'], info['heads_source']) == (10, 128, 'given')


def test_strict_load_follows_the_documented_forward(tmp_path_factory):
    from tests.numerics import assert_same_function
    files = modded_files(tmp_path_factory)
    for kind, heads in (('small', SMALL['num_heads']), ('medium', MEDIUM['num_heads'])):
        model, info, checkpoint = load_pretrained_checkpoint(files[kind], num_heads=heads)
        assert model.arch == kind and all(p.dtype == torch.float32 and p.device.type == 'cpu' for p in model.parameters())
        _, sd = read_state_dict(files[kind])
        idx = padded_batch(info['vocab_size'], [12, 12])
        with torch.no_grad():
            ours = model.forward_features(idx)
        expected = reference_features(sd, kind, heads, idx)
        assert_same_function(ours, expected) # fp32, two independent orders of summation
        assert ours.abs().mean() > 0.1 # the weights are random and non-trivial


def test_conversion_equals_small_model(tmp_path_factory):
    files = modded_files(tmp_path_factory)
    info, _ = inspect_checkpoint(files['small'], num_heads=2, verbose=False)
    idx = padded_batch(256, [16, 16, 7])
    flex, diff = small_model_and_difference(files['small'], info, idx)
    assert diff < FEATURE_TOLERANCE
    loaded, _, _ = load_pretrained_checkpoint(files['small'], num_heads=2)
    with torch.no_grad():
        assert (loaded.forward_features(idx) - flex.forward_features(idx)).abs().max() < FEATURE_TOLERANCE
        # the users' helper transposed c_proj and ran small weights through medium rules: both are wrong
        as_medium = GPTBatched(256, 8, 2, 64, 1024, 32, arch='medium')
        as_medium.load_state_dict(loaded.state_dict())
        assert (as_medium.forward_features(idx) - flex.forward_features(idx)).abs().max() > 1e-2
        transposed = GPTBatched(256, 8, 2, 64, 1024, 32, arch='small')
        sd = loaded.state_dict()
        for i in range(7):
            sd[f'blocks.{i}.attn.qkvo_w'][3] = sd[f'blocks.{i}.attn.qkvo_w'][3].T.clone()
        transposed.load_state_dict(sd)
        assert (transposed.forward_features(idx) - flex.forward_features(idx)).abs().max() > 1e-2
        # the small script's logit cap: 30 sigmoid(z / (7.5 sqrt(D))), z the head's output on the normed features
        logits, z = flex(idx), flex.forward_features(idx) @ flex.lm_head.weight.T
        assert logits.shape == (3, 16, 256) and (logits - 15).abs().max() > 0.1 # off the midpoint: a scale would show
        assert (logits - 30 * torch.sigmoid(z / (7.5 * 64 ** 0.5))).abs().max() < 1e-4


def test_a_wrong_conversion_fails_the_check(tmp_path_factory, monkeypatch):
    # the tool's last step runs train_gpt_small.py's own model on the file: a conversion that gets one matrix wrong
    # (the c_proj rows of one layer, halved) loads and runs, and only that comparison catches it
    import pytest
    files = modded_files(tmp_path_factory)
    right = load_pretrained_checkpoint
    def wrong(*args, **kwargs):
        model, *rest = right(*args, **kwargs)
        model.state_dict()['blocks.2.attn.qkvo_w'][3].mul_(0.5) # (the state dict's tensors are the parameters)
        return (model, *rest)
    monkeypatch.setattr(sys.modules[__name__], 'load_pretrained_checkpoint', wrong)
    with pytest.raises(ModdedCheckpointError, match='the converted model differs from the small model by'):
        verify(files['small'], num_heads=2)


def test_the_check_fails_a_model_that_padding_changes_or_that_gives_no_numbers(tmp_path_factory, monkeypatch):
    import pytest
    files = modded_files(tmp_path_factory)
    right = load_pretrained_checkpoint
    for broken, words in ((lambda x: x + x.mean(1, keepdim=True), 'padding changed the features at real positions'),
                          (lambda x: x * float('nan'), 'finite: False'), (lambda x: x[:, :-1], 'features of shape')):
        def wrong(*args, **kwargs):
            model, *rest = right(*args, **kwargs)
            features = model.forward_features
            model.forward_features = lambda idx: broken(features(idx))
            return (model, *rest)
        monkeypatch.setattr(sys.modules[__name__], 'load_pretrained_checkpoint', wrong)
        with pytest.raises(ModdedCheckpointError, match=words):
            verify(files['medium'], num_heads=1)


def test_padding_never_changes_real_positions(tmp_path_factory):
    files = modded_files(tmp_path_factory)
    for kind in ('small', 'medium'):
        model, info, _ = load_pretrained_checkpoint(files[kind], num_heads=2 if kind == 'small' else 1)
        lengths = [16, 5, 11]
        idx = padded_batch(info['vocab_size'], lengths)
        with torch.no_grad():
            batched = model.forward_features(idx)
            for row, n in enumerate(lengths):
                alone = model.forward_features(idx[row:row + 1, :n])
                assert (batched[row, :n] - alone[0]).abs().max() < FEATURE_TOLERANCE, (kind, row)


def test_bf16_autocast_runs_without_mixed_dtype_errors(tmp_path_factory):
    model, info, _ = load_pretrained_checkpoint(modded_files(tmp_path_factory)['small'], num_heads=2)
    idx = padded_batch(256, [8, 8])
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        features = model.forward_features(idx)
    with torch.no_grad():
        exact = model.forward_features(idx)
    diff = (features.float() - exact).abs().max().item()
    assert torch.isfinite(features).all() and 0 < diff < BF16_TOLERANCE # bf16 rounding, and only that


def test_wrong_head_count_is_a_clear_error(tmp_path_factory):
    import pytest
    files = modded_files(tmp_path_factory)
    with pytest.raises(ModdedCheckpointError, match='head count is not stored'):
        load_pretrained_checkpoint(files['small'])
    with pytest.raises(ModdedCheckpointError, match='3 heads do not fit'):
        load_pretrained_checkpoint(files['small'], num_heads=3)


def test_short_or_dirty_scalars_are_clear_errors(tmp_path_factory, tmp_path):
    import pytest
    files = modded_files(tmp_path_factory)
    checkpoint = torch.load(files['small'], weights_only=True)
    checkpoint['model']['_orig_mod.scalars'] = checkpoint['model']['_orig_mod.scalars'][:30]
    torch.save(checkpoint, tmp_path / 'short.pt')
    with pytest.raises(ModdedCheckpointError, match='scalars has 30 values but 8 layers need 40'):
        load_pretrained_checkpoint(tmp_path / 'short.pt', num_heads=2)
    checkpoint = torch.load(files['small'], weights_only=True)
    checkpoint['model']['_orig_mod.scalars'][50] = 0.3
    torch.save(checkpoint, tmp_path / 'dirty.pt')
    with pytest.raises(ModdedCheckpointError, match='padding'):
        load_pretrained_checkpoint(tmp_path / 'dirty.pt', num_heads=2)


def test_truncated_file_and_missing_tensor_are_clear_errors(tmp_path_factory, tmp_path):
    import pytest
    files = modded_files(tmp_path_factory)
    data = open(files['small'], 'rb').read()
    (tmp_path / 'cut.pt').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='cut.pt is truncated or damaged'):
        load_pretrained_checkpoint(tmp_path / 'cut.pt', num_heads=2)
    checkpoint = torch.load(files['small'], weights_only=True)
    del checkpoint['model']['_orig_mod.blocks.3.mlp.c_fc.weight']
    torch.save(checkpoint, tmp_path / 'hole.pt')
    with pytest.raises(CheckpointMismatchError, match=r'1 keys are missing .*blocks.3.mlp.fc_w'):
        load_pretrained_checkpoint(tmp_path / 'hole.pt', num_heads=2)


def test_command_line(tmp_path_factory, tmp_path):
    from tests.helpers import run_script
    files = modded_files(tmp_path_factory)
    code, out = run_script('test_checkpoint_loading.py', files['small'], '--n_head', 2, cwd=tmp_path)
    assert code == 0 and '[1/3]' in out and '[2/3]' in out and '[3/3]' in out
    assert 'Format: small (from train_gpt_small.py)' in out and '--n_layer 8 --n_head 2 --n_embd 64' in out
    assert 'GPTFlexAttention vs converted GPTBatched: max |features difference|' in out
    code, out = run_script('test_checkpoint_loading.py', files['medium'], '--n_head', 1, cwd=tmp_path)
    assert code == 0 and 'Format: medium (from train_gpt_medium.py)' in out and 'no val_loss' in out
    code, out = run_script('test_checkpoint_loading.py', files['small'], cwd=tmp_path, ok=False)
    assert code == 1 and 'FAILED' in out and 'pass num_heads (--n_head)' in out and 'Traceback' not in out
    code, out = run_script('test_checkpoint_loading.py', cwd=tmp_path, ok=False)
    assert code == 1 and 'the following arguments are required: checkpoint' in out and out.count('\n') == 1


def test_command_line_runs_without_pytest(tmp_path_factory, tmp_path):
    # requirements.txt has no pytest: the tool must work where `import pytest` fails (None in sys.modules)
    import os
    import subprocess
    from tests.helpers import REPO
    path = modded_files(tmp_path_factory)['small']
    code = (f"import runpy, sys; sys.modules['pytest'] = None; sys.argv = ['test_checkpoint_loading.py', {str(path)!r}, "
            f"'--n_head', '2']; runpy.run_path({str(REPO / 'test_checkpoint_loading.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert proc.returncode == 0 and 'OK: the checkpoint loads' in proc.stdout, proc.stdout + proc.stderr


def test_loads_in_a_process_that_ran_transformers_from_pretrained_first(tmp_path_factory, tmp_path):
    # transformers swaps torch.linspace during from_pretrained; torch.device('meta') built its redirection table
    # then, in a fresh process, and a modded model built on meta got CPU rotary tables ("not on the expected device")
    import os
    import subprocess
    from tests.helpers import REPO
    path = modded_files(tmp_path_factory)['small']
    code = ("import torch; from transformers import GPT2Config, GPT2LMHeadModel; "
            "GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64)).save_pretrained('hf'); "
            "GPT2LMHeadModel.from_pretrained('hf'); from load_checkpoint_helper import load_pretrained_checkpoint; "
            f"model = load_pretrained_checkpoint({str(path)!r}, num_heads=2, verbose=False)[0]; "
            "print('features', list(model.forward_features(torch.zeros(1, 8, dtype=torch.long)).shape))")
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert proc.returncode == 0 and 'features [1, 8, 64]' in proc.stdout, proc.stdout + proc.stderr[-3000:]


if __name__ == '__main__':
    main()
