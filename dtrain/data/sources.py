"""Reading the user's data: a table from a file, a directory or a hub name, checked for what the template
reads. Every problem is one line naming the flag, the file (and the line, for a file that does not parse)
and the fix. The diagnosis of a broken file runs only after `datasets` failed, so good files pay nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dtrain.config import Config, DataConfig, SourceConfig, UserError, looks_local, resolved_sources
from dtrain.quiet import no_dataset_bars

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_table(path: str, split: str, flag: str):
    """A `datasets.Dataset` from a local file, a saved dataset directory or a hub dataset name."""
    import datasets

    p = Path(path).expanduser()
    try:
        if p.is_file():
            builder = _FILE_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise UserError(
                    f"--{flag}: unsupported file type '{p.suffix}' ({path}); use .json, .jsonl, .csv or .parquet"
                )
            if p.stat().st_size == 0 or (p.stat().st_size < 4096 and not p.read_bytes().strip()):
                raise UserError(f"--{flag}: '{path}' has no rows; point it at a non-empty dataset")
            if builder == "json":
                check_json_layout(p, path, flag)
            with no_dataset_bars():
                ds = datasets.load_dataset(builder, data_files=str(p), split="train")
        elif p.is_dir() and any(
            (p / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")
        ):
            ds = datasets.load_from_disk(str(p))
        elif p.is_dir():
            if not any(f.is_file() and not f.name.startswith(".") for f in p.rglob("*")):
                raise UserError(
                    f"--{flag}: directory '{path}' holds no data files; point it at a .json/.jsonl/.csv/.parquet "
                    "file, a directory of them, or a datasets save_to_disk directory"
                )
            with no_dataset_bars():
                ds = datasets.load_dataset(str(p), split=split)
        elif looks_local(path):
            raise UserError(f"--{flag}: file '{path}' does not exist")
        else:
            ds = datasets.load_dataset(path, split=split)
    except UserError:
        raise
    except Exception as exc:  # parse errors, an unreachable hub, a missing split
        if _has_no_rows(p):
            raise UserError(f"--{flag}: '{path}' has no rows; point it at a non-empty dataset") from None
        problem = diagnose_file(p) if p.is_file() else None
        if problem:
            raise UserError(f"--{flag}: could not load '{path}': {problem}") from None
        reason = _root_cause(exc)
        splits = re.search(r'Unknown split "[^"]*"\. Should be one of \[(.*?)\]', reason)
        if splits:
            names = ", ".join(n.strip(" '\"") for n in splits.group(1).split(","))
            raise UserError(
                f"--{flag}: '{path}' has no split '{split}' (has: {names}); set --data.split"
            ) from None
        raise UserError(f"--{flag}: could not load '{path}': {reason}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(
                f"--{flag}: '{path}' has no split '{split}' (has: {', '.join(ds)}); set --data.split"
            )
        ds = ds[split]
    if len(ds) == 0:
        raise UserError(f"--{flag}: '{path}' has no rows; point it at a non-empty dataset")
    return ds


_GENERIC = ("An error occurred while generating the dataset",)


def _root_cause(exc: BaseException | None) -> str:
    """The first specific message of an exception chain (`datasets` wraps the reader's error in a generic
    one)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = " ".join(str(exc).split())
        if text and not text.startswith(_GENERIC):
            return text[:300]
        exc = exc.__cause__ or exc.__context__
    return "unknown error"


_JSON_HEAD = 1 << 20  # bytes read to tell JSON Lines from one JSON document
_JSON_WHOLE = 256 << 20  # largest single-document .json file parsed here to check its layout


