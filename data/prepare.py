"""
Prepare a dataset for training: text -> token ids -> train.bin, val.bin (uint16) and meta.json.
nanoGPT keeps one prepare.py per dataset folder; we keep this one script so the logic exists once.

$ python data/prepare.py                                  # pydocs_char, the default: needs no download
$ python data/prepare.py --dataset shakespeare_char       # downloads tiny Shakespeare once
$ python data/prepare.py --dataset mine --input my.txt    # any text file (char-level, or --tokenizer gpt2)

Output goes to data/<dataset>/ unless --out_dir says otherwise. meta.json holds
{"vocab_size", "tokenizer" (a core/tokenizer.py spec), "source", "train_tokens", "val_tokens"}.
It is JSON, never pickle: loading a pickle can run arbitrary code.
"""
import json
import platform
import re
import shutil
import sys
import urllib.request
from pathlib import Path

import numpy as np

if __name__ == "__main__":  # run as `python data/prepare.py`: make the repo root importable, for core/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.args import Parser
from core.cli import run
from core.commit import atomic_write, write_json
from core.errors import ClearError
from core.tokenizer import char_spec, load_tokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# dataset name -> (where its text comes from, default tokenizer); any other name needs --input
DATASETS = {
    "pydocs_char": ("pydocs", "char"),
    "pydocs": ("pydocs", "gpt2"),
    "shakespeare_char": ("shakespeare", "char"),
    "shakespeare": ("shakespeare", "gpt2"),
}


class DatasetError(ClearError):
    pass


def pydocs_text():
    """Python's own help text (what help('topics') shows): ~460 KB of English in every Python install.
    Topics are joined in sorted order so the corpus is the same on every run (for a given Python)."""
    from pydoc_data.topics import topics
    return "\n".join(topics[key] for key in sorted(topics))


def download(url, path):
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()  # read it all first, so a failed download leaves no half-written file
    atomic_write(path, lambda f: f.write(data))


def read_text_file(path):
    if Path(path).is_dir():
        raise DatasetError(f"the input {path} is a directory; expected a UTF-8 text file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"the input {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}: "
                           f"{e.reason}; a binary file?); expected a UTF-8 text file") from None
    except FileNotFoundError:
        raise DatasetError(f"the input {path} does not exist; expected a UTF-8 text file") from None
    except OSError as e:
        raise DatasetError(f"the input {path} could not be read ({e.strerror}); expected a UTF-8 text file") from None
    if not text:
        raise DatasetError(f"the input {path} is empty; expected a UTF-8 text file with the text to train on")
    return text


def shakespeare_text(out_dir, dataset):
    path = out_dir / "input.txt"
    if not path.exists():
        print(f"downloading tiny Shakespeare from {SHAKESPEARE_URL} to {path}")
        made = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            download(SHAKESPEARE_URL, path)
        except OSError as e:  # urllib's URLError and timeouts are OSErrors
            if made:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise DatasetError(
                f"could not download tiny Shakespeare from {SHAKESPEARE_URL} ({e}). If this machine is "
                f"offline, get input.txt another way and prepare it with: python data/prepare.py --dataset {dataset} "
                "--input FILE") from None
    return read_text_file(path), str(path)


