"""
`python script.py args...` for the tests, without paying for `import torch` every time. Each start of a script
spends about 1.5 s of CPU importing torch, numpy and scikit-learn before it does anything, and the suite starts
hundreds: on 2 cores that was a third of its time. So each pytest worker keeps one server process that has imported
them once; every run is a fork of it that sets up what a fresh `python` would have (argv, working directory,
environment, sys.path, standard streams: stdin empty, stdout and stderr to files) and runs the script as __main__.
The child exits as the interpreter would (threads joined, atexit handlers run, an uncaught exception's traceback
printed with exit code 1), except that it skips the teardown of every module, which nothing can observe.
Libraries that read the environment when they are imported (huggingface_hub, datasets, transformers, wandb) are
not preloaded, so each run's environment means what it would mean in a fresh process.
Real processes remain where the process itself is the subject: the README's commands, torchrun, and the tests that
signal or race a running process.
"""

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import types
from pathlib import Path

PRELOADED = ['torch', 'numpy', 'sklearn.metrics'] # the imports every script pays for; none reads the environment


def serve():
    """ the server: read one request per line, fork, run it, answer its exit code (or 'timeout') """
    import importlib
    for name in PRELOADED:
        importlib.import_module(name)
    requests, answers = os.fdopen(os.dup(0), 'r'), os.fdopen(os.dup(1), 'w')
    base_path = sys.path[1:] # without this file's folder: the child puts its own script's folder first
    while line := requests.readline():
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close()
            answers.close()
            run_child(request, base_path) # never returns
        answers.write(wait(pid, request['timeout']) + '\n')
        answers.flush()


def wait(pid, timeout):
    """ the child's exit code as text, or 'timeout' after killing it """
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd], [], [], timeout)
    os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return str(os.waitstatus_to_exitcode(status)) if ready else 'timeout'


def run_child(request, base_path):
    """ become `python *argv` as started in request['cwd'] with request['env'], and run it """
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, request['out']), (2, request['err'])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdin = open(os.devnull)
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    if os.environ.get('PYTHONUNBUFFERED'):
        sys.stdout.reconfigure(write_through=True)
    if 'OMP_NUM_THREADS' in os.environ: # read by the OpenMP runtime when it was loaded: in the server
        import torch
        torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
    extra = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    argv = request['argv']
    try:
        main = sys.modules['__main__'] = types.ModuleType('__main__') # a fresh __main__, as `python` makes
        if argv[0] == '-c':
            sys.argv, sys.path[:] = ['-c', *argv[2:]], ['', *extra, *base_path]
            code = compile(argv[1], '<string>', 'exec')
        else:
            sys.argv, sys.path[:] = argv, [os.path.dirname(os.path.realpath(argv[0])), *extra, *base_path]
            main.__file__ = os.path.abspath(argv[0])
            with open(main.__file__, 'rb') as f:
                code = compile(f.read(), main.__file__, 'exec')
        exec(code, main.__dict__)
        code = 0
    except SystemExit as e: # as the interpreter reads it: None is 0, a number is the code, anything else is printed
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    # the interpreter's exit (threads joined, atexit handlers run, streams flushed) without its teardown of every
    # module: in a fork that touches every object the server imported, copying its shared pages (1.1 s a run here)
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_idle, _idle_lock = [], threading.Lock() # servers not running anything now: one per concurrent caller (threads)


def start_server():
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=env)
    atexit.register(process.stdin.close) # it ends at the end of its input
    return process


def run_python(args, cwd, env, timeout=600):
    """ `python *args` in cwd with env: what subprocess.run(..., capture_output=True, text=True) returns """
    args = list(map(str, args))
    with _idle_lock:
        process = _idle.pop() if _idle else start_server()
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / 'stdout', Path(tmp) / 'stderr'
        request = dict(argv=args, cwd=str(cwd), env=dict(env), out=str(out), err=str(err), timeout=timeout)
        process.stdin.write(json.dumps(request) + '\n')
        process.stdin.flush()
        answer = process.stdout.readline().strip()
        assert answer, f'the launcher process ended (exit code {process.wait()})'
        with _idle_lock:
            _idle.append(process)
        if answer == 'timeout':
            raise subprocess.TimeoutExpired([sys.executable, *args], timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess([sys.executable, *args], int(answer), out.read_text(), err.read_text())


if __name__ == '__main__':
    serve()