def check_json_layout(p: Path, path: str, flag: str) -> None:
    """Refuse a JSON file whose top level is one object (`datasets` would read it as a single row, or as
    one row holding the real rows in a column). Reads only the head of a JSON Lines file."""
    with open(p, "rb") as fh:
        head = fh.read(_JSON_HEAD).decode("utf-8", errors="replace").lstrip()
    if not head.startswith("{"):
        return  # a JSON list of rows, or something `datasets` will report
    first, _, rest = head.partition("\n")
    try:
        obj = json.loads(first)
    except ValueError:  # the first object spans lines: one pretty-printed document
        if p.stat().st_size > _JSON_WHOLE:
            return
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return  # not one document either: load_table's diagnosis names the line
    else:  # a complete object on line 1: JSON Lines (a single line is one row; check_columns hints)
        return
    if not isinstance(obj, dict):
        return
    nested = _nested_rows(obj)
    keys = ", ".join(list(map(str, obj))[:6])
    fix = (
        f"its rows seem to be the list under '{nested}': save that list as the file's top level"
        if nested
        else "give a JSON list of row objects"
    )
    raise UserError(
        f"--{flag}: '{path}' is one JSON object (keys: {keys}), not a table of rows; {fix}, or JSON Lines "
        "(one object per line)"
    )


def _nested_rows(obj) -> str | None:
    """The key of a list of objects inside a single JSON object (e.g. {"data": [{...}, ...]})."""
    if not isinstance(obj, dict):
        return None
    for key, value in obj.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value[:10]):
            return str(key)
    return None


def diagnose_file(p: Path) -> str | None:
    """After `datasets` failed to read a local file: what is wrong with it, naming the line and the fix
    (None when nothing specific is found). Runs only on failure, so it may read the whole file."""
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                pq.read_metadata(p)
            except Exception as exc:
                return (
                    f"is not a readable parquet file ({_root_cause(exc)[:150]}); it may be truncated or "
                    "corrupt: write it again"
                )
            return None
        with open(p, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return (
                        f"line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                        "re-save the file as UTF-8"
                    )
        if suffix == ".csv":
            return _diagnose_csv(p)
        if suffix in (".json", ".jsonl"):
            return _diagnose_json(p)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return None


def _diagnose_csv(p: Path) -> str | None:
    import csv

    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return None
        for row in reader:
            if len(row) > len(header):
                return (
                    f"line {reader.line_num} has {len(row)} fields but the header has {len(header)}; quote "
                    'fields that contain commas ("a, b") or fix that row'
                )
    return None


def _diagnose_json(p: Path) -> str | None:
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # one JSON document: a list of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            return (
                f"line {exc.lineno} is not valid JSON ({exc.msg}, column {exc.colno}); fix the syntax there"
            )
        lines = None
    else:  # JSON Lines
        rows, lines = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                return (
                    f"line {number} is not valid JSON ({exc.msg}, column {exc.colno}); each line must be one "
                    'JSON object, e.g. {"text": "..."}'
                )
            rows.append(row)
            lines.append(number)
    if not isinstance(rows, list):
        return None
    kinds: dict[str, tuple[str, str]] = {}  # column -> (kind, where first seen)
    for i, row in enumerate(rows):
        where = f"line {lines[i]}" if lines is not None else f"row {i + 1}"
        if not isinstance(row, dict):
            return (
                f"{where} is a JSON {_json_kind(row)}, not an object; every row must be an object of columns"
            )
        for key, value in row.items():
            if value is None:
                continue
            kind = _json_kind(value)
            if key not in kinds:
                kinds[key] = (kind, where)
            elif kinds[key][0] != kind:
                return (
                    f"column '{key}' holds a {kinds[key][0]} at {kinds[key][1]} but a {kind} at {where}; give it "
                    "the same type in every row (e.g. quote numbers as strings)"
                )
    return None


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object" if isinstance(value, dict) else type(value).__name__


