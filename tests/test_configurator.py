import os
import types

import pytest

from configurator import ConfigError, apply_config
from tests.helpers import run_script


def defaults():
    return dict(max_iters=5000, batch_size=12, learning_rate=6e-4, compile=False,
                model_name='gpt', dtype='bfloat16', resume_from=None, wandb_run_name='run')


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_files_and_overrides_apply_in_order_later_wins(tmp_path, capsys):
    a = write(tmp_path, 'a.py', "max_iters = 100\nbatch_size = 4\n")
    b = write(tmp_path, 'b.py', "batch_size = 8\n")
    cfg = defaults()
    out = apply_config(cfg, ['--max_iters=1', a, '--max_iters', '200', b])
    assert out is cfg
    assert cfg['max_iters'] == 200  # override after file a wins over it
    assert cfg['batch_size'] == 8   # file b after file a wins
    printed = capsys.readouterr().out
    assert f"Overriding config with {a}:\nmax_iters = 100" in printed
    assert "Overriding: max_iters = 200" in printed


def test_file_before_override_loses(tmp_path):
    a = write(tmp_path, 'a.py', "max_iters = 100\n")
    cfg = apply_config(defaults(), ['--max_iters=7', a])
    assert cfg['max_iters'] == 100


def test_equals_and_space_forms_give_same_result():
    eq = apply_config(defaults(), ['--model_name=dante', '--max_iters=1100', '--learning_rate=1e-3'])
    sp = apply_config(defaults(), ['--model_name', 'dante', '--max_iters', '1100', '--learning_rate', '1e-3'])
    assert eq == sp
    assert (sp['model_name'], sp['max_iters'], sp['learning_rate']) == ('dante', 1100, 1e-3)


@pytest.mark.parametrize('argv', [['--compile'], ['--compile', '--max_iters', '3'], ['--compile', 'True'], ['--compile', 'CFG']])
def test_bool_flag_sets_true(argv, tmp_path):
    cfg_file = write(tmp_path, 'cfg.py', "batch_size = 3\n")
    cfg = apply_config(defaults(), [cfg_file if a == 'CFG' else a for a in argv])
    assert cfg['compile'] is True
    assert cfg['batch_size'] == (3 if 'CFG' in argv else 12)  # a config file after a bare flag is still a file


def test_bool_explicit_false():
    cfg = defaults()
    cfg['compile'] = True
    assert apply_config(cfg, ['--compile=False'])['compile'] is False


def test_bool_rejects_int():
    with pytest.raises(ConfigError) as e:
        apply_config(defaults(), ['--compile', '1'])
    msg = str(e.value)
    assert "'compile'" in msg and 'expected bool' in msg and '1 (int)' in msg and 'True or False' in msg


def test_int_key_rejects_bool():
    with pytest.raises(ConfigError, match=r"'max_iters': expected int, got True \(bool\)"):
        apply_config(defaults(), ['--max_iters', 'True'])


def test_int_for_float_is_converted():
    cfg = apply_config(defaults(), ['--learning_rate', '1'])
    assert cfg['learning_rate'] == 1.0
    assert type(cfg['learning_rate']) is float


def test_float_for_int_is_rejected():
    with pytest.raises(ConfigError, match=r"'max_iters': expected int, got 1.5 \(float\)"):
        apply_config(defaults(), ['--max_iters=1.5'])


def test_str_key_keeps_raw_text():
    cfg = apply_config(defaults(), ['--model_name', '123', '--dtype=float16', '--wandb_run_name', '[1, 2]'])
    assert cfg['model_name'] == '123'
    assert cfg['dtype'] == 'float16'
    assert cfg['wandb_run_name'] == '[1, 2]'


@pytest.mark.parametrize('raw, expected', [('5', 5), ('out/ckpt.pt', 'out/ckpt.pt'), ('[1, 2]', [1, 2]), ('None', None)])
def test_none_default_accepts_anything(raw, expected):
    assert apply_config(defaults(), ['--resume_from', raw])['resume_from'] == expected


def test_unknown_cli_key_suggests_close_match(tmp_path):
    with pytest.raises(ConfigError) as e:
        apply_config(defaults(), ['--max_iter', '5'])
    assert str(e.value) == "Unknown config key 'max_iter' (from the command line). Did you mean: max_iters?"
    # what a user sees: train.py prints that one line (its own keys as the close matches) and exits 1, before
    # any work and without a traceback
    code, out = run_script('train.py', '--max_iter', 5, cwd=tmp_path, ok=False)
    assert code == 1 and os.listdir(tmp_path) == [], out
    assert out.strip() == ("error: Unknown config key 'max_iter' (from the command line). "
                           "Did you mean: max_iters, eval_iters, warmup_iters?")


