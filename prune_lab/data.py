"""Text datasets (twin of conf/data/*.yaml) and deterministic calibration batches."""
from __future__ import annotations

import gzip
import hashlib
import logging
from pathlib import Path

import torch

from .errors import DataUnavailable, PruneLabError

log = logging.getLogger("prune_lab")
ASSETS = Path(__file__).parent / "assets"
CONF_DATA = Path(__file__).resolve().parent / "conf" / "data"
SPLITS = ("train", "valid", "test")


class TextDataset:
    """Base: `text(split)` returns the whole split as one string."""

    name = "text"

    def text(self, split: str) -> str:
        raise NotImplementedError

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise PruneLabError(f"unknown split '{split}' for dataset '{self.name}': use one of {SPLITS}")

    def fingerprint(self, split: str) -> str:
        return hashlib.sha256(self.text(split).encode()).hexdigest()[:16]


class WikiVital(TextDataset):
    """wiki-vital-en, bundled with the package (CC BY-SA 4.0, see assets/wiki-vital-en/NOTICE.md)."""

    name = "wiki_vital"

    def __init__(self, root: str | None = None):
        self.root = Path(root) if root else ASSETS / "wiki-vital-en"
        self._cache: dict[str, str] = {}

    def text(self, split: str) -> str:
        self._check_split(split)
        if split not in self._cache:
            plain, packed = self.root / f"{split}.txt", self.root / f"{split}.txt.gz"
            if plain.exists():
                self._cache[split] = plain.read_text(encoding="utf-8")
            elif packed.exists():
                with gzip.open(packed, "rt", encoding="utf-8") as f:
                    self._cache[split] = f.read()
            else:
                raise DataUnavailable(f"wiki_vital split '{split}' not found under {self.root}")
        return self._cache[split]


class LocalText(TextDataset):
    """Plain-text files given per split (data=text data.train=... data.test=...)."""

    name = "text"

    def __init__(self, train: str | None = None, valid: str | None = None, test: str | None = None):
        self.paths = {"train": train, "valid": valid, "test": test}

    def text(self, split: str) -> str:
        self._check_split(split)
        path = self.paths[split]
        if not path:
            raise PruneLabError(f"data=text has no file for split '{split}': set data.{split}=<path>")
        p = Path(path).expanduser()
        if not p.is_file():
            raise PruneLabError(f"data.{split} file '{path}' does not exist")
        try:
            return p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PruneLabError(f"data.{split} file '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} "
                                f"at offset {e.start}): convert it, e.g. iconv -t utf-8") from None


class HubText(TextDataset):
    """A dataset loaded with `datasets.load_dataset` (wikitext2, ptb, c4, ...), splits joined."""

    def __init__(self, name: str, path: str, config_name: str | None = None,
                 text_field: str = "text", splits: dict | None = None,
                 data_files: dict | None = None, separator: str = "\n\n", max_rows: int | None = None):
        self.name, self.path, self.config_name = name, path, config_name
        self.text_field, self.separator, self.max_rows = text_field, separator, max_rows
        self.splits = dict(splits or {"train": "train", "valid": "validation", "test": "test"})
        self.data_files = dict(data_files) if data_files else None
        self._cache: dict[str, str] = {}

    def text(self, split: str) -> str:
        self._check_split(split)
        if split not in self._cache:
            rows = self._load(self.splits[split])
            if self.max_rows:
                rows = rows.select(range(min(self.max_rows, len(rows))))
            self._cache[split] = self.separator.join(rows[self.text_field])
        return self._cache[split]

    def _load(self, hub_split: str):
        import datasets
        files = self.data_files.get(hub_split) if self.data_files else None
        try:
            return datasets.load_dataset(self.path, self.config_name, split=hub_split,
                                         data_files=files)
        except Exception as e:  # offline: ConnectionError, OSError, DatasetNotFoundError ...
            raise DataUnavailable(
                f"dataset '{self.name}' ({self.path}) is unreachable: {type(e).__name__}. Offline? "
                f"Use data=text data.train=... data.test=... with local files, or pre-fill HF_DATASETS_CACHE"
            ) from e