def _has_no_rows(p: Path) -> bool:
    """After `datasets` failed to load a local source: was it because it holds zero rows?
    (`datasets` reports that in internal words: "corresponds to no data", an index error...)"""
    try:
        if p.is_dir():  # save_to_disk of 0 rows writes no data file
            state = json.loads((p / "state.json").read_text()) if (p / "state.json").exists() else {}
            return state.get("_data_files") == []
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(p).num_rows == 0
        if suffix == ".csv":
            with open(p) as fh:
                return sum(1 for line in fh if line.strip()) <= 1  # a header alone
        if suffix in (".json", ".jsonl"):
            head = p.read_text()[:4096].strip() if p.stat().st_size < 4096 else "x"
            return head in ("", "[]", "{}")
    except Exception:
        return False
    return False


def required_columns(cfg: DataConfig) -> list[str]:
    return {
        "alpaca": ["instruction", "output"],
        "chat": [cfg.messages_column],
        "text": [cfg.text_column],
    }[cfg.template]


def check_columns(ds, cfg: DataConfig, path: str, flag: str) -> None:
    """The template's columns are there and hold what it reads (text, or chat messages)."""
    missing = [c for c in required_columns(cfg) if c not in ds.column_names]
    if missing:
        nested = [c for c in ds.column_names if isinstance(_list_item(ds.features[c]), dict)]
        hint = (
            f" (one row whose column '{nested[0]}' holds a list of objects: is the file one JSON object with the "
            "rows under that key? then save that list as the file's top level, or as JSON Lines)"
            if len(ds) == 1 and nested and cfg.template != "chat"
            else ""
        )
        raise UserError(
            f"--{flag}: '{path}' lacks column(s) {', '.join(map(repr, missing))} needed by --data.template "
            f"{cfg.template} (it has: {', '.join(ds.column_names)}); pick the matching --data.template or rename "
            f"the columns{hint}"
        )
    # CSV has no types: its reader turns a column of digits into numbers, read back as their text.
    numbers_ok = Path(path).suffix.lower() == ".csv"
    if cfg.template == "chat":
        _check_messages_column(ds, cfg.messages_column, path, flag)
        _check_utf8(ds, [cfg.messages_column], path, flag)
        return
    text_columns = {"alpaca": ["instruction", "input", "output"], "text": [cfg.text_column]}[cfg.template]
    _check_utf8(ds, [c for c in text_columns if c in ds.column_names], path, flag)
    for name in text_columns:
        if name not in ds.column_names:
            continue  # alpaca's input is optional
        found = _not_text(ds.features[name], numbers_ok, nulls_ok=name == "input")
        if found and Path(path).suffix.lower() in (".json", ".jsonl") and Path(path).is_file():
            problem = _diagnose_json(Path(path))  # mixed types: name the lines
            if problem:
                raise UserError(f"--{flag}: '{path}' {problem}")
        if found:
            option = " (--data.text_column)" if cfg.template == "text" else ""
            raise UserError(
                f"--{flag}: column '{name}'{option} of '{path}' holds {found}, where --data.template "
                f"{cfg.template} reads text; store it as strings or point the template at a text column"
            )


def _check_utf8(ds, columns: list[str], path: str, flag: str) -> None:
    """Text that is not UTF-8 (pyarrow's JSON reader lets it through in string values): named with the line."""
    import pyarrow as pa

    for name in columns:
        try:
            _arrow_column(ds, name).validate(full=True)
        except pa.ArrowInvalid:
            problem = diagnose_file(Path(path)) if Path(path).is_file() else None
            raise UserError(
                f"--{flag}: '{path}' {problem}"
                if problem
                else f"--{flag}: column '{name}' of '{path}' holds text that is not UTF-8; re-save the data as UTF-8"
            ) from None