def test_unknown_key_without_close_match_lists_keys():
    with pytest.raises(ConfigError) as e:
        apply_config(defaults(), ['--zzzz=1'])
    msg = str(e.value)
    assert "'zzzz'" in msg and 'No close match' in msg and 'batch_size' in msg and 'max_iters' in msg


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = write(tmp_path, 'typo.py', "batch_szie = 32\n")
    cfg = defaults()
    with pytest.raises(ConfigError) as e:
        apply_config(cfg, [path])
    msg = str(e.value)
    assert "'batch_szie'" in msg and path in msg and 'Did you mean: batch_size?' in msg
    assert 'batch_szie' not in cfg


def test_file_values_are_type_checked(tmp_path):
    path = write(tmp_path, 'bad.py', "max_iters = 5e3\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match=r"'max_iters': expected int, got 5000.0 \(float\)"):
        apply_config(defaults(), [path])


def test_missing_file_names_path(tmp_path):
    path = str(tmp_path / 'nope.py')
    with pytest.raises(ConfigError, match='Config file not found') as e:
        apply_config(defaults(), [path])
    assert path in str(e.value)


def test_file_with_imports_helpers_and_derived_values(tmp_path):
    path = write(tmp_path, 'ft.py', (
        "import time\n"
        "from math import sqrt\n"
        "def _helper(x):\n    return x * 2\n"
        "def helper(x):\n    return x\n"
        "_scratch = 99\n"
        "wandb_run_name = 'ft-' + str(int(time.time()))\n"
        "batch_size = _helper(batch_size)\n"   # reads the earlier value
        "learning_rate = sqrt(4) * 1e-4\n"
    ))
    cfg = apply_config(defaults(), [path])
    assert cfg['wandb_run_name'].startswith('ft-') and cfg['wandb_run_name'][3:].isdigit()
    assert cfg['batch_size'] == 24
    assert cfg['learning_rate'] == pytest.approx(2e-4)
    assert set(cfg) == set(defaults())  # no time, sqrt, helper, _helper, _scratch


def test_globals_like_dict_protects_modules_and_functions(tmp_path):
    fake_mod = types.ModuleType('fake_os')

    def fn():
        return 1
    g = dict(defaults(), os=fake_mod, fn=fn, _private=1, __name__='__main__')
    for argv in (['--os', '5'], ['--fn=1'], ['--_private', '2'], ['--__name__=x']):
        with pytest.raises(ConfigError, match='Unknown config key'):
            apply_config(g, argv)
    with pytest.raises(ConfigError, match="Unknown config key 'fn'"):
        apply_config(g, [write(tmp_path, 'c.py', "fn = 3\n")])
    # a file's own `import os` is a helper, not an override of the global
    apply_config(g, [write(tmp_path, 'd.py', "import os\nmax_iters = 9\n")])
    assert g['os'] is fake_mod and g['fn'] is fn and g['_private'] == 1 and g['__name__'] == '__main__'
    assert g['max_iters'] == 9


@pytest.mark.parametrize('argv, match', [
    (['--'], 'Malformed argument'),
    (['--=x'], 'Malformed argument'),
    (['--nosuchflag'], "Unknown config key 'nosuchflag'"),
    (['--max_iters'], '--max_iters needs a value'),
    (['--max_iters', '--batch_size=3'], '--max_iters needs a value'),
])
def test_malformed_arguments(argv, match):
    with pytest.raises(ConfigError, match=match):
        apply_config(defaults(), argv)


def test_given_collects_every_key_set_even_to_its_default(tmp_path):
    a = write(tmp_path, 'a.py', "batch_size = 12\nmax_iters += 1\n_scratch = 3\n") # 12: the default, still given
    given = set()
    cfg = apply_config(defaults(), [a, '--compile', '--dtype=float32'], given)
    assert given == {'batch_size', 'max_iters', 'compile', 'dtype'} and cfg['max_iters'] == 5001
    assert apply_config(defaults(), ['--compile'])['compile'] is True # and without a set to fill


def test_only_the_first_process_under_torchrun_says_what_it_overrides(monkeypatch, capsys):
    for rank, says in (('1', False), ('0', True)):
        monkeypatch.setenv('RANK', rank)
        apply_config(defaults(), ['--max_iters=3'])
        assert ('Overriding: max_iters = 3' in capsys.readouterr().out) == says, rank