def prepare(dataset="pydocs_char", input_path=None, out_dir=None, tokenizer=None, val_fraction=0.1):
    """Tokenize a dataset and write train.bin, val.bin and meta.json into out_dir. Returns the meta dict."""
    # the name becomes the folder data/<dataset>: a path in it ('../x', '/abs') would write outside data/
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", dataset):
        raise DatasetError(f"the dataset name {dataset!r} is not a plain name: expected letters, digits, '_', '-' and "
                           "'.' (not first), since it names the folder data/<dataset>; use --out_dir for another place")
    if dataset not in DATASETS and input_path is None:
        prepared = sorted({d.name for root in (Path("data"), Path(__file__).parent) if root.is_dir()
                           for d in root.iterdir() if (d / "meta.json").is_file()} - set(DATASETS))
        raise DatasetError(
            f"unknown dataset {dataset!r}: the known datasets are {', '.join(DATASETS)}"
            f"{'; prepared here: ' + ', '.join(prepared) if prepared else ''}. "
            "To use your own text, prepare it once: python data/prepare.py --dataset NAME --input FILE; then "
            "train with --dataset=NAME.")
    tokenizer = tokenizer or DATASETS.get(dataset, (None, "char"))[1]
    if tokenizer not in ("char", "gpt2"):
        raise DatasetError(f"the tokenizer must be 'char' or 'gpt2', found {tokenizer!r}")
    if not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction must be between 0 and 1 (exclusive), found {val_fraction}")
    out_dir = Path(out_dir) if out_dir is not None else Path(__file__).parent / dataset
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"the output folder {out_dir} is a file; expected a directory (new or existing)")

    if input_path is not None:
        text, source = read_text_file(input_path), str(input_path)
    elif DATASETS[dataset][0] == "pydocs":
        text, source = pydocs_text(), f"pydoc_data.topics (Python {platform.python_version()})"
    else:
        text, source = shakespeare_text(out_dir, dataset)
    print(f"length of dataset in characters: {len(text):,}")

    spec = char_spec(text) if tokenizer == "char" else {"token_kind": "gpt2"}
    enc = load_tokenizer(spec)
    if enc.vocab_size > 2 ** 16:  # ids are stored as uint16, so they must be below 65536
        raise DatasetError(f"the vocabulary has {enc.vocab_size:,} tokens, but train.bin stores ids as uint16, "
                           "which holds at most 65,536 distinct ids; use a smaller vocabulary.")
    print(f"vocab size: {enc.vocab_size:,}")

    # like nanoGPT: split the text (first 90% train, last 10% val), then encode each part
    n = len(text)
    split = int(n * (1 - val_fraction))
    train_ids, val_ids = enc.encode(text[:split]), enc.encode(text[split:])
    if not train_ids or not val_ids:
        raise DatasetError(f"the text of {source} is too short to split into train and val: {n} characters")
    print(f"train has {len(train_ids):,} tokens")
    print(f"val has {len(val_ids):,} tokens")

    # made only now, so that a failed run leaves no empty data/<dataset> that would look prepared
    out_dir.mkdir(parents=True, exist_ok=True)
    # each file whole or not at all: an interrupted run never leaves a short train.bin behind
    for name, ids in (("train.bin", train_ids), ("val.bin", val_ids)):
        data = np.array(ids, dtype=np.uint16).data # the array's own bytes, not a copy
        atomic_write(out_dir / name, lambda f: f.write(data))
    meta = {"vocab_size": enc.vocab_size, "tokenizer": spec, "source": source,
            "train_tokens": len(train_ids), "val_tokens": len(val_ids)}
    write_json(out_dir / "meta.json", meta)
    print(f"wrote train.bin, val.bin and meta.json to {out_dir}")
    return meta


def load_meta(data_dir):
    """Read data_dir/meta.json, as written by prepare()."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.exists():
        if (data_dir / "meta.pkl").exists():
            raise DatasetError(
                f"{data_dir} has a legacy nanoGPT meta.pkl but no meta.json. meta.pkl is a pickle, and we "
                "don't unpickle files (loading a pickle can run arbitrary code); re-run "
                f"`python data/prepare.py --out_dir {data_dir}` (with its --dataset / --input) to write meta.json.")
        raise DatasetError(f"expected {path}, but it does not exist; run `python data/prepare.py` first.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); re-run `python data/prepare.py`.") from None
    if not isinstance(meta, dict) or "vocab_size" not in meta or "tokenizer" not in meta:
        raise DatasetError(f"{path} should hold a JSON object with 'vocab_size' and 'tokenizer'; re-run `python data/prepare.py`.")
    return meta


if __name__ == "__main__":
    parser = Parser(description="Tokenize a text dataset into train.bin / val.bin / meta.json.")
    parser.add_argument("--dataset", default="pydocs_char",
                        help=f"one of {', '.join(DATASETS)} (default pydocs_char), or any name together with --input")
    parser.add_argument("--input", help="a UTF-8 text file to use instead of the dataset's own text")
    parser.add_argument("--out_dir", help="where to write the files (default: data/<dataset>)")
    parser.add_argument("--tokenizer", choices=["char", "gpt2"],
                        help="default: gpt2 for pydocs and shakespeare, char for every other name")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="last part of the text used for val")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    run(lambda args: prepare(args.dataset, args.input, args.out_dir, args.tokenizer, args.val_fraction),
        parser.parse_args())