def _not_text(feature, numbers_ok: bool, nulls_ok: bool) -> str | None:
    """What a column holds instead of text (None when it is text)."""
    import datasets

    if isinstance(feature, datasets.Value):
        dtype = feature.dtype
        if dtype in ("string", "large_string"):
            return None
        if dtype == "null":
            return None if nulls_ok else "only nulls"
        if dtype == "bool":
            return "booleans"
        if dtype.startswith(("int", "uint", "float")) or dtype.startswith("decimal"):
            return None if numbers_ok else f"numbers ({dtype})"
        return f"values of type {dtype}"
    if type(feature).__name__ == "Json":
        return "values of mixed types"
    if isinstance(feature, datasets.ClassLabel):
        return "class labels (integers)"
    if isinstance(feature, dict):
        return f"objects (keys: {', '.join(feature)})"
    return "lists" if _list_item(feature) is not None else f"values of type {type(feature).__name__}"


def _list_item(feature):
    """The item feature of a list-like `datasets` feature (List, LargeList, Sequence), else None."""
    if type(feature).__name__ in ("List", "LargeList", "Sequence"):
        return feature.feature
    return None


CHAT_ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def _check_messages_column(ds, name: str, path: str, flag: str) -> None:
    where = f"--{flag}: column '{name}' (--data.messages_column) of '{path}'"
    shape = "a list of {role, content} messages"
    item = _list_item(ds.features[name])
    if (item is None or not isinstance(item, dict)) and Path(path).suffix.lower() in (".json", ".jsonl"):
        problem = _diagnose_json(Path(path)) if Path(path).is_file() else None
        if problem:  # mixed types: name the lines
            raise UserError(f"--{flag}: '{path}' {problem}")
    if item is None:
        found = _not_text(ds.features[name], False, False) or "strings"
        raise UserError(f"{where} holds {found}; it must hold {shape}")
    if not isinstance(item, dict):
        found = _not_text(item, False, False) or "strings"
        raise UserError(f"{where} holds lists of {found}; each message must be an object {{role, content}}")
    if "role" not in item or "content" not in item:
        hint = (
            " (the ShareGPT layout {from, value}: rename the keys to role/content and the roles human/gpt to "
            "user/assistant)"
            if {"from", "value"} <= set(item)
            else ""
        )
        raise UserError(f"{where}: its messages have keys {', '.join(item)}, not role and content{hint}")
    for key in ("role", "content"):
        held = _not_text(item[key], False, nulls_ok=key == "content")
        if held:
            raise UserError(f"{where}: message '{key}' holds {held}; it must be a string")
    import pyarrow.compute as pc

    roles = pc.struct_field(pc.list_flatten(_arrow_column(ds, name)), "role")
    unknown = [r for r in pc.unique(roles).to_pylist() if r not in CHAT_ROLES]
    if unknown:
        rename = [f"{r} -> {_SHAREGPT_ROLES[r]}" for r in unknown if r in _SHAREGPT_ROLES]
        raise UserError(
            f"{where} has message role(s) {', '.join(map(repr, unknown))}; the roles are "
            f"{', '.join(CHAT_ROLES)}" + (f" (rename {', '.join(rename)})" if rename else "")
        )


def _arrow_column(ds, name: str):
    """A column as a pyarrow (Chunked)Array, without converting rows to Python objects."""
    if getattr(ds, "_indices", None) is None:
        return ds.data.column(name)
    return ds.with_format("arrow")[name]


