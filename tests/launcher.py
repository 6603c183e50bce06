"""
`python script.py args...` for the tests, without paying for `import torch` every time. Each start of a script
spends about 1.5 s of CPU importing torch, numpy and scikit-learn before it does anything, and the suite starts
hundreds: on 2 cores that was a third of its time. So each pytest worker keeps one server process that has imported
them once; every run is a fork of it that sets up what a fresh `python` would have (argv, working directory,
environment, sys.path, standard streams: stdin empty, stdout and stderr to files, torch's and numpy's global random
generators seeded afresh) and runs the script as __main__. The child exits as the interpreter would (threads
joined, atexit handlers run, the script's objects finalised, an uncaught exception's traceback printed with exit
code 1), except that it skips the teardown of the preloaded modules, which nothing can observe.
What a fork cannot change is what the interpreter and the preloaded libraries read when they started: a run whose
environment differs from the server's in such a variable (STARTUP below: the hash seed, warning options, torch's
and the BLAS libraries' settings, locale) gets a fresh process instead. Libraries that read the environment when
imported and are not preloaded (huggingface_hub, datasets, transformers, wandb) read each run's own.
A script that leaves a process running behind it returns at once here; subprocess.run would wait for the process
to close its copy of the output pipe.
Real processes remain where the process itself is the subject: the README's commands, torchrun, and the tests that
signal or race a running process.
"""

import atexit
import builtins
import gc
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import types
from pathlib import Path

PRELOADED = ['torch', 'numpy', 'sklearn.metrics'] # the imports every script pays for
# variables read at the interpreter's start or at the preloaded libraries' import; the child sets up the others
# (torch's are its logging settings; the others, e.g. TORCHINDUCTOR_CACHE_DIR, which a torch.compile in a test's own
# process sets in its environment, are read when used)
STARTUP = re.compile(r'PYTHON|TORCH_LOGS$|TORCH_CPP_LOG_LEVEL$|TORCH_SHOW_CPP_STACKTRACES$|MKL_|OPENBLAS_|KMP_|GOMP_|TQDM_|'
                     r'SKLEARN_|JOBLIB_|LANG$|LC_|.*_NUM_THREADS$')
SET_UP_IN_THE_CHILD = {'PYTHONPATH', 'PYTHONUNBUFFERED', 'OMP_NUM_THREADS'}


def serve():
    """ the server: read one request per line, fork, run it, answer its exit code (or 'timeout') """
    import importlib
    for name in PRELOADED:
        importlib.import_module(name)
    gc.freeze() # the imported objects out of the collector's sight: a child's collections touch only its own
    requests, answers = os.fdopen(os.dup(0), 'r'), os.fdopen(os.dup(1), 'w')
    answers.write(json.dumps(startup_settings(os.environ)) + '\n') # as the imports left them (sklearn sets KMP_*)
    answers.flush()
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
    """ become `python *argv` as started in request['cwd'] with request['env'], run it, and exit """
    code = 1
    try:
        for fd, (path, flags) in enumerate([(os.devnull, os.O_RDONLY), (request['out'], os.O_WRONLY | os.O_CREAT),
                                            (request['err'], os.O_WRONLY | os.O_CREAT)]):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(0, closefd=False)
        os.chdir(request['cwd'])
        os.environ.clear()
        os.environ.update(request['env'])
        tempfile.tempdir = None # gettempdir() reads TMPDIR again, as in a fresh process
        if os.environ.get('PYTHONUNBUFFERED'):
            sys.stdout.reconfigure(write_through=True)
        import numpy
        import torch
        torch.default_generator.seed() # a fresh process starts from the OS's entropy, not from the server's state
        numpy.random.seed()
        if 'OMP_NUM_THREADS' in os.environ: # read by the OpenMP runtime when it was loaded: in the server
            torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
        code = run_main(request['argv'], [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p],
                        base_path)
        # the interpreter's exit without its teardown of every module: in a fork that touches every object the
        # server imported, copying its shared pages (1.1 s a run here)
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.modules['__main__'].__dict__.clear() # the script's own objects are finalised (unclosed files flushed)
        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def run_main(argv, extra_path, base_path):
    """ `python *argv`'s __main__, run; its exit code """
    main = sys.modules['__main__'] = types.ModuleType('__main__') # a fresh __main__, as `python` makes
    main.__builtins__ = builtins
    try:
        if argv[0] == '-c':
            sys.argv, sys.path[:] = ['-c', *argv[2:]], ['', *extra_path, *base_path]
            code = compile(argv[1], '<string>', 'exec')
        else:
            sys.argv, sys.path[:] = argv, [os.path.dirname(os.path.realpath(argv[0])), *extra_path, *base_path]
            main.__file__ = os.path.abspath(argv[0])
            with open(main.__file__, 'rb') as f:
                code = compile(f.read(), main.__file__, 'exec')
        exec(code, main.__dict__)
        return 0
    except SystemExit as e: # as the interpreter reads it: None is 0, a number is the code, anything else is printed
        return e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
    except BaseException:
        kind, error, trace = sys.exc_info()
        error.__traceback__ = trace.tb_next # without this function's frame, as a fresh process prints it
        sys.excepthook(kind, error, trace.tb_next)
        return 1


_idle, _idle_lock = [], threading.Lock() # servers not running anything now: one per concurrent caller (threads)


SERVER_ENV = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'} # as this module was first imported


def startup_settings(env):
    return {k: v for k, v in env.items() if STARTUP.match(k) and k not in SET_UP_IN_THE_CHILD}


def forks_alike(env, server):
    """
    whether a fork of the server sees what a fresh process given env would: each startup variable of env has the
    value the server started with, or the one its imports set themselves (a test that imported sklearn has those too)
    """
    wanted, started = startup_settings(env), startup_settings(SERVER_ENV)
    return all(wanted.get(k) in (started.get(k), server.settings.get(k)) for k in {*wanted, *started, *server.settings})


def start_server():
    process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=SERVER_ENV)
    atexit.register(process.stdin.close) # it ends at the end of its input
    process.settings = json.loads(process.stdout.readline())
    return process


def run_python(args, cwd, env, timeout=600):
    """ `python *args` in cwd with env: what subprocess.run(..., capture_output=True, text=True) returns """
    args = list(map(str, args))
    with _idle_lock:
        process = _idle.pop() if _idle else start_server()
    if not forks_alike(env, process):
        with _idle_lock:
            _idle.append(process)
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
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