def known_datasets() -> list[str]:
    """conf/data options; inside the app also those of a user's --config-dir (Hydra's search path)."""
    from hydra.core.global_hydra import GlobalHydra
    if GlobalHydra.instance().is_initialized():
        return sorted(GlobalHydra.instance().config_loader().get_group_options("data"))
    return sorted(p.stem for p in CONF_DATA.glob("*.yaml"))


def check_dataset_name(name) -> None:
    """A name from conf/data, never a path (`../../x` must not instantiate any YAML on disk)."""
    if str(name) not in known_datasets():
        raise PruneLabError(f"unknown dataset '{name}': choose one of {', '.join(known_datasets())}")


def load_named(name: str):
    """The dataset of conf/data/<name>.yaml, composed by Hydra (typed, with the job's search path,
    so a `--config-dir` of the user's own data configs works too): `eval.ppl.datasets=[data, ptb]`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException
    from hydra.utils import instantiate
    check_dataset_name(name)      # a name, never a path

    from .schema import register
    register()          # the typed schema the option extends (idempotent)

    def compose_data():
        try:
            return compose(config_name=f"data/{name}").data     # packaged under its group
        except MissingConfigException:
            raise PruneLabError(f"unknown dataset '{name}': choose one of {', '.join(known_datasets())}") from None

    if GlobalHydra.instance().is_initialized():      # inside the app
        node = compose_data()
    else:                                            # from Python: the package's configs
        with initialize_config_dir(config_dir=str(CONF_DATA.parent)):
            node = compose_data()
    return instantiate(node, _execution_whitelist_="prune_lab.*")


class TokenStreams:
    """Tokenises each (dataset, split) once per process: the whole split as one stream."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, dataset: TextDataset, split: str) -> torch.Tensor:
        key = (dataset.name, id(dataset), split)
        if key not in self._cache:
            ids = self.tokenizer(dataset.text(split), return_tensors="pt").input_ids[0]
            self._cache[key] = ids.long()
        return self._cache[key]


class Calibration:
    """Random `n_samples` windows of `seq_len` tokens from one split, fixed by the seed.

    Windows that must repeat tokens (n_samples x seq_len more than the split holds: 64 x 256 from a
    721-token file is 23x oversampling) are refused unless allow_overlap=true; the default job draws
    64 x 256 from wiki-vital-en's 1.1M-token train split (0.015x)."""

    def __init__(self, n_samples: int = 64, seq_len: int = 256, batch_size: int = 8,
                 split: str = "train", allow_overlap: bool = False):
        if n_samples < 1 or seq_len < 2 or batch_size < 1:
            raise PruneLabError("calibration needs n_samples >= 1, seq_len >= 2, batch_size >= 1")
        self.n_samples, self.seq_len, self.batch_size, self.split = n_samples, seq_len, batch_size, split
        self.allow_overlap = allow_overlap

    def check(self, n_tokens: int, n_samples: int | None = None) -> None:
        """The split is long enough for one window, and for all of them without repeating tokens."""
        n = n_samples or self.n_samples
        if n_tokens <= self.seq_len:
            raise PruneLabError(f"calibration split has {n_tokens} tokens, fewer than seq_len={self.seq_len}")
        factor = n * self.seq_len / n_tokens
        if factor > 1 and not self.allow_overlap:
            raise PruneLabError(
                f"calibration draws {n} x {self.seq_len} = {n * self.seq_len} tokens from the {n_tokens}-token "
                f"{self.split} split ({factor:.1f}x oversampling: the windows repeat tokens): lower "
                f"calibration.n_samples or seq_len, give a larger split, or set calibration.allow_overlap=true")
        if factor > 1:
            log.info("calibration: %d x %d tokens from %d (%.1fx oversampling, calibration.allow_overlap=true)",
                     n, self.seq_len, n_tokens, factor)

    def batches(self, stream: torch.Tensor, seed: int, n_samples: int | None = None) -> list[torch.Tensor]:
        """n_samples windows (default: the configured count) of seq_len tokens, fixed by the seed."""
        self.check(len(stream), n_samples)
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(stream) - self.seq_len, (n_samples or self.n_samples,), generator=gen)
        windows = torch.stack([stream[s:s + self.seq_len] for s in starts.tolist()])
        return list(windows.split(self.batch_size))