def _any_nonblank(strings, rows: int = 8192) -> bool:
    """Whether some entry is a string with something besides whitespace (nulls count as blank). Reads a
    slice of rows at a time and stops at the first such string: no copy of the column, which on a
    pretraining corpus is most of the data."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for start in range(0, len(strings), rows):
        piece = strings.slice(start, rows)
        if not pa.types.is_string(piece.type) and not pa.types.is_large_string(piece.type):
            piece = pc.cast(piece, pa.string())
        if pc.any(pc.match_substring_regex(piece, r"\S")).as_py():
            return True
    return False


def check_rows(ds, cfg: DataConfig, path: str, flag: str) -> None:
    """Refuse data whose trained part is empty in every row: it would train nothing (after check_columns)."""
    import pyarrow.compute as pc

    if cfg.template == "chat":
        messages = pc.list_flatten(_arrow_column(ds, cfg.messages_column))
        assistant = pc.equal(pc.struct_field(messages, "role"), "assistant")
        if not pc.any(assistant).as_py():
            raise UserError(
                f"--{flag}: no row of '{path}' has an assistant message in column '{cfg.messages_column}'; the "
                "chat template trains on the assistant's replies: add them, or use --data.template text"
            )
        if not _any_nonblank(pc.filter(pc.struct_field(messages, "content"), assistant)):
            raise UserError(
                f"--{flag}: every assistant message in column '{cfg.messages_column}' of '{path}' is empty; the "
                "chat template trains on the assistant's replies: fill them in"
            )
        return
    name = cfg.text_column if cfg.template == "text" else "output"
    if not _any_nonblank(_arrow_column(ds, name)):
        raise UserError(
            f"--{flag}: column '{name}' of '{path}' is empty in all {len(ds)} rows; --data.template "
            f"{cfg.template} trains on it: point it at the column that holds the text"
            + (" (--data.text_column)" if cfg.template == "text" else "")
        )


def use_chat_template(tokenizer, cfg: DataConfig, ds, path: str, flag: str, rows: int = 100) -> None:
    """Chat data: install --data.chat_template on the tokenizer, then make sure a template renders the first
    conversations (a tokenizer without one, or a broken template, fails here in one line, not mid-map)."""
    if cfg.template != "chat":
        return
    if cfg.chat_template:
        tokenizer.chat_template = Path(cfg.chat_template).expanduser().read_text(encoding="utf-8")
        source = f"--data.chat_template {cfg.chat_template}"
    else:
        name = getattr(tokenizer, "name_or_path", "") or "embedded"
        source = f"the chat template of tokenizer '{name}'"
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"--data.template chat: tokenizer '{name}' has no chat template; "
                "use --data.template alpaca (instruction/output columns) or text, or give a Jinja chat template "
                "with --data.chat_template FILE"
            )
    for i, messages in enumerate(ds.select(range(min(rows, len(ds))))[cfg.messages_column]):
        if not messages:
            continue
        try:
            tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:
            line = getattr(exc, "lineno", None)
            at = f" (template line {line})" if line else ""
            fix = "fix the template file" if cfg.chat_template else "give one with --data.chat_template FILE"
            raise UserError(
                f"{source} fails to render row {i + 1} of --{flag} '{path}'{at}: {_root_cause(exc)[:200]}; {fix}"
            ) from None


# --------------------------------------------------------------------------------------------
# The run's sources
# --------------------------------------------------------------------------------------------


def run_sources(cfg: Config) -> tuple[list[SourceConfig], list[str]]:
    """The run's sources (the embedded synthetic data as one source) and how messages name each."""
    if cfg.data.prepared is not None and cfg.data.path is None and not cfg.data.sources:
        return [], []  # the prepared directory's own sources
    if cfg.data.sources:
        sources = resolved_sources(cfg.data)
        return sources, [f"data.sources[{i}]." for i in range(len(sources))]
    if cfg.data.path is not None:
        return resolved_sources(cfg.data), ["data."]
    data_dir = Path(cfg.output_dir) / "data"
    d = cfg.data
    synthetic = SourceConfig(
        path=str(data_dir / "train.jsonl"),
        eval_path=str(data_dir / "eval.jsonl"),
        name="synthetic",
        template=d.template,
        text_column=d.text_column,
        messages_column=d.messages_column,
        chat_template=d.chat_template,
        split=d.split,
        eval_fraction=d.eval_fraction,
    )
    return [synthetic], ["data."]


def write_embedded_data(cfg: Config) -> None:
    from dtrain.tasks import write_synthetic_data

    d = cfg.data
    write_synthetic_data(
        Path(cfg.output_dir) / "data",
        d.synthetic_tasks,
        d.synthetic_train_examples,
        d.synthetic_eval_examples,
        cfg.train.seed,
    )
